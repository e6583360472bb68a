"""``build_train_source`` / ``build_eval_source``: the interface the trainer uses.

Images: ``{'image': (b, S, S, 3) uint8, 'label': (b,) int32}`` (``preprocess.to_pm1``
on the device gives the model's [-1, 1]).
With ``data.token_cache_dir``: ``{'tokens': (b, L) int32, 'label': (b,) int32}``.
Eval batches also carry ``'mask': (b,) bool``, False on padding and on images
that could not be read, since every host must run the same number of steps.
``b = global_batch_size // process_count``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mvar_jax.data import batching, config as config_lib, order, records, token_cache


def _host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    return global_batch_size // process_count


def _loader_and_spec(cfg: Any, role: str, seed: int | None) -> tuple[batching.LoadFn, batching.Spec, int]:
    """How to load one example of ``role``, its fields, and the split size."""
    label = {"label": ((), np.int32)}
    if cfg.token_cache_dir:
        cache = token_cache.TokenCache(cfg.token_cache_dir, role)
        cache.check_matches(cfg)
        load = token_cache.token_loader(cache, seed=seed, hflip=bool(cfg.hflip))
        return load, {"tokens": ((cache.seq_len,), np.int32), **label}, len(cache)
    load, n = records.image_loader_for(cfg, role, seed=seed)
    s = int(cfg.image_size)
    return load, {"image": ((s, s, 3), np.uint8), **label}, n


def _batch_source(
    data_cfg: Any, role: str, global_batch_size: int, process_count: int, seed: int | None
) -> tuple[Callable[[batching.Order], batching.BatchSource], int, int]:
    """``(make(order), num_examples, host_batch_size)``: the batches of ``role`` in an order."""
    config_lib.check_config(data_cfg)
    batch_size = _host_batch_size(global_batch_size, process_count)
    load, spec, n = _loader_and_spec(data_cfg, role, seed)

    def make(batch_order: batching.Order) -> batching.BatchSource:
        return batching.BatchSource(
            batch_order,
            load,
            spec,
            batch_size,
            num_workers=int(data_cfg.num_workers),
            prefetch=int(data_cfg.prefetch),
            with_mask=role == "eval",
        )

    return make, n, batch_size


def build_train_source(
    data_cfg: Any, *, global_batch_size: int, process_index: int, process_count: int, seed: int
) -> batching.BatchSource:
    """Endless, shuffled, augmented batches for this host; resumable via get/set_state."""
    make, n, _ = _batch_source(data_cfg, "train", global_batch_size, process_count, seed)
    return make(order.ShuffledEpochs(n, seed, process_index, process_count))


def build_eval_source(
    data_cfg: Any, *, global_batch_size: int, process_index: int, process_count: int
) -> batching.BatchSource:
    """One pass over the eval split in order (centre crop, no flip); ``reset()`` for another."""
    make, n, batch_size = _batch_source(data_cfg, "eval", global_batch_size, process_count, None)
    return make(order.SinglePass(n, batch_size, process_index, process_count))
