"""What the command-line entry points share: absl flag parsing, old spellings, the sampling flags.

Every entry point uses absl flags, spelled with underscores (``--num_per_class``). A command
that tests call in-process (``main(argv)``) keeps its flags in a ``flags.FlagValues`` of its
own, so that several can be imported at once, and parses them with ``parse_flags``: each call
starts from the defaults, ``--help`` prints the command's docstring and flags, and bad input
exits with status 2 and ``<prog>: error: <what>`` on stderr, as argparse did. The dashed
spellings of earlier versions (``--num-per-class``) still work and warn with the new one.
"""

from __future__ import annotations

import sys
import textwrap
import types
import warnings
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

from mvar_jax import sampling


def _ints(text: str, what: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated {what} such as {example}, got {text!r}") from None


class IntListParser(flags.ArgumentParser):
    """absl parser of comma-separated ints: ``"3,1"`` -> ``(3, 1)``."""

    syntactic_help = "comma-separated integers"

    def __init__(self, what: str, example: str):
        self._what, self._example = what, example

    def parse(self, argument):
        if isinstance(argument, (tuple, list)):
            return tuple(int(a) for a in argument)
        return _ints(argument, self._what, self._example)

    def flag_type(self) -> str:
        return "int list"


def define_int_list(
    name: str, default: str | None, help_text: str, flag_values: flags.FlagValues, *, what: str, example: str
):
    """A ``--name=3,1`` flag whose value is a tuple of ints (None when not given)."""
    return flags.DEFINE(
        IntListParser(what, example),
        name,
        default,
        help_text,
        flag_values=flag_values,
        serializer=flags.ListSerializer(","),
    )


def usage_error(prog: str, message: str) -> NoReturn:
    """Exits with status 2 and ``<prog>: error: <message>`` on stderr (argparse's convention)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def renamed_spellings(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
    """``argv`` in this version's spelling, each rewrite warning with the new one: the old
    dashed names of defined flags (``--num-per-class`` -> ``--num_per_class``) and int lists
    given as separate words (``--maps 13 16`` -> ``--maps=13,16``)."""
    out, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        name, eq, value = arg[2:].partition("=")
        new = name.replace("-", "_")
        if not arg.startswith("--") or new not in flag_values:
            out.append(arg)
            continue
        if new != name:
            warnings.warn(f"--{name} is now --{new}", FutureWarning, stacklevel=3)
        if not eq and isinstance(flag_values[new].parser, IntListParser):
            words = []
            while argv and argv[0].lstrip("-").isdigit() and not argv[0].startswith("--"):
                words.append(argv.pop(0))
            if len(words) > 1:
                warnings.warn(
                    f"--{new} {' '.join(words)} is now --{new}={','.join(words)}", FutureWarning, stacklevel=3
                )
            eq, value = ("=", ",".join(words)) if words else ("", "")
        out.append(f"--{new}{eq}{value}")
    return out


def parse_flags(
    flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str | None
) -> types.SimpleNamespace:
    """Parses ``argv`` (``sys.argv[1:]`` when None) into ``flag_values``, every flag starting
    from its default, and returns the values by name. ``--help`` prints ``doc`` and the
    flags, then exits 0; an unknown flag, a bad value, a missing required flag or a
    positional argument is a ``usage_error``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(f"{(doc or '').strip()}\n\nflags:")
        for name in sorted(flag_values):
            flag = flag_values[name]
            default = "" if flag.default is None else f" (default: {flag.default_as_str[1:-1]})"
            print(
                textwrap.fill(
                    f"--{name}: {flag.help}{default}", 96, initial_indent="  ", subsequent_indent="      "
                )
            )
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([prog, *renamed_spellings(argv, flag_values)])
    except flags.Error as e:
        usage_error(prog, str(e))
    if len(rest) > 1:
        usage_error(prog, f"unexpected arguments: {' '.join(rest[1:])}")
    return types.SimpleNamespace(**flag_values.flag_values_dict())


def given(flag_values: flags.FlagValues, names: Sequence[str]) -> list[str]:
    """``--name`` for each of ``names`` that the command line set."""
    return [f"--{n}" for n in names if flag_values[n].present]


def define_sampling_flags(
    flag_values: flags.FlagValues, *, batch_size: int, top_k: int, top_p: float
) -> None:
    """``--labels --batch_size --cfg --top_k --top_p --seed``: how samples are asked for.

    The defaults that differ between entry points are arguments (sample.py keeps the
    official ImageNet filters; evaluation samples unfiltered).
    """
    define_int_list(
        "labels",
        None,
        "comma-separated class ids (default: every class)",
        flag_values,
        what="class ids",
        example="3,1",
    )
    flags.DEFINE_integer(
        "batch_size", batch_size, "images per compiled call", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_float("cfg", 1.5, "guidance scale", flag_values=flag_values)
    flags.DEFINE_integer("top_k", top_k, "0 disables", flag_values=flag_values)
    flags.DEFINE_float("top_p", top_p, "0 disables", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "batch b draws from fold_in(PRNGKey(seed), b)", flag_values=flag_values)


def check_sampling_flags(flag_values: flags.FlagValues, prog: str) -> None:
    """A ``usage_error`` naming the flag when ``define_sampling_flags``' values are invalid."""
    try:
        sampling.check_filters(flag_values.top_k, flag_values.top_p, names=("--top_k", "--top_p"))
    except ValueError as e:
        usage_error(prog, str(e))
