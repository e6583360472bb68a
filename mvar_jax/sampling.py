"""Class-conditional generation for MVAR (no KV cache), VAR (KV cache) and M-VAR (Mamba states).

MVAR's attention is Markovian in scale, so step ``si`` runs the transformer on the
``pn * pn`` tokens of scale ``si`` alone: nothing from earlier scales is kept besides
the VQVAE's accumulated feature map ``f_hat``, which also feeds the next scale's
input. VAR attends to every earlier scale and keeps their keys/values in the
transformer's fixed-size cache. M-VAR also runs scale ``si``'s tokens alone, its
Mamba layers advancing a fixed-size state carried from the previous scale.

Guidance, filtering and the Gumbel "more smooth" mode follow the official
samplers; randomness comes from one ``jax.random`` key, folded in per scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax import m_var
from mvar_jax.checkpoint import ModelBundle, check_configs
from mvar_jax.transformer import Transformer, TransformerConfig, init_kv_cache
from mvar_jax.vqvae import VQVAE, VQVAEConfig


def top_k_filter(logits_BlV: jax.Array, top_k: int) -> jax.Array:
    """Sets logits strictly below the k-th largest of their row to -inf.

    Ties with the k-th largest survive, as with the official helper. ``top_k <= 0``
    or ``top_k >= V`` keeps everything.
    """
    V = logits_BlV.shape[-1]
    if top_k <= 0 or top_k >= V:
        return logits_BlV
    kth_largest = jax.lax.top_k(logits_BlV, top_k)[0][..., -1:]
    return jnp.where(logits_BlV < kth_largest, -jnp.inf, logits_BlV)


def top_p_filter(logits_BlV: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering with the official rule, keyed on ascending order.

    Sorted ascending, a token is dropped while the running softmax mass up to and
    including it is at most ``1 - top_p``; the largest token is always kept. The
    dropped tokens form a prefix of the ascending order, so the rule reduces to a
    per-row threshold (ties at the threshold are all kept). ``top_p <= 0`` keeps
    everything.
    """
    if top_p <= 0:
        return logits_BlV
    V = logits_BlV.shape[-1]
    ascending = jnp.sort(logits_BlV, axis=-1)
    mass = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    num_dropped = jnp.sum(mass <= 1 - top_p, axis=-1, keepdims=True)
    num_dropped = jnp.minimum(num_dropped, V - 1)
    threshold = jnp.take_along_axis(ascending, num_dropped, axis=-1)
    return jnp.where(logits_BlV < threshold, -jnp.inf, logits_BlV)


def check_filters(top_k: int, top_p: float, *, names: tuple[str, str] = ("top_k", "top_p")
                  ) -> None:
    """Raises ValueError unless ``top_k >= 0`` and ``0 <= top_p <= 1`` (0 disables either).

    ``names``: how the caller's user spells the two settings (flags, config fields).
    """
    k_name, p_name = names
    if top_k < 0:
        raise ValueError(f"{k_name}={top_k} must be >= 0 (0: off)")
    if not 0 <= top_p <= 1:
        raise ValueError(f"{p_name}={top_p} must be in [0, 1] (0: off)")


def filter_logits(logits_BlV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Top-k, then top-p on what is left (the official order)."""
    return top_p_filter(top_k_filter(logits_BlV, top_k), top_p)


def gumbel_softmax(key: jax.Array, logits_BlV: jax.Array, tau: float) -> jax.Array:
    """``softmax((logits + g) / tau)`` with standard Gumbel noise g: a soft sample."""
    gumbel = jax.random.gumbel(key, logits_BlV.shape, logits_BlV.dtype)
    return jax.nn.softmax((logits_BlV + gumbel) / tau, axis=-1)


def guidance_schedule(cfg: float, config: TransformerConfig) -> np.ndarray | None:
    """Per-scale classifier-free guidance weights ``(num_scales, 2)`` float32, or None.

    Row si holds ``(1 + t, t)`` with ``t = cfg * si / (num_scales - 1)``, so that
    ``logits = (1 + t) * cond - t * uncond``. The weights are computed in float64
    and rounded once, as PyTorch rounds the official Python scalars. MVAR skips
    guidance (None: no unconditional half) when ``cfg == 1``; VAR and M-VAR
    always guide, as their official samplers do (cfg 1 still ramps t = si / 9).
    """
    if config.attention == "mvar" and cfg == 1.0:
        return None
    t = cfg * (np.arange(config.num_scales, dtype=np.float64) / (config.num_scales - 1))
    return np.stack([1 + t, t], axis=1).astype(np.float32)


class Samples(NamedTuple):
    """What ``generate`` returns."""

    tokens: jax.Array  # (B, L) int32, all scales concatenated.
    f_hat: jax.Array  # (B, h, w, Cvae) float32, the VQVAE features after the last scale.
    images: jax.Array | None  # (B, H, W, 3) float32 in [0, 1]; None with decode=False.


def generate(
    vqvae_config: VQVAEConfig, transformer_config: TransformerConfig,
    vqvae_params: Any, transformer_params: Any, label_B: jax.Array, key: jax.Array,
    guidance_S2: jax.Array | None, *, top_k: int = 0, top_p: float = 0.0,
    more_smooth: bool = False, decode: bool = True, mamba_rerun: bool = False,
) -> Samples:
    """Generates one image per label, coarse to fine; traceable, see ``sample`` for the jit.

    Args:
      label_B: int class labels in ``[0, num_classes)``.
      key: a ``jax.random`` key; scale si draws from ``fold_in(key, si)``.
      guidance_S2: ``guidance_schedule(cfg, transformer_config)``; None runs the
        conditional batch alone.
      top_k, top_p: logit filters (0 disables); ``top_k=1`` is greedy.
      more_smooth: feed the next scale a Gumbel-softmax mix of codebook entries
        instead of the sampled entry (the official visualisation mode).
      decode: decode f_hat to images (off for token-only benchmarks).
      mamba_rerun: M-VAR only: the official algorithm, re-running every Mamba
        layer over all earlier scales at each scale instead of carrying its state
        (the same samples at a higher cost; the reference of tests and benchmarks).
    """
    tcfg = transformer_config
    vqvae, model = VQVAE(vqvae_config), Transformer(tcfg)
    B, Cvae, num_scales = label_B.shape[0], tcfg.cvae, tcfg.num_scales
    guided = guidance_S2 is not None
    if guided:  # The unconditional half uses the null class.
        label_B = jnp.concatenate([label_B, jnp.full_like(label_B, tcfg.num_classes)])
    x_BlC, cond_BD = model.apply(transformer_params, label_B, method=Transformer.start_input)
    cache = (m_var.init_rerun_cache if mamba_rerun else init_kv_cache)(
        tcfg, label_B.shape[0])  # None for MVAR.
    if more_smooth:
        codebook_VC = vqvae.apply(vqvae_params, jnp.arange(tcfg.vocab_size)[None],
                                  method=VQVAE.embed_tokens)[0]
    side = tcfg.patch_nums[-1]
    f_hat_BhwC = jnp.zeros((B, side, side, Cvae), jnp.float32)

    tokens = []
    for si, pn in enumerate(tcfg.patch_nums):
        if si > 0:
            x_BlC = model.apply(transformer_params, next_BlCv, si, method=Transformer.scale_input)
            if guided:
                x_BlC = jnp.concatenate([x_BlC, x_BlC])
        # Only this scale's pn*pn tokens enter the model (plus the cache).
        logits_BlV, cache = model.apply(transformer_params, x_BlC, cond_BD, si, cache,
                                        method=Transformer.scale_logits)
        if guided:
            logits_BlV = (guidance_S2[si, 0] * logits_BlV[:B]
                          - guidance_S2[si, 1] * logits_BlV[B:])
        logits_BlV = filter_logits(logits_BlV, top_k, top_p)

        token_key, smooth_key = jax.random.split(jax.random.fold_in(key, si))
        idx_Bl = jax.random.categorical(token_key, logits_BlV).astype(jnp.int32)
        tokens.append(idx_Bl)
        ratio = si / (num_scales - 1)
        if more_smooth:
            h_BlCv = gumbel_softmax(smooth_key, logits_BlV * (1 + ratio),
                                    tau=max(0.27 * (1 - 0.95 * ratio), 0.005)) @ codebook_VC
        else:
            h_BlCv = vqvae.apply(vqvae_params, idx_Bl, method=VQVAE.embed_tokens)
        f_hat_BhwC, next_BhwC = vqvae.apply(
            vqvae_params, si, f_hat_BhwC, h_BlCv.reshape(B, pn, pn, Cvae),
            method=VQVAE.next_autoregressive_input)
        next_BlCv = next_BhwC.reshape(B, -1, Cvae)

    images = None
    if decode:
        img = vqvae.apply(vqvae_params, f_hat_BhwC, method=VQVAE.fhat_to_img)
        images = (img + 1) * 0.5
    return Samples(jnp.concatenate(tokens, axis=1), f_hat_BhwC, images)


_generate_jit = jax.jit(
    generate, static_argnames=("vqvae_config", "transformer_config", "top_k", "top_p",
                               "more_smooth", "decode", "mamba_rerun"))


def sample(model: ModelBundle, labels: Sequence[int] | np.ndarray | jax.Array,
           key: jax.Array, *, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
           more_smooth: bool = False, decode: bool = True) -> Samples:
    """Checks the labels and that the configs fit together, then runs the compiled ``generate``.

    The params must have the configs' shapes, as ``checkpoint.load_model`` ensures.

    Compiles once per batch size, set of options and guidance on/off; the value
    of ``cfg`` is an input, so changing it re-uses the compilation (unless MVAR
    moves to or from ``cfg == 1``, which drops the unconditional half). The
    transformer's precision is ``model.transformer_config.dtype``.
    """
    tcfg = model.transformer_config
    check_configs(model.vqvae_config, tcfg)
    label_B = np.asarray(labels)
    if label_B.ndim != 1 or label_B.size == 0 or not np.issubdtype(label_B.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D array of ints, got {label_B!r}")
    bad = label_B[(label_B < 0) | (label_B >= tcfg.num_classes)]
    if bad.size:
        raise ValueError(f"labels {sorted(set(bad.tolist()))} are outside the model's "
                         f"{tcfg.num_classes} classes [0, {tcfg.num_classes - 1}]")
    check_filters(top_k, top_p)
    return _generate_jit(
        model.vqvae_config, tcfg, model.vqvae_params, model.transformer_params,
        jnp.asarray(label_B, jnp.int32), key, guidance_schedule(cfg, tcfg),
        top_k=int(top_k), top_p=float(top_p), more_smooth=bool(more_smooth),
        decode=bool(decode))
