"""Class-conditional generation for MVAR (no KV cache), VAR (KV cache) and M-VAR (Mamba states).

MVAR's attention is Markovian in scale, so step ``si`` runs the transformer on the
``pn * pn`` tokens of scale ``si`` alone: nothing from earlier scales is kept besides
the VQVAE's accumulated feature map ``f_hat``, which also feeds the next scale's
input. VAR attends to every earlier scale and keeps their keys/values in the
transformer's fixed-size cache. M-VAR also runs scale ``si``'s tokens alone, its
Mamba layers advancing a fixed-size state carried from the previous scale.

Guidance, filtering and the Gumbel "more smooth" mode follow the official
samplers; randomness comes from one ``jax.random`` key (``generate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.checkpoint import ModelBundle, check_configs
from mvar_jax.models import m_var
from mvar_jax.models.transformer import (
    Transformer,
    TransformerConfig,
    blocks_are_stacked,
    init_kv_cache,
    stack_blocks,
    stack_cache,
)
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig

# Images the VQVAE decodes at a time (generate's decode_batch_size).
from mvar_jax.sampling.filters import check_filters, filter_logits, gumbel_softmax, tokens_from_uniform

DECODE_BATCH_SIZE = 4
# Tokens per chunk of MVAR's per-scale work (generate's chunk_tokens): 16x16 maps of
# 16 guided images, matmuls of 8192 rows, still large enough for an accelerator.
CHUNK_TOKENS = 8192


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


def images_per_chunk(batch: int, tokens_per_image: int, chunk_tokens: int) -> int:
    """Images per chunk: at most ``chunk_tokens`` tokens, preferring a divisor of the batch.

    A divisor of the batch makes equal chunks (one compiled body); when the
    largest divisor is under half the budget, the budget wins and the remainder
    runs as one more, smaller chunk.
    """
    most = max(1, chunk_tokens // tokens_per_image)
    if most >= batch:
        return batch
    divisor = max(d for d in range(1, most + 1) if batch % d == 0)
    return divisor if 2 * divisor >= most else most


def map_chunks(fn: Callable[..., Any], chunk: int, *xs: jax.Array) -> Any:
    """``fn(*xs)`` computed on chunks of ``chunk`` along the leading axis, one after another.

    ``fn`` must act on each leading index independently; its outputs (a pytree
    with the leading axis) are concatenated. A single chunk is a plain call.
    """
    n = xs[0].shape[0]
    if chunk >= n:
        return fn(*xs)
    full = n - n % chunk
    ys = jax.lax.map(
        lambda chunk_xs: fn(*chunk_xs),
        tuple(x[:full].reshape(full // chunk, chunk, *x.shape[1:]) for x in xs),
    )
    ys = jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), ys)
    if full == n:
        return ys
    rest = fn(*(x[full:] for x in xs))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, rest)


def generate(
    vqvae_config: VQVAEConfig,
    transformer_config: TransformerConfig,
    vqvae_params: Any,
    transformer_params: Any,
    label_B: jax.Array,
    key: jax.Array,
    guidance_S2: jax.Array | None,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    more_smooth: bool = False,
    decode: bool = True,
    decode_batch_size: int = DECODE_BATCH_SIZE,
    chunk_tokens: int = CHUNK_TOKENS,
    mamba_rerun: bool = False,
) -> Samples:
    """Generates one image per label, coarse to fine; traceable, see ``sample`` for the jit.

    Args:
      label_B: int class labels in ``[0, num_classes)``.
      key: a ``jax.random`` key: one uniform per token from its first split
        (``tokens_from_uniform``), more_smooth's noise from its second, folded
        in per scale and image.
      guidance_S2: ``guidance_schedule(cfg, transformer_config)``; None runs the
        conditional batch alone.
      top_k, top_p: logit filters (0 disables); ``top_k=1`` is greedy.
      more_smooth: feed the next scale a Gumbel-softmax mix of codebook entries
        instead of the sampled entry (the official visualisation mode).
      decode: decode f_hat to images (off for token-only benchmarks).
      decode_batch_size: images decoded at a time, one chunk after another, so
        that the VQVAE decoder's full-resolution activations never set the peak.
      chunk_tokens: MVAR runs each scale's transformer, head and token draw on
        chunks of images of at most this many tokens (both guidance rows
        counted), one chunk after another: its scales keep nothing per image
        but f_hat, so memory is one chunk's activations. VAR and M-VAR run the
        whole batch at once, as their caches hold every image anyway.
      mamba_rerun: M-VAR only: the official algorithm, re-running every Mamba
        layer over all earlier scales at each scale instead of carrying its state
        (the same samples at a higher cost; the reference of tests and benchmarks).

    Each image's rows are side by side in the transformer batch: (conditional,
    unconditional) with guidance. Results do not depend on the chunking.
    ``transformer_params`` may hold the blocks one by one (as checkpoints do) or
    stacked (``prepare``): stacked blocks run as one ``lax.scan`` per scale.
    """
    tcfg = transformer_config
    stacked = blocks_are_stacked(transformer_params)
    vqvae, model = VQVAE(vqvae_config), Transformer(tcfg, scan_blocks=stacked)
    B, Cvae = label_B.shape[0], tcfg.cvae
    guided = guidance_S2 is not None
    rows = 2 if guided else 1
    if guided:  # The unconditional row of each image uses the null class.
        label_B = jnp.stack([label_B, jnp.full_like(label_B, tcfg.num_classes)], axis=1)
    x_RlC, cond_RD = model.apply(transformer_params, label_B.reshape(-1), method=Transformer.start_input)
    x_BrlC, cond_BrD = x_RlC.reshape(B, rows, *x_RlC.shape[1:]), cond_RD.reshape(B, rows, -1)
    cache = (m_var.init_rerun_cache if mamba_rerun else init_kv_cache)(tcfg, B * rows)  # None for MVAR.
    if stacked:
        cache = stack_cache(cache)
    codebook_VC = None
    if more_smooth:
        codebook_VC = vqvae.apply(vqvae_params, jnp.arange(tcfg.vocab_size)[None], method=VQVAE.embed_tokens)[
            0
        ]
    side = tcfg.patch_nums[-1]
    f_hat_BhwC = jnp.zeros((B, side, side, Cvae), jnp.float32)
    image_B = jnp.arange(B)
    token_key, smooth_keys = jax.random.split(key)
    # One uniform in (0, 1] per token of every scale, drawn at once: one RNG kernel.
    u_BL = 1.0 - jax.random.uniform(token_key, (B, tcfg.seq_len))

    tokens, next_BlCv = [], None  # next_BlCv: the input of the scale after this one
    for si, pn in enumerate(tcfg.patch_nums):
        if si > 0:
            x_BlC = model.apply(transformer_params, next_BlCv, si, method=Transformer.scale_input)
            x_BrlC = x_BlC[:, None]  # Both rows of an image see the same input.
        begin, end = tcfg.token_range(si, si + 1)
        u_Bl = u_BL[:, begin:end]
        smooth_key = jax.random.fold_in(smooth_keys, si)

        def scale_step(x_brlC, cond_brD, u_bl, image_b, cache, si=si, smooth_key=smooth_key):
            """Tokens and their embeddings ``(b, l, Cvae)`` for a chunk of b images."""
            b, l = u_bl.shape
            x_brlC = jnp.broadcast_to(x_brlC, (b, rows, l, x_brlC.shape[-1]))
            # Only this scale's tokens enter the model (plus VAR's cache).
            logits_RlV, cache = model.apply(
                transformer_params,
                x_brlC.reshape(b * rows, l, -1),
                cond_brD.reshape(b * rows, -1),
                si,
                cache,
                method=Transformer.scale_logits,
            )
            logits_brlV = logits_RlV.reshape(b, rows, l, -1)
            if guided:
                logits_blV = guidance_S2[si, 0] * logits_brlV[:, 0] - guidance_S2[si, 1] * logits_brlV[:, 1]
            else:
                logits_blV = logits_brlV[:, 0]
            logits_blV = filter_logits(logits_blV, top_k, top_p)
            idx_bl = tokens_from_uniform(logits_blV, u_bl)
            if more_smooth:
                ratio = si / (tcfg.num_scales - 1)
                keys = jax.vmap(jax.random.fold_in, (None, 0))(smooth_key, image_b)
                soft_blV = jax.vmap(gumbel_softmax, (0, 0, None))(
                    keys, logits_blV * (1 + ratio), max(0.27 * (1 - 0.95 * ratio), 0.005)
                )
                h_blCv = soft_blV @ codebook_VC
            else:
                h_blCv = vqvae.apply(vqvae_params, idx_bl, method=VQVAE.embed_tokens)
            return idx_bl, h_blCv, cache

        if cache is None:
            chunk = images_per_chunk(B, rows * pn * pn, chunk_tokens)
            idx_Bl, h_BlCv, _ = map_chunks(
                lambda *xs: scale_step(*xs, None), chunk, x_BrlC, cond_BrD, u_Bl, image_B
            )
        else:
            idx_Bl, h_BlCv, cache = scale_step(x_BrlC, cond_BrD, u_Bl, image_B, cache)
        tokens.append(idx_Bl)
        f_hat_BhwC, next_BhwC = vqvae.apply(
            vqvae_params,
            si,
            f_hat_BhwC,
            h_BlCv.reshape(B, pn, pn, Cvae),
            method=VQVAE.next_autoregressive_input,
        )
        next_BlCv = next_BhwC.reshape(B, -1, Cvae)

    images = None
    if decode:
        img = map_chunks(
            lambda f_hat: vqvae.apply(vqvae_params, f_hat, method=VQVAE.fhat_to_img),
            images_per_chunk(B, 1, decode_batch_size),
            f_hat_BhwC,
        )
        images = (img + 1) * 0.5
    return Samples(jnp.concatenate(tokens, axis=1), f_hat_BhwC, images)


# ``generate`` compiled per static setting; benches lower it with abstract inputs.
generate_jit = jax.jit(
    generate,
    static_argnames=(
        "vqvae_config",
        "transformer_config",
        "top_k",
        "top_p",
        "more_smooth",
        "decode",
        "decode_batch_size",
        "chunk_tokens",
        "mamba_rerun",
    ),
)


def sample(
    model: ModelBundle,
    labels: Sequence[int] | np.ndarray | jax.Array,
    key: jax.Array,
    *,
    cfg: float = 1.5,
    top_k: int = 0,
    top_p: float = 0.0,
    more_smooth: bool = False,
    decode: bool = True,
    decode_batch_size: int = DECODE_BATCH_SIZE,
    chunk_tokens: int = CHUNK_TOKENS,
) -> Samples:
    """Checks the labels and that the configs fit together, then runs the compiled ``generate``.

    The params must have the configs' shapes, as ``checkpoint.load_model`` ensures.

    Compiles once per batch size, set of options and guidance on/off; the value
    of ``cfg`` is an input, so changing it re-uses the compilation (unless MVAR
    moves to or from ``cfg == 1``, which drops the unconditional half). The
    transformer's precision is ``model.transformer_config.dtype``. A model from
    ``prepare`` compiles several times faster (its blocks are scanned).
    """
    tcfg = model.transformer_config
    check_configs(model.vqvae_config, tcfg)
    label_B = np.asarray(labels)
    if label_B.ndim != 1 or label_B.size == 0 or not np.issubdtype(label_B.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D array of ints, got {label_B!r}")
    bad = label_B[(label_B < 0) | (label_B >= tcfg.num_classes)]
    if bad.size:
        raise ValueError(
            f"labels {sorted(set(bad.tolist()))} are outside the model's "
            f"{tcfg.num_classes} classes [0, {tcfg.num_classes - 1}]"
        )
    check_filters(top_k, top_p)
    if decode_batch_size < 1 or chunk_tokens < 1:
        raise ValueError(
            f"decode_batch_size and chunk_tokens must be >= 1, got {decode_batch_size}, {chunk_tokens}"
        )
    return generate_jit(
        model.vqvae_config,
        tcfg,
        model.vqvae_params,
        model.transformer_params,
        jnp.asarray(label_B, jnp.int32),
        key,
        guidance_schedule(cfg, tcfg),
        top_k=int(top_k),
        top_p=float(top_p),
        more_smooth=bool(more_smooth),
        decode=bool(decode),
        decode_batch_size=int(decode_batch_size),
        chunk_tokens=int(chunk_tokens),
    )


def prepare(model: ModelBundle) -> ModelBundle:
    """The bundle as ``sample`` runs it best: the transformer's blocks stacked.

    Stacked blocks run as one ``lax.scan`` per scale: they compile once per
    scale rather than once per block and scale, and only one block's weight
    casts and activations are live at a time. The stacked weights are a copy:
    drop the original bundle to free its memory.
    """
    if blocks_are_stacked(model.transformer_params):
        return model
    return model._replace(
        transformer_params=stack_blocks(model.transformer_params, model.transformer_config.depth)
    )
