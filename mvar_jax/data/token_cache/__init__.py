"""Token ids of a dataset computed once (as the official ``main_cache.py`` does).

``python -m mvar_jax.data.token_cache`` (``__main__.py``) writes them with a
VQ-VAE; ``write_token_cache`` takes any encoder.

Training on the cache skips image decoding and the VQ-VAE encoder. Every image
is stored twice, as itself and as its horizontal flip, so the flip augmentation
survives caching; a source picks one per example per epoch from
``order.example_rng``, deterministically. Images go through the eval
preprocessing (centre crop), as upstream.

Layout of ``<cache_dir>/<role>/`` (role 'train' or 'eval'):
  meta.json                 what was cached (dataset, image size, crop, counts)
  chunk-000000.tokens.npy   (n, 2, L) int32: [:, 0] the image, [:, 1] its flip
  chunk-000000.labels.npy   (n,) int32, -1 where the image could not be read
Chunks hold ``chunk_size`` consecutive examples, so hosts can write disjoint
chunks in parallel and an interrupted run resumes at the first missing chunk.
Every file appears whole or not at all (``atomic_write``), a chunk's tokens after
its labels: a killed run leaves only ``*.incomplete-<pid>`` files and chunks
without tokens, which the next run writes again.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mvar_jax import faults, parallel
from mvar_jax.atomic_write import atomic_write
from mvar_jax.data import batching, order, preprocess, records

EncodeFn = Callable[[np.ndarray], np.ndarray]  # img (B, S, S, 3) uint8 -> ids (B, L) int32
_VERSION = 1
_META_FIELDS = ("name", "image_size", "crop", "mid_reso", "num_classes")


def _chunk_paths(split_dir: pathlib.Path, chunk: int) -> tuple[pathlib.Path, pathlib.Path]:
    stem = f"chunk-{chunk:06d}"
    return split_dir / f"{stem}.tokens.npy", split_dir / f"{stem}.labels.npy"


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    with atomic_write(path) as f:
        np.save(f, array)


def _expected_meta(cfg: Any, num_examples: int, chunk_size: int) -> dict[str, Any]:
    meta = {k: getattr(cfg, k) for k in _META_FIELDS}
    return {"version": _VERSION, **meta, "num_examples": num_examples, "chunk_size": chunk_size}


def sharded_encoder(
    tokenize: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    devices: list[jax.Device] | None = None,
) -> EncodeFn:
    """``tokenize(params, img_BHW3) -> ids_BL``, jitted with the batch split over ``devices``.

    Defaults to this host's devices: hosts cache disjoint chunks independently,
    so no step has to run in lock-step across hosts.
    """
    mesh = parallel.make_mesh(jax.local_devices() if devices is None else devices)
    batch = parallel.batch_sharding(mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    encode = jax.jit(tokenize, in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch)

    def encode_fn(img_BHW3: np.ndarray) -> np.ndarray:
        b = img_BHW3.shape[0]
        padded_BHW3 = np.pad(img_BHW3, [(0, -b % mesh.size)] + [(0, 0)] * (img_BHW3.ndim - 1))
        return np.asarray(encode(params, jax.device_put(padded_BHW3, batch)))[:b]

    return encode_fn


def vqvae_tokenize(vqvae: nn.Module) -> Callable[[Any, jax.Array], jax.Array]:
    """``(variables, uint8 img_BHW3) -> ids (B, L)`` of a ``mvar_jax.models.vqvae.VQVAE``: the
    per-scale ids of ``img_to_idx``, concatenated."""

    def tokenize(variables: Any, img_BHW3: jax.Array) -> jax.Array:
        ids = vqvae.apply(variables, preprocess.to_pm1(img_BHW3), method="img_to_idx")
        return jnp.concatenate(ids, axis=1)

    return tokenize


def _encode_chunk(
    examples: list[batching.Example | None],
    encode_fn: EncodeFn,
    batch_size: int,
    image_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``(n, 2, L)`` of the examples and their flips, and labels ``(n,)`` (-1: unreadable)."""
    tokens_N2L = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        # A fixed batch shape keeps the encoder to one compilation.
        img_BHW3 = np.zeros((batch_size, *image_shape), np.uint8)
        for i, ex in enumerate(part):
            if ex is not None:
                img_BHW3[i] = ex["image"]
        both = [encode_fn(img_BHW3), encode_fn(img_BHW3[:, :, ::-1])]
        for ids_BL in both:
            if (
                ids_BL.ndim != 2
                or ids_BL.shape[0] != batch_size
                or not np.issubdtype(ids_BL.dtype, np.integer)
            ):
                raise ValueError(
                    f"encode_fn must return integer ids (B={batch_size}, L), "
                    f"got {ids_BL.dtype} {ids_BL.shape}"
                )
        tokens_N2L.append(np.stack(both, axis=1)[: len(part)].astype(np.int32))
    labels_N = np.array([-1 if ex is None else ex["label"] for ex in examples], np.int32)
    return np.concatenate(tokens_N2L), labels_N


def write_token_cache(
    cfg: Any,
    encode_fn: EncodeFn,
    cache_dir: str | os.PathLike,
    role: str,
    *,
    batch_size: int = 64,
    chunk_size: int = 4096,
    process_index: int = 0,
    process_count: int = 1,
) -> pathlib.Path:
    """Encodes the ``role`` split of ``cfg``'s dataset; this host writes every
    ``process_count``-th chunk. Existing chunks are kept. Returns the split dir."""
    load, num_examples = records.image_loader_for(cfg, role, seed=None)
    split_dir = pathlib.Path(cache_dir) / role
    split_dir.mkdir(parents=True, exist_ok=True)
    meta = _expected_meta(cfg, num_examples, chunk_size)
    meta_path = split_dir / "meta.json"
    if meta_path.exists():
        if json.loads(meta_path.read_text()) != meta:
            raise ValueError(
                f"{split_dir} already holds a different cache ({meta_path.read_text()}); "
                f"this run would write {meta}. Use another cache_dir."
            )
    else:  # hosts may race here: each writes its own temporary file, then renames it
        with atomic_write(meta_path) as f:
            f.write(json.dumps(meta, indent=1).encode())

    s = int(cfg.image_size)
    num_chunks = -(-num_examples // chunk_size)
    with concurrent.futures.ThreadPoolExecutor(max(1, int(cfg.num_workers))) as pool:
        for chunk in range(process_index, num_chunks, process_count):
            tokens_path, labels_path = _chunk_paths(split_dir, chunk)
            if tokens_path.exists():
                continue
            indices = range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_examples))
            examples = list(pool.map(lambda i: load(i, 0), indices))
            tokens_N2L, labels_N = _encode_chunk(examples, encode_fn, batch_size, (s, s, 3))
            _save_atomic(labels_path, labels_N)
            faults.point("token-cache-chunk", chunk)
            _save_atomic(tokens_path, tokens_N2L)  # last: its presence marks the chunk done
            logging.info("cached %s chunk %d/%d", role, chunk + 1, num_chunks)
    return split_dir


class TokenCache:
    """Read-only, memory-mapped view of one cached split."""

    def __init__(self, cache_dir: str | os.PathLike, role: str):
        self.split_dir = pathlib.Path(cache_dir) / role
        meta_path = self.split_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no token cache at {self.split_dir} (missing meta.json); write it with "
                "`python -m mvar_jax.data.token_cache` (docs/data.md)"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("version") != _VERSION:
            raise ValueError(f"{meta_path} has cache version {self.meta.get('version')}, expected {_VERSION}")
        n, size = self.meta["num_examples"], self.meta["chunk_size"]
        num_chunks = -(-n // size)
        missing = [c for c in range(num_chunks) if not _chunk_paths(self.split_dir, c)[0].exists()]
        if missing:
            raise FileNotFoundError(
                f"token cache {self.split_dir} is incomplete: {len(missing)} of {num_chunks} "
                f"chunks missing (first: {missing[0]}); run the caching again to finish it"
            )
        self._tokens = [np.load(_chunk_paths(self.split_dir, c)[0], mmap_mode="r") for c in range(num_chunks)]
        self._labels_N = np.concatenate(
            [np.load(_chunk_paths(self.split_dir, c)[1]) for c in range(num_chunks)]
        )
        lengths = {t.shape[2] for t in self._tokens}
        if len(lengths) != 1 or len(self._labels_N) != n:
            raise ValueError(
                f"token cache {self.split_dir} is inconsistent: seq lengths {lengths}, "
                f"{len(self._labels_N)} labels for {n} examples"
            )
        self.seq_len = lengths.pop()
        self.num_classes = self.meta["num_classes"]

    def check_matches(self, cfg: Any) -> None:
        """Raises if the cache was made from another dataset or preprocessing than ``cfg``."""
        for k in _META_FIELDS:
            if self.meta[k] != getattr(cfg, k):
                raise ValueError(
                    f"token cache {self.split_dir} was made with {k}={self.meta[k]!r}, "
                    f"but data.{k}={getattr(cfg, k)!r}"
                )

    def __len__(self) -> int:
        return len(self._labels_N)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """Ids ``(2, L)`` (image, flipped image) and the label (-1: unreadable at caching)."""
        chunk, row = divmod(index, self.meta["chunk_size"])
        return np.asarray(self._tokens[chunk][row]), int(self._labels_N[index])


def token_loader(cache: TokenCache, *, seed: int | None, hflip: bool) -> batching.LoadFn:
    """Loads ``{'tokens': (L,) int32, 'label': () int32}``; the flipped ids with
    probability 1/2 when training with ``hflip``."""

    def load(index: int, epoch: int) -> batching.Example | None:
        ids_2L, label = cache.read(index)
        if label < 0:
            return None
        flip = hflip and seed is not None and order.example_rng(seed, epoch, index).random() < 0.5
        return {"tokens": ids_2L[int(flip)], "label": np.int32(label)}

    return load
