"""The generator's train state and the transformer's initial parameters.

Everything a run needs to continue bit-for-bit lives in ``TrainState``; the data
source's position is saved beside it by the checkpointer.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mvar_jax.models import transformer
from mvar_jax.models.config import InitScales, TransformerConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 (), optimizer steps taken so far (the official g_it)
    params: Any  # transformer params (float32), the tree under 'params'
    opt_state: optax.OptState
    rng: jax.Array  # base PRNG key; step t draws its randomness from fold_in(rng, t)


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def init_params(config: TransformerConfig, scales: InitScales, rng: jax.Array) -> Any:
    """Fresh transformer params (the tree under 'params') with the run's init multipliers."""
    return transformer.init_params(config, rng, scales=scales)["params"]
