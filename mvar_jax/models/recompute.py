"""Recomputation in the backward pass that XLA cannot hoist or merge with the forward.

``jax.checkpoint`` leaves the recomputed forward free to be scheduled as early as
its inputs allow, and some backends drop its optimisation barriers before
common-subexpression elimination: XLA's CPU compiler then computes every block's
recomputation at once, or hands back the forward's own buffers, and the memory
the recomputation was to save stays in use. Here the recomputation's inputs are
made to depend on the incoming gradient (plus a zero computed from it), so each
block's forward is redone only when its gradient arrives: one block's
activations at a time, on every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def tied_to(cotangent: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """``arrays`` unchanged in value (each plus a zero made from ``cotangent``), but available
    only once ``cotangent`` is."""
    zero = cotangent[(0,) * cotangent.ndim] * 0
    return tuple(a + zero.astype(a.dtype) for a in arrays)


def recomputed(fn: Callable[..., jax.Array], tie: tuple[int, ...]) -> Callable[..., jax.Array]:
    """``fn(*args)`` (one array out) whose backward pass keeps only ``args`` and runs ``fn``
    again once the output's gradient arrives; ``tie``: the positions of the args the
    recomputation starts from (the activations; params need no tie)."""

    @jax.custom_vjp
    def run(*args: Any) -> jax.Array:
        return fn(*args)

    def forward(*args: Any):
        return fn(*args), args

    def backward(args: tuple[Any, ...], d_out: jax.Array):
        args = list(args)
        for i, tied in zip(tie, tied_to(d_out, *(args[i] for i in tie))):
            args[i] = tied
        _, vjp = jax.vjp(fn, *args)
        return vjp(d_out)

    run.defvjp(forward, backward)
    return run
