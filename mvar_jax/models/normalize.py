"""``F.normalize`` for JAX: shared by the quantizer's cosine look-up and the L2 attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divides by the L2 norm over the last axis, floored at ``eps``, in float32.

    Low-precision inputs are promoted: the norm of a bf16 vector loses too much
    for the attention logits that follow.
    """
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
