"""HACK's offline head classification: which of VAR's attention heads are contextual, which structural.

A contextual head's queries all attend the same few earlier tokens (a vertical
stripe in the attention matrix); a structural head's queries attend by relative
position (diagonals). The statistic is the variance down each column of a head's
attention over the cached (earlier-scale) tokens, normalised by its largest possible
value: for a column of mean m, a variance across queries is at most m (1 - m), so

    stat = sum_j var_i(A_ij) / sum_j m_j (1 - m_j)

is 0 when every query attends alike and 1 when each attends one token of its own.
A head's figure is the mean over scales 2..S-1 (scale 2 has five earlier tokens) and
over the calibration images; in each block, the ``contextual_fraction`` of its heads
with the lowest figures are contextual. Splitting each block alike keeps one static
shape for all blocks, which the sampler scans (``models.kv_compression``). The paper
names the statistic (column variance) but not its normalisation or the split; these
are ours.

The calibration draws images with the plain sampler, then teacher-forces their tokens
on the conditional class (the attention the sampler's conditional row computes) and
reads every block's scaled queries and keys (``layers.SelfAttention`` sows them).
The result lives beside the model: ``head_kinds.json`` in its directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mvar_jax.atomic_write import atomic_write
from mvar_jax.checkpoint import ModelBundle
from mvar_jax.errors import CheckpointError
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.transformer import Transformer, blocks_are_stacked, unstack_blocks
from mvar_jax.models.vqvae import VQVAE, split_scales
from mvar_jax.sampling.options import SamplingOptions
from mvar_jax.sampling.sampler import sample_batches

FILE_NAME = "head_kinds.json"
FORMAT = 1
FIRST_SCALE = 2  # the first scale whose history (the first two scales) has more than one token


def calibrate_command(directory: str | os.PathLike) -> str:
    return f"python -m mvar_jax.hack --checkpoint {directory} --calibrate"


def column_variance(scaled_q_BLhd: jax.Array, k_BLhd: jax.Array, config: TransformerConfig) -> jax.Array:
    """``(B, heads)``: each head's normalised column variance (module docstring), averaged over
    scales ``FIRST_SCALE``.. of the pyramid; q already carries the logit scale."""
    per_scale = []
    for si in range(FIRST_SCALE, config.num_scales):
        begin, end = config.token_range(si, si + 1)
        logits = jnp.einsum(
            "bqhd,bkhd->bhqk",
            scaled_q_BLhd[:, begin:end],
            k_BLhd[:, :begin],
            preferred_element_type=jnp.float32,
        )
        probs = jax.nn.softmax(logits, axis=-1)  # over the cached tokens alone
        mean = probs.mean(axis=2)
        variance = probs.var(axis=2)
        per_scale.append(variance.sum(-1) / jnp.maximum((mean * (1 - mean)).sum(-1), 1e-12))
    return jnp.mean(jnp.stack(per_scale), axis=0)


@functools.partial(jax.jit, static_argnames=("vqvae_config", "config"))
def _batch_statistics(vqvae_config, config, vqvae_params, params, label_B, tokens_BL) -> jax.Array:
    """``(depth, B, heads)`` column variances of teacher-forced tokens."""
    x_BLCv = VQVAE(vqvae_config).apply(
        vqvae_params, split_scales(tokens_BL, config.patch_nums), method=VQVAE.idx_to_var_input
    )
    _, state = Transformer(config).apply(
        params, label_B, x_BLCv, first_scale=0, last_scale=config.num_scales, mutable=["intermediates"]
    )
    blocks = state["intermediates"]
    return jnp.stack(
        [
            column_variance(*blocks[f"blocks_{i}"]["attn"]["scaled_q_k"][0], config)
            for i in range(config.depth)
        ]
    )


def head_statistics(
    model: ModelBundle,
    *,
    num_samples: int = 50,
    seed: int = 0,
    batch_size: int = 16,
    options: SamplingOptions = SamplingOptions(decode=False),
    progress: bool = True,
) -> np.ndarray:
    """``(depth, heads)``: every head's column variance over ``num_samples`` images of the
    model's classes in turn (class i % num_classes), drawn with ``options``."""
    tcfg = model.transformer_config
    if tcfg.num_scales <= FIRST_SCALE:
        raise ValueError(
            f"head kinds need at least {FIRST_SCALE + 1} scales, the model has {tcfg.num_scales}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    labels_N = np.arange(num_samples, dtype=np.int32) % tcfg.num_classes
    params = model.transformer_params
    if blocks_are_stacked(params):
        params = unstack_blocks(params)
    totals = np.zeros((tcfg.depth, tcfg.num_heads))
    # The tokens are all the calibration reads: no decoding, the full cache.
    options = dataclasses.replace(options, decode=False, kv_compression=None)
    batches = sample_batches(model, labels_N, seed, options, batch_size=batch_size, progress=False)
    start = 0
    total = -(-num_samples // batch_size)
    for _, tokens in tqdm(batches, desc="calibrating", unit="batch", total=total, disable=not progress):
        labels = labels_N[start : start + len(tokens)]
        start += len(tokens)
        stats = _batch_statistics(
            model.vqvae_config, tcfg, model.vqvae_params, params, jnp.asarray(labels), jnp.asarray(tokens)
        )
        totals += np.asarray(stats, np.float64).sum(axis=1)
    return totals / num_samples


def classify(statistics: np.ndarray, contextual_fraction: float) -> np.ndarray:
    """``(depth, heads)`` bool, True for a contextual head: in each block, the
    ``round(contextual_fraction * heads)`` heads of lowest column variance (ties to the earlier)."""
    if not 0 <= contextual_fraction <= 1:
        raise ValueError(f"contextual_fraction={contextual_fraction} must be in [0, 1]")
    count = round(contextual_fraction * statistics.shape[1])
    order = np.argsort(statistics, axis=1, kind="stable")[:, :count]
    contextual = np.zeros(statistics.shape, bool)
    np.put_along_axis(contextual, order, True, axis=1)
    return contextual


def save(
    directory: str | os.PathLike, statistics: np.ndarray, contextual: np.ndarray, settings: dict[str, Any]
) -> pathlib.Path:
    path = pathlib.Path(directory) / FILE_NAME
    record = {
        "format": FORMAT,
        "statistic": "normalised column variance of the attention over earlier scales (sampling.head_kinds)",
        "settings": settings,
        "column_variance": np.round(statistics, 6).tolist(),
        "contextual": contextual.tolist(),
    }
    with atomic_write(path) as f:
        f.write(json.dumps(record, indent=1).encode())
    return path


def load(directory: str | os.PathLike, config: TransformerConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(column_variance, contextual)`` stored in a model directory, checked against its config;
    CheckpointError naming the calibration command when there are none."""
    path = pathlib.Path(directory) / FILE_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {FILE_NAME} (HACK's head kinds): run `{calibrate_command(directory)}` first"
        )
    try:
        record = json.loads(path.read_text())
        statistics = np.asarray(record["column_variance"], np.float64)
        contextual = np.asarray(record["contextual"], bool)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path} is not a head-kinds file ({e}): run `{calibrate_command(directory)}`"
        ) from e
    if record.get("format") != FORMAT or contextual.shape != (config.depth, config.num_heads):
        raise CheckpointError(
            f"{path} holds head kinds of shape {contextual.shape}, format {record.get('format')}; the model "
            f"has {config.depth} blocks of {config.num_heads} heads: run `{calibrate_command(directory)}`"
        )
    return statistics, contextual


def as_flags(contextual: np.ndarray) -> tuple[tuple[bool, ...], ...]:
    """The hashable form ``KVCompression.contextual`` takes."""
    return tuple(tuple(bool(c) for c in block) for block in contextual)


def summary(statistics: np.ndarray, contextual: np.ndarray) -> str:
    """One line per block: each head's kind (C contextual, S structural) and figure."""
    lines = [
        f"block {i:>2}: "
        + " ".join(f"{'C' if c else 'S'}{s:.2f}" for s, c in zip(stats, kinds))
        + f"   ({int(kinds.sum())} contextual)"
        for i, (stats, kinds) in enumerate(zip(statistics, contextual))
    ]
    mean = {
        kind: float(statistics[mask].mean()) if mask.any() else float("nan")
        for kind, mask in (("contextual", contextual), ("structural", ~contextual))
    }
    lines.append(
        f"{int(contextual.sum())} of {contextual.size} heads contextual (in each block, the lowest column "
        f"variance); mean column variance: contextual {mean['contextual']:.3f}, "
        f"structural {mean['structural']:.3f}"
    )
    return "\n".join(lines)
