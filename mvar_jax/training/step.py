"""The generator's loss, metrics and train step of one segment.

The official loss weights every token by ``1 / L`` (``loss_weight``), with L the
length of the whole pyramid, whatever the segment: a step on the 13x13 scale sums
169 per-token cross-entropies and divides by 680, then averages over the batch.
Segments therefore contribute in proportion to their size, as in VAR.

Progressive training (``progressive.py``) adds a weight to the tokens of the newest
scale, ramping up over the steps after it arrives.

Gradient accumulation (the official ``--ac``) runs a step's batch as k micro-batches
one after another inside the step and averages their gradients: one update, the
batch's data, one micro-batch's activations in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mvar_jax.models.segments import Segment
from mvar_jax.models.transformer import Transformer
from mvar_jax.training import progressive
from mvar_jax.training.state import TrainState
from mvar_jax.training.task import Batch, Metrics, StepFn


def cross_entropy(logits_BlV: jax.Array, targets_Bl: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy ``(B, l)`` against ``(1 - s) one_hot + s / V`` (PyTorch's rule).

    Written with the log-sum-exp so no ``(B, l, V)`` one-hot is materialised.
    """
    logits_BlV = logits_BlV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits_BlV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BlV, targets_Bl[..., None], axis=-1)[..., 0]
    ce = lse - target_logit
    if label_smoothing:
        ce = (1 - label_smoothing) * ce + label_smoothing * (lse - logits_BlV.mean(axis=-1))
    return ce


def scale_parts(patch_nums: Sequence[int], segment: Segment) -> list[tuple[int, slice]]:
    """Each scale of the segment: its side and its tokens' slice of the segment's ``l`` axis."""
    parts, offset = [], 0
    for pn in patch_nums[segment.first_scale : segment.last_scale]:
        parts.append((pn, slice(offset, offset + pn * pn)))
        offset += pn * pn
    return parts


def scale_metrics(
    logits_BlV: jax.Array, targets_Bl: jax.Array, patch_nums: Sequence[int], segment: Segment
) -> Metrics:
    """Unsmoothed cross-entropy and accuracy (%) per scale of the segment, keyed by side."""
    ce_Bl = cross_entropy(logits_BlV, targets_Bl)
    hit_Bl = (logits_BlV.argmax(-1) == targets_Bl).astype(jnp.float32) * 100
    metrics = {}
    for pn, part in scale_parts(patch_nums, segment):
        metrics[f"ce/{pn}x{pn}"] = ce_Bl[:, part].mean()
        metrics[f"acc/{pn}x{pn}"] = hit_Bl[:, part].mean()
    return metrics


def validation_sums(
    model: Transformer, segments: Sequence[Segment], params: Any, batch: Batch, mask_B: jax.Array
) -> dict[str, jax.Array]:
    """Teacher-forced cross-entropy and accuracy (%) of every scale, summed over the examples
    ``mask_B`` keeps (each example's mean over the scale's tokens): ``ce_S``, ``acc_S`` ``(S,)``
    and ``count``. The segments (the family's training schedule) cover the pyramid; each runs
    as it trains, without dropout, as the official ``eval_ep`` pass does.
    """
    cfg = model.config
    weight_B = mask_B.astype(jnp.float32)
    ce, acc = [], []
    for segment in segments:
        begin, end = cfg.token_range(segment.first_scale, segment.last_scale)
        logits_BlV = model.apply(
            {"params": params},
            batch["label"],
            batch["x_BLCv"][:, max(begin - cfg.first_l, 0) : end - cfg.first_l],
            first_scale=segment.first_scale,
            last_scale=segment.last_scale,
        )
        targets_Bl = batch["tokens"][:, begin:end]
        ce_Bl = cross_entropy(logits_BlV, targets_Bl)
        hit_Bl = (logits_BlV.argmax(-1) == targets_Bl).astype(jnp.float32) * 100
        for _, part in scale_parts(cfg.patch_nums, segment):
            ce.append(weight_B @ ce_Bl[:, part].mean(-1))
            acc.append(weight_B @ hit_Bl[:, part].mean(-1))
    return {"ce_S": jnp.stack(ce), "acc_S": jnp.stack(acc), "count": weight_B.sum()}


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    segment: Segment,
    *,
    label_smoothing: float,
    grad_accum_steps: int = 1,
    ramp: progressive.Ramp | None = None,
) -> StepFn:
    """One optimizer step on scales ``segment`` (pure; jit it with the shardings).

    The batch holds ``label`` ``(B,)``, ``tokens`` ``(B, L)`` and ``x_BLCv``
    ``(B, L - first_l, Cvae)`` for the whole pyramid; the step slices its segment.
    With ``grad_accum_steps`` k > 1, micro-batch j holds examples j, j + k, j + 2k, ...
    (each device keeps its own examples) and draws its dropout with ``fold_in(rng, j)``;
    loss, gradients and metrics are the micro-batches' means, as the whole batch's.
    ``ramp``: the progressive stage's newest scale (the segment's last), whose tokens'
    loss weight grows with the step.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
    cfg = model.config
    begin, end = cfg.token_range(segment.first_scale, segment.last_scale)
    x_begin, x_end = max(begin - cfg.first_l, 0), end - cfg.first_l

    def loss_fn(params: Any, batch: Batch, rng: jax.Array, weight_l: jax.Array | None):
        logits_BlV = model.apply(
            {"params": params},
            batch["label"],
            batch["x_BLCv"][:, x_begin:x_end],
            first_scale=segment.first_scale,
            last_scale=segment.last_scale,
            train=True,
            rngs={"dropout": rng},
        )
        targets_Bl = batch["tokens"][:, begin:end]
        ce_Bl = cross_entropy(logits_BlV, targets_Bl, label_smoothing)
        if weight_l is not None:
            ce_Bl = ce_Bl * weight_l
        loss = ce_Bl.sum(axis=-1).mean() / cfg.seq_len
        return loss, (logits_BlV, targets_Bl)

    def loss_grads_metrics(
        params: Any, batch: Batch, rng: jax.Array, weight_l: jax.Array | None
    ) -> tuple[jax.Array, Any, Metrics]:
        (loss, (logits_BlV, targets_Bl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, rng, weight_l
        )
        return loss, grads, scale_metrics(logits_BlV, targets_Bl, cfg.patch_nums, segment)

    def accumulated(
        params: Any, batch: Batch, rng: jax.Array, weight_l: jax.Array | None
    ) -> tuple[jax.Array, Any, Metrics]:
        """The means over the micro-batches, run one after another (a scan)."""
        k = grad_accum_steps
        micro_kB = jax.tree.map(
            lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0), batch
        )

        def add_micro_batch(total, j_and_micro):
            j, micro = j_and_micro
            out = loss_grads_metrics(params, micro, jax.random.fold_in(rng, j), weight_l)
            return jax.tree.map(jnp.add, total, out), None

        first = jax.tree.map(lambda x: x[0], micro_kB)
        shapes = jax.eval_shape(loss_grads_metrics, params, first, rng, weight_l)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        total, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(k), micro_kB))
        return jax.tree.map(lambda t: t / k, total)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        run = loss_grads_metrics if grad_accum_steps == 1 else accumulated
        weight_l = progressive.token_weights(segment, ramp, cfg, state.step)
        loss, grads, scales = run(state.params, batch, rng, weight_l)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),  # before clipping, as logged officially
            "param_norm": optax.global_norm(params),
            "learning_rate": learning_rate(state.step),
            **scales,
        }
        if ramp is not None:
            metrics["progressive_weight"] = ramp.weight(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step
