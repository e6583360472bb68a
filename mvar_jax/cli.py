"""What the command-line entry points share: argparse value types and the sampling flags."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from mvar_jax import sampling


def int_list(what: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for comma-separated ints: ``"3,1"`` -> ``(3, 1)``.

    A malformed value is reported as ``expected comma-separated <what> such as <example>``.
    """

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} such as {example}, got {text!r}") from None

    return parse


def add_sampling_args(parser: argparse.ArgumentParser, *, batch_size: int, top_k: int,
                      top_p: float) -> None:
    """``--labels --batch-size --cfg --top-k --top-p --seed``: how samples are asked for.

    The defaults that differ between entry points are arguments (sample.py
    keeps the official ImageNet filters; evaluation samples unfiltered).
    """
    parser.add_argument("--labels", type=int_list("class ids", "3,1"),
                        help="comma-separated class ids (default: every class)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"images per compiled call (default {batch_size})")
    parser.add_argument("--cfg", type=float, default=1.5, help="guidance scale (default 1.5)")
    parser.add_argument("--top-k", type=int, default=top_k, help=f"0 disables (default {top_k})")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help=f"0 disables (default {top_p})")
    parser.add_argument("--seed", type=int, default=0,
                        help="batch b draws from fold_in(PRNGKey(seed), b) (default 0)")


def check_sampling_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error naming the flag when ``add_sampling_args``' values are invalid."""
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        sampling.check_filters(args.top_k, args.top_p, names=("--top-k", "--top-p"))
    except ValueError as e:
        parser.error(str(e))
