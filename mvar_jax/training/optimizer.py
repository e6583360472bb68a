"""The official optimisation recipe as an optax chain.

AdamW (betas 0.9/0.95) with the learning rate scaled by the global batch
(``tlr = tblr * batch / 256``), a linear warm-up from ``wp0`` then the ``lin0``
decay to ``wpe``, gradient clipping at ``tclip`` on the global norm, and weight
decay on every weight except biases, vectors and the embeddings the official
``filter_params`` names (utils/lr_control.py, train.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mvar_jax.weights import transformer as transformer_weights

# Substrings of an official parameter name that exempt it from weight decay
# (the official ``nowd_keys``).
NO_DECAY_KEYS = (
    "cls_token",
    "start_token",
    "task_token",
    "cfg_uncond",
    "pos_embed",
    "pos_1LC",
    "pos_start",
    "start_pos",
    "lvl_embed",
    "gamma",
    "beta",
    "ada_gss",
    "moe_bias",
    "scale_mul",
)

# Fraction of the post-warm-up phase held at the peak rate before the linear decay.
_LINEAR_HOLD = {"lin": 0.15, "lin0": 0.05}
SCHEDULES = ("lin0", "lin", "cos")


def learning_rate_schedule(
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    kind: str = "lin0",
    warmup_start: float = 0.005,
    final_ratio: float = 0.01,
) -> optax.Schedule:
    """Official ``lr_wd_annealing``: linear warm-up from ``warmup_start * peak``, then decay.

    ``kind`` 'lin'/'lin0' hold the peak for the first 15%/5% of the decay phase,
    then fall linearly to ``final_ratio * peak`` at the last step; 'cos' is a
    half-cosine to the same floor.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; expected one of {SCHEDULES}")
    decay_steps = max(total_steps - 1 - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_start + (1 - warmup_start) * step / max(warmup_steps, 1)
        done = (step - warmup_steps) / decay_steps  # 0 -> 1 over the decay phase
        if kind == "cos":
            decay = final_ratio + (1 - final_ratio) * (0.5 + 0.5 * jnp.cos(math.pi * done))
        else:
            hold = _LINEAR_HOLD[kind]
            decay = jnp.where(done < hold, 1.0, final_ratio + (1 - final_ratio) * (1 - done) / (1 - hold))
        return peak * jnp.where(step < warmup_steps, warm, decay)

    return schedule


def weight_decay_schedule(*, start: float, end: float, total_steps: int) -> float | optax.Schedule:
    """Official weight decay: half-cosine from ``start`` to ``end`` (constant when equal)."""
    if start == end:
        return start
    span = max(total_steps - 1, 1)

    def schedule(step):
        done = jnp.asarray(step, jnp.float32) / span
        return end + (start - end) * (0.5 + 0.5 * jnp.cos(math.pi * done))

    return schedule


def is_decayed(name: str, ndim: int) -> bool:
    """The official ``filter_params`` rule for one parameter."""
    no_decay = ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)
    return not no_decay


def decay_mask(params: Any) -> Any:
    """Pytree of bools like the transformer ``params``: True where weight decay applies.

    The rule is applied to the official name of each Flax parameter.
    """

    def decayed(path, p):
        name = transformer_weights.official_key(tuple(k.key for k in path))
        return is_decayed(name, jnp.ndim(p))

    return jax.tree_util.tree_map_with_path(decayed, params)


def peak_learning_rate(optim: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """``tlr = tblr * global_batch / 256`` (utils/arg_util.py)."""
    return optim.base_lr * global_batch_size / 256


def make_optimizer(
    optim: ml_collections.ConfigDict, *, global_batch_size: int, total_steps: int, warmup_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The AdamW chain and its learning-rate schedule (also logged by the train step)."""
    lr = learning_rate_schedule(
        peak=peak_learning_rate(optim, global_batch_size),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        kind=optim.schedule,
        warmup_start=optim.warmup_start,
        final_ratio=optim.final_lr_ratio,
    )
    wd = weight_decay_schedule(start=optim.weight_decay, end=optim.weight_decay_end, total_steps=total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.scale_by_learning_rate(lr),
    )
    return tx, lr
