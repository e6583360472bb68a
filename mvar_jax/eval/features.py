"""Inception features of many images: batched, data-parallel over every local device.

Every batch is padded to the batch size, a multiple of the device count (one compiled shape
for the whole run), split along its first axis over a one-axis mesh of the local devices, and
run against replicated parameters; the padding rows are dropped on the way back. The next batch is
dispatched before the previous one's features are copied to the host, so reading the file
overlaps the computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from mvar_jax import parallel
from mvar_jax.models.inception import InceptionOutputs, InceptionV3


@functools.cache
def _compiled_inception(mesh: Mesh) -> Callable[[dict, jax.Array], InceptionOutputs]:
    """``InceptionV3().apply`` jitted over ``mesh``, one per mesh: later extractors on the same
    devices (the reference batch, another run in this process) reuse its compilations."""
    batch = parallel.batch_sharding(mesh)
    return jax.jit(InceptionV3().apply, in_shardings=(parallel.replicated(mesh), batch), out_shardings=batch)


class FeatureExtractor:
    """``InceptionV3`` over a mesh of the local devices, ``batch_size`` images per call (rounded
    up to a multiple of the device count)."""

    def __init__(self, params: dict, batch_size: int):
        self.mesh = parallel.make_mesh(jax.local_devices())
        n = self.mesh.size
        self.batch_size = -(-batch_size // n) * n
        self._batch_sharding = parallel.batch_sharding(self.mesh)
        self._params = jax.device_put(params, parallel.replicated(self.mesh))
        self._apply = _compiled_inception(self.mesh)

    def _dispatch(self, images_bHW3: np.ndarray) -> InceptionOutputs:
        pad = self.batch_size - len(images_bHW3)
        padded = np.pad(images_bHW3, ((0, pad), (0, 0), (0, 0), (0, 0))) if pad else images_bHW3
        return self._apply(self._params, jax.device_put(padded, self._batch_sharding))

    def __call__(self, batches: Iterable[np.ndarray], total: int, desc: str) -> InceptionOutputs:
        """Features of every image in ``batches`` (each at most ``batch_size`` images; ``total`` in
        all, for the progress bar), as float32 numpy ``InceptionOutputs`` of ``total`` rows."""
        parts: list[InceptionOutputs] = []
        pending: tuple[InceptionOutputs, int] | None = None
        with tqdm(total=total, desc=desc, unit="img") as bar:

            def collect(outputs: InceptionOutputs, n: int) -> None:
                parts.append(InceptionOutputs(*(np.asarray(x)[:n] for x in outputs)))
                bar.update(n)

            for images in batches:
                if len(images) > self.batch_size:
                    raise ValueError(f"a batch of {len(images)} images; at most {self.batch_size}")
                outputs = self._dispatch(images)
                if pending is not None:
                    collect(*pending)
                pending = (outputs, len(images))
            if pending is not None:
                collect(*pending)
        return InceptionOutputs(*(np.concatenate(x) for x in zip(*parts)))
