"""Class-conditional generation, one loop for every family.

Step ``si`` runs the transformer on the ``pn * pn`` tokens of scale ``si`` alone,
plus what the family carries between scales (``Family.init_state``): nothing
for MVAR, whose attention is Markovian in scale (only the VQVAE's accumulated
feature map ``f_hat`` links the scales, as the next scale's input); VAR's
fixed-size KV cache of every earlier scale; M-VAR's Mamba states.

Guidance, filtering and the Gumbel "more smooth" mode follow the official
samplers; randomness comes from one ``jax.random`` key (``generate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mvar_jax.checkpoint import ModelBundle, check_configs
from mvar_jax.models import families, kv_compression
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.transformer import Transformer, blocks_are_stacked, stack_cache
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig
from mvar_jax.sampling.filters import filter_logits, gumbel_softmax, tokens_from_uniform
from mvar_jax.sampling.options import SamplingOptions


def guidance_schedule(cfg: float, config: TransformerConfig) -> np.ndarray | None:
    """Per-scale classifier-free guidance weights ``(num_scales, 2)`` float32, or None.

    Row si holds ``(1 + t, t)`` with ``t = cfg * si / (num_scales - 1)``, so that
    ``logits = (1 + t) * cond - t * uncond``. The weights are computed in float64
    and rounded once, as PyTorch rounds the official Python scalars. At ``cfg == 1``
    MVAR's official sampler skips guidance (None: no unconditional half) while
    VAR's and M-VAR's still guide (t ramps to si / 9): ``Family.guides_at_cfg_one``.
    """
    if cfg == 1.0 and not families.get(config.family).guides_at_cfg_one:
        return None
    t = cfg * (np.arange(config.num_scales, dtype=np.float64) / (config.num_scales - 1))
    return np.stack([1 + t, t], axis=1).astype(np.float32)


class Samples(NamedTuple):
    """What ``generate`` returns."""

    tokens: jax.Array  # (B, L) int32, all scales concatenated.
    f_hat: jax.Array  # (B, h, w, Cvae) float32, the VQVAE features after the last scale.
    images: jax.Array | None  # (B, H, W, 3) float32 in [0, 1]; None with decode=False.


class Edit(NamedTuple):
    """A given image's tokens and where to keep them (``sampling.editing`` builds it)."""

    tokens: jax.Array  # (B, L) int32: the given images' tokens, all scales concatenated.
    keep: jax.Array  # (B, L) bool: True keeps the given token, False draws a new one.


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


def map_chunks(fn: Callable[..., Any], chunk: int, *xs: Any) -> Any:
    """``fn(*xs)`` computed on chunks of ``chunk`` along the leading axis, one after another.

    ``xs`` are pytrees (None passes through) whose leaves share the leading axis; ``fn``
    must act on each leading index independently; its outputs (a pytree with the
    leading axis) are concatenated. A single chunk is a plain call.
    """
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk >= n:
        return fn(*xs)
    full = n - n % chunk
    ys = jax.lax.map(
        lambda chunk_xs: fn(*chunk_xs),
        jax.tree.map(lambda x: x[:full].reshape(full // chunk, chunk, *x.shape[1:]), xs),
    )
    ys = jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), ys)
    if full == n:
        return ys
    rest = fn(*jax.tree.map(lambda x: x[full:], xs))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, rest)


def generate(
    vqvae_config: VQVAEConfig,
    transformer_config: TransformerConfig,
    vqvae_params: Any,
    transformer_params: Any,
    label_B: jax.Array,
    key: jax.Array,
    guidance_S2: jax.Array | None,
    options: SamplingOptions = SamplingOptions(),
    init_state: Callable[[TransformerConfig, int], Any] | None = None,
    edit: Edit | None = None,
) -> Samples:
    """Generates one image per label, coarse to fine; traceable, see ``sample`` for the jit.

    Args:
      label_B: int class labels in ``[0, num_classes)``; ``num_classes`` (the null
        class) draws unconditionally.
      key: a ``jax.random`` key: one uniform per token from its first split
        (``tokens_from_uniform``), more_smooth's noise from its second, folded
        in per scale and image.
      guidance_S2: ``guidance_schedule(options.cfg, transformer_config)``; None
        runs the conditional batch alone.
      options: everything else (``SamplingOptions``; its ``cfg`` is read from
        ``guidance_S2``). A family with no state between scales runs each scale
        on chunks of images (``options.chunk_tokens``); VAR and M-VAR run the
        whole batch at once, as their states hold every image anyway.
      init_state: the state the blocks start from, ``(config, batch) -> state``
        (default: the family's ``init_state``). ``m_var.init_rerun_cache`` runs
        M-VAR's official algorithm, re-running every Mamba layer over all
        earlier scales at each scale instead of carrying its state: the same
        samples at a higher cost, the reference of tests and benchmarks.
      edit: zero-shot editing (``sampling.editing``): at every scale, where
        ``edit.keep`` is set, the given image's token replaces the one drawn before
        the scale's features update ``f_hat`` and build the next scale's input, so
        every family's state (VAR's cache, M-VAR's Mamba state) sees the kept
        tokens. The returned tokens are the edited ones.

    Each image's rows are side by side in the transformer batch: (conditional,
    unconditional) with guidance. Results do not depend on the chunking.
    ``transformer_params`` may hold the blocks one by one (as the trainer does)
    or stacked (as ``checkpoint.load_model`` returns them): stacked blocks run
    as one ``lax.scan`` per scale.
    """
    tcfg, o = transformer_config, options
    family = families.of(tcfg)
    compression = compressed_cache(tcfg, o)
    stacked = blocks_are_stacked(transformer_params)
    vqvae, model = VQVAE(vqvae_config), Transformer(tcfg, scan_blocks=stacked)
    B, Cvae = label_B.shape[0], tcfg.cvae
    guided = guidance_S2 is not None
    rows = 2 if guided else 1
    if guided:  # The unconditional row of each image uses the null class.
        label_B = jnp.stack([label_B, jnp.full_like(label_B, tcfg.num_classes)], axis=1)
    x_RlC, cond_RD = model.apply(transformer_params, label_B.reshape(-1), method=Transformer.start_input)
    x_BrlC, cond_BrD = x_RlC.reshape(B, rows, *x_RlC.shape[1:]), cond_RD.reshape(B, rows, -1)
    if compression is not None:
        cache = kv_compression.init_cache(tcfg, B * rows, compression, rows)
    else:
        cache = (init_state or family.init_state)(tcfg, B * rows)
    if stacked:
        cache = stack_cache(cache)
    codebook_VC = None
    if o.more_smooth:
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
        edit_Bl = None if edit is None else Edit(edit.tokens[:, begin:end], edit.keep[:, begin:end])

        def scale_step(x_brlC, cond_brD, u_bl, image_b, edit_bl, cache, si=si, smooth_key=smooth_key):
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
            logits_blV = filter_logits(logits_blV, o.top_k, o.top_p)
            idx_bl = tokens_from_uniform(logits_blV, u_bl)
            if o.more_smooth:
                ratio = si / (tcfg.num_scales - 1)
                keys = jax.vmap(jax.random.fold_in, (None, 0))(smooth_key, image_b)
                soft_blV = jax.vmap(gumbel_softmax, (0, 0, None))(
                    keys, logits_blV * (1 + ratio), max(0.27 * (1 - 0.95 * ratio), 0.005)
                )
                h_blCv = soft_blV @ codebook_VC
            else:
                h_blCv = vqvae.apply(vqvae_params, idx_bl, method=VQVAE.embed_tokens)
            if edit_bl is not None:
                given_blCv = vqvae.apply(vqvae_params, edit_bl.tokens, method=VQVAE.embed_tokens)
                h_blCv = jnp.where(edit_bl.keep[..., None], given_blCv, h_blCv)
                idx_bl = jnp.where(edit_bl.keep, edit_bl.tokens, idx_bl)
            return idx_bl, h_blCv, cache

        if cache is None:
            chunk = images_per_chunk(B, rows * pn * pn, o.chunk_tokens)
            idx_Bl, h_BlCv, _ = map_chunks(
                lambda *xs: scale_step(*xs, None), chunk, x_BrlC, cond_BrD, u_Bl, image_B, edit_Bl
            )
        else:
            idx_Bl, h_BlCv, cache = scale_step(x_BrlC, cond_BrD, u_Bl, image_B, edit_Bl, cache)
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
    if o.decode:
        img = map_chunks(
            lambda f_hat: vqvae.apply(vqvae_params, f_hat, method=VQVAE.fhat_to_img),
            images_per_chunk(B, 1, o.decode_batch_size),
            f_hat_BhwC,
        )
        images = (img + 1) * 0.5
    return Samples(jnp.concatenate(tokens, axis=1), f_hat_BhwC, images)


def check_kv_cache(config: TransformerConfig) -> None:
    """ValueError unless the model's family keeps a KV cache to compress (VAR)."""
    family = families.of(config)
    if not family.state_in_place:
        raise ValueError(
            f"{family.title} keeps no KV cache between scales ({family.summary}); "
            "KV-cache compression is for VAR"
        )


def compressed_cache(
    config: TransformerConfig, options: SamplingOptions
) -> kv_compression.KVCompression | None:
    """``options.kv_compression`` when it compresses (ratio > 0), else None; ValueError for a
    family without a KV cache."""
    compression = options.kv_compression
    if compression is None or compression.ratio == 0:
        return None
    check_kv_cache(config)
    compression.head_kinds(config)  # head kinds of another model: an error naming it
    return compression


# ``generate`` compiled per static setting.
generate_jit = jax.jit(
    generate, static_argnames=("vqvae_config", "transformer_config", "options", "init_state")
)


def _check_labels(labels: Sequence[int] | np.ndarray | jax.Array, num_classes: int) -> np.ndarray:
    label_B = np.asarray(labels)
    if label_B.ndim != 1 or label_B.size == 0 or not np.issubdtype(label_B.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D array of ints, got {label_B!r}")
    bad = label_B[(label_B < 0) | (label_B > num_classes)]
    if bad.size:
        raise ValueError(
            f"labels {sorted(set(bad.tolist()))} are outside the model's {num_classes} classes "
            f"[0, {num_classes - 1}] and its null class {num_classes} (unconditional)"
        )
    return label_B.astype(np.int32)


def _check_edit(edit: Edit, batch: int, seq_len: int) -> Edit:
    shapes = {name: np.shape(x) for name, x in edit._asdict().items()}
    if any(shape != (batch, seq_len) for shape in shapes.values()):
        raise ValueError(f"edit arrays must be (labels, tokens per image) = {(batch, seq_len)}, got {shapes}")
    return Edit(jnp.asarray(edit.tokens, jnp.int32), jnp.asarray(edit.keep, bool))


def _arguments(model: ModelBundle, label_B: Any, key: Any, options: SamplingOptions) -> tuple:
    tcfg = model.transformer_config
    check_configs(model.vqvae_config, tcfg)
    guidance_S2 = guidance_schedule(options.cfg, tcfg)
    compressed_cache(tcfg, options)  # a family without a KV cache: the error before compiling
    return (model.vqvae_config, tcfg, model.vqvae_params, model.transformer_params, label_B, key, guidance_S2)


def sample(
    model: ModelBundle,
    labels: Sequence[int] | np.ndarray | jax.Array,
    key: jax.Array,
    options: SamplingOptions = SamplingOptions(),
    edit: Edit | None = None,
) -> Samples:
    """One image per label: checks the labels and the model, then runs the compiled ``generate``.

    ``model`` as ``checkpoint.load_model`` returns it (params checked against the
    configs, blocks stacked: the lean program). Compiles once per batch size,
    options, guidance on/off and editing on/off; the transformer's precision is
    ``model.transformer_config.dtype``. A label equal to ``num_classes`` draws
    unconditionally; ``edit`` (``sampling.editing``) keeps parts of given images.
    """
    tcfg = model.transformer_config
    label_B = _check_labels(labels, tcfg.num_classes)
    if edit is not None:
        edit = _check_edit(edit, len(label_B), tcfg.seq_len)
    return generate_jit(*_arguments(model, jnp.asarray(label_B), key, options), options, edit=edit)


def lower_sample(model: ModelBundle, batch_size: int, options: SamplingOptions = SamplingOptions()):
    """The program ``sample`` compiles for ``batch_size`` labels, lowered, not run: the model
    may hold ``jax.ShapeDtypeStruct`` params (``checkpoint.abstract_model``)."""
    label_B = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return generate_jit.lower(*_arguments(model, label_B, key, options), options)


def sample_batches(
    model: ModelBundle,
    labels_N: np.ndarray,
    seed: int,
    options: SamplingOptions = SamplingOptions(),
    *,
    batch_size: int,
    progress: bool = True,
    edit: Edit | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``sample`` over many labels: yields images ``(b, H, W, 3)`` float32 in [0, 1] (None
    without decode) and tokens ``(b, L)`` on the host, batch by batch.

    Batch b draws from ``fold_in(PRNGKey(seed), b)``: the same seed and batch size
    give the same images. The last batch is padded to the batch size so that one
    compilation serves all; batch b + 1 is dispatched before batch b is copied to
    the host, so the device never waits for the copy. ``edit`` holds one row per label.
    """
    batch_size = min(batch_size, len(labels_N))
    key = jax.random.PRNGKey(seed)
    starts = range(0, len(labels_N), batch_size)
    pending = None  # (samples on the device, number of real labels)
    bar = tqdm(starts, desc="sampling", unit="batch", disable=not progress or len(starts) == 1)

    def padded(x: np.ndarray, start: int) -> np.ndarray:  # the last batch repeats its last row
        rows = np.asarray(x)[start : start + batch_size]
        return np.pad(rows, [(0, batch_size - len(rows))] + [(0, 0)] * (rows.ndim - 1), mode="edge")

    for b, start in enumerate(bar):
        edit_B = None if edit is None else Edit(*(padded(x, start) for x in edit))
        out = sample(model, padded(labels_N, start), jax.random.fold_in(key, b), options, edit=edit_B)
        labels_B = labels_N[start : start + batch_size]
        if pending is not None:
            yield _to_host(*pending)
        pending = (out, len(labels_B))
    yield _to_host(*pending)


def _to_host(samples: Samples, n: int) -> tuple[np.ndarray | None, np.ndarray]:
    images = None if samples.images is None else np.asarray(samples.images)[:n]
    return images, np.asarray(samples.tokens)[:n]
