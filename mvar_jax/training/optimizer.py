"""One optimizer schema for every task (``OptimizerConfig``), built into an optax chain.

The official generator recipe (utils/lr_control.py, train.py): AdamW (betas
0.9/0.95) with the learning rate scaled by the global batch
(``tlr = tblr * batch / 256``), a linear warm-up from ``wp0`` then the ``lin0``
decay to ``wpe``, gradient clipping at ``tclip`` on the global norm, and weight
decay on every weight except biases, vectors and the embeddings the official
``filter_params`` names. The tokenizer uses the same schema with its own values
(an unscaled learning rate: ``lr_batch=0``) and decays every kernel and the codebook.

Lion (``name='lion'``): the official arguments name it (utils/arg_util.py, "lr 0.25x,
wd 8x, needs a large batch") but the official ``opt_clz`` builds AdamW alone; here it
is optax's ``scale_by_lion`` in the same chain (clipping first, decoupled decay on the
same mask, the same schedules), with the betas the official code hands every
optimizer (0.9/0.95; the Lion paper's are 0.9/0.99).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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

# Fraction of the post-warm-up phase held at the peak rate before the decay.
_HOLD = {"lin": 0.15, "lin0": 0.05, "exp": 0.15}
# utils/lr_control.py's names; 'lin<T>' (0 < T < 1, e.g. 'lin0.8') is the progressive one.
SCHEDULES = ("lin0", "lin", "lin00", "lin<T>", "cos", "exp")
# name -> the update rule (before weight decay and the learning rate).
_UPDATE_RULES: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "adamw": lambda o: optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
    "lion": lambda o: optax.scale_by_lion(b1=o.b1, b2=o.b2),
}
OPTIMIZERS = tuple(_UPDATE_RULES)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How a task's params learn; a config's ``optim`` section holds these fields.

    The defaults are the official generator recipe's (utils/arg_util.py).

    Attributes:
      name: the update rule: 'adamw' or 'lion' (sign of the interpolated momentum; the
        official note: a quarter of AdamW's learning rate, 8x its weight decay).
      base_lr: the learning rate at ``lr_batch`` images per step (the official
        ``--tblr``); the peak is ``base_lr * global_batch / lr_batch``, or
        ``base_lr`` itself with ``lr_batch = 0``.
      lr_batch: see ``base_lr`` (the official 256; 0: no batch scaling).
      b1, b2, eps: Adam's moments; Lion's two interpolation betas (no eps).
      weight_decay: on the params the task's decay mask selects.
      weight_decay_end: None: constant; else a half-cosine from ``weight_decay``
        to this at the last step (the official ``--twde``).
      grad_clip: global-norm clipping; <= 0 disables.
      schedule: after the warm-up, down to ``final_lr_ratio * peak`` at the last step:
        'lin0' / 'lin' (hold the peak for 5% / 15% of the decay phase, then linear),
        'lin00' (linear), 'lin<T>' (two lines meeting at T of the phase, the official
        schedule of progressive training), 'cos' (half-cosine) or 'exp' (hold 15%,
        then exponential).
      warmup_fraction: the share of the run's steps in the linear warm-up.
      warmup_start: lr ratio at the first warm-up step (the official ``--wp0``).
      final_lr_ratio: lr ratio at the last step (the official ``--wpe``).
    """

    name: str = "adamw"
    base_lr: float = 1e-4
    lr_batch: int = 256
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    grad_clip: float = 2.0
    schedule: str = "lin0"
    warmup_fraction: float = 1 / 50
    warmup_start: float = 0.005
    final_lr_ratio: float = 0.01

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name={self.name!r}; expected one of {OPTIMIZERS}")
        if not (math.isfinite(self.base_lr) and self.base_lr > 0):
            raise ValueError(f"base_lr={self.base_lr} must be positive and finite")
        if not isinstance(self.lr_batch, int) or self.lr_batch < 0:
            raise ValueError(f"lr_batch={self.lr_batch!r} must be an int >= 0 (0: no batch scaling)")
        check_schedule(self.schedule)
        if self.schedule == "exp" and not self.final_lr_ratio > 0:
            raise ValueError("schedule='exp' decays to final_lr_ratio, which must then be > 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        for name in ("weight_decay", "warmup_start", "final_lr_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def peak_learning_rate(self, global_batch_size: int) -> float:
        """``tlr = tblr * global_batch / 256`` (utils/arg_util.py), or ``base_lr`` unscaled."""
        return self.base_lr * global_batch_size / self.lr_batch if self.lr_batch else self.base_lr


def check_schedule(kind: str) -> None:
    """Raises ValueError unless ``kind`` is one of ``SCHEDULES``."""
    if kind in SCHEDULES and kind != "lin<T>":
        return
    try:
        turn = float(kind[3:]) if kind.startswith("lin") else None
    except ValueError:
        turn = None
    if turn is None or not 0 < turn < 1:
        raise ValueError(f"schedule={kind!r}; expected one of {SCHEDULES}")


def _decay(kind: str, final_ratio: float, done: jax.Array) -> jax.Array:
    """The lr ratio after the warm-up, ``done`` going 0 -> 1 over the decay phase
    (``lr_wd_annealing``'s branches)."""
    rest = 1 - done
    if kind == "cos":
        return final_ratio + (1 - final_ratio) * (0.5 + 0.5 * jnp.cos(math.pi * done))
    if kind == "lin00":
        return final_ratio + (1 - final_ratio) * rest
    if kind == "exp":
        hold = _HOLD[kind]
        return jnp.where(done < hold, 1.0, jnp.exp((done - hold) / (1 - hold) * math.log(final_ratio)))
    if kind in _HOLD:
        hold = _HOLD[kind]
        return jnp.where(done < hold, 1.0, final_ratio + (1 - final_ratio) * rest / (1 - hold))
    turn = float(kind[3:])  # 'lin<T>': 1 down to ``mid`` at T, then down to the floor
    mid = (1 + final_ratio + (1 - final_ratio) * (1 - turn)) / 2
    return jnp.where(
        done < turn, 1 + (mid - 1) * done / turn, final_ratio + (mid - final_ratio) * rest / (1 - turn)
    )


def learning_rate_schedule(
    *,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    kind: str = "lin0",
    warmup_start: float = 0.005,
    final_ratio: float = 0.01,
) -> optax.Schedule:
    """Official ``lr_wd_annealing``: linear warm-up from ``warmup_start * peak``, then the
    ``kind`` of decay (``OptimizerConfig.schedule``) to ``final_ratio * peak`` at the last step."""
    check_schedule(kind)
    decay_steps = max(total_steps - 1 - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_start + (1 - warmup_start) * step / max(warmup_steps, 1)
        done = (step - warmup_steps) / decay_steps  # 0 -> 1 over the decay phase
        return peak * jnp.where(step < warmup_steps, warm, _decay(kind, final_ratio, done))

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


def official_decay_mask(params: Any) -> Any:
    """Pytree of bools like the transformer ``params``: True where weight decay applies.

    The official rule (``is_decayed``), applied to the official name of each Flax parameter.
    """

    def decayed(path, p):
        name = transformer_weights.official_key(tuple(k.key for k in path))
        return is_decayed(name, jnp.ndim(p))

    return jax.tree_util.tree_map_with_path(decayed, params)


def matrix_decay_mask(params: Any) -> Any:
    """Weight decay on every array of >= 2 dims (kernels, a codebook), none on vectors."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    optim: OptimizerConfig, *, global_batch_size: int, total_steps: int, decay_mask: Callable[[Any], Any]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain and its learning-rate schedule (also logged by the train step)."""
    lr = learning_rate_schedule(
        peak=optim.peak_learning_rate(global_batch_size),
        total_steps=total_steps,
        warmup_steps=round(optim.warmup_fraction * total_steps),
        kind=optim.schedule,
        warmup_start=optim.warmup_start,
        final_ratio=optim.final_lr_ratio,
    )
    end = optim.weight_decay if optim.weight_decay_end is None else optim.weight_decay_end
    wd = weight_decay_schedule(start=optim.weight_decay, end=end, total_steps=total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
        _UPDATE_RULES[optim.name](optim),
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.scale_by_learning_rate(lr),
    )
    return tx, lr
