"""The sample sets the papers score: N class-conditional images drawn on every device of every
host, kept in parts that survive a kill, then one ADM-format ``.npz`` (and an image folder).

An image's identity does not depend on the devices. The labels split into sub-batches of
``batch_size`` images; sub-batch ``j`` is drawn by one device running ``sampling.generate`` on
its ``batch_size`` labels with the key ``fold_in(PRNGKey(seed), j)``, and a step hands each of
the D devices one sub-batch. So the same seed gives the same tokens on 1 device or 8 (the same
program per sub-batch; the decoder's sums may round differently across machines), and on one
device the same images as ``sampling.sample_batches`` with that batch size.

Each finished sub-batch is written as ``PARTS/part_<j>.npz`` (whole or not at all), beside
``spec.json``, the settings that drew them. A run killed at any moment resumes from the parts
it left, on any number of devices, and writes the same bytes as an uninterrupted run; a run
with other settings is refused instead of mixing two sets. The final files are streamed from
the parts, never held whole in memory (50,000 images of 256 px are 9.8 GB).

    parts = Parts(path, spec(model, labels_N, seed, options, batch_size))
    for sub in sub_batches(model, labels_N, seed, options, batch_size=64, skip=parts.done()):
        parts.write(sub)
    parts.finish(npz="samples.npz", image_folder=None)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mvar_jax import faults, parallel
from mvar_jax.atomic_write import atomic_write
from mvar_jax.checkpoint import ModelBundle, check_configs
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.sampling import SamplingOptions, generate, guidance_schedule

_PART = re.compile(r"part_(\d{6})\.npz")
SPEC_FILE = "spec.json"


class SubBatch(NamedTuple):
    """Sub-batch ``index`` of a set: its real images (padding dropped)."""

    index: int
    labels: np.ndarray  # (n,) int32
    tokens: np.ndarray  # (n, L) int32
    images_u8: np.ndarray  # (n, H, W, 3) uint8: clip(x * 255), truncated, as images.to_uint8
    images: np.ndarray | None  # (n, H, W, 3) float32 in [0, 1], when asked for


def official_labels(num_classes: int, num_per_class: int) -> np.ndarray:
    """The evaluation order of the papers' sample sets: ``num_per_class`` of class 0, then of 1, ..."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), num_per_class)


def spec(
    model: ModelBundle, labels_N: np.ndarray, seed: int, options: SamplingOptions, batch_size: int
) -> dict[str, Any]:
    """Everything that decides a set's images, as JSON: parts drawn under another spec differ."""
    drawing = dataclasses.asdict(options)
    for memory_only in ("chunk_tokens", "decode_batch_size"):  # the same images either way
        drawing.pop(memory_only)
    return json.loads(
        json.dumps(
            {
                "num_images": len(labels_N),
                "labels_sha256": hashlib.sha256(np.asarray(labels_N, np.int32).tobytes()).hexdigest(),
                "seed": seed,
                "batch_size": batch_size,
                "options": drawing,
                "transformer": dataclasses.asdict(model.transformer_config),
                "vqvae": dataclasses.asdict(model.vqvae_config),
                "params_sha256": _params_digest(model.transformer_params),
            }
        )
    )


def _params_digest(params: Any) -> str:
    """A digest of a few leaves' bytes: another checkpoint of the same config differs in them."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params)[:4]:
        digest.update(np.asarray(leaf).ravel()[:16384].tobytes())
    return digest.hexdigest()


@functools.cache  # one compilation per setting, as sampling.generate_jit's
def _sharded_program(
    vcfg: VQVAEConfig, tcfg: TransformerConfig, options: SamplingOptions, mesh: Mesh, float_images: bool
) -> Callable[..., tuple[jax.Array, ...]]:
    """``run((params, guidance), labels (D*b,), keys (D, 2))`` -> tokens, uint8 images (and float
    images) ``(D*b, ...)``, each device drawing its own sub-batch. The guidance schedule is an
    argument: ``options`` compare equal across cfg values, so one program serves them all."""

    def one_device(replicated, label_b, key_1K):
        (vqvae_params, transformer_params), guidance = replicated
        out = generate(vcfg, tcfg, vqvae_params, transformer_params, label_b, key_1K[0], guidance, options)
        images_u8 = jnp.clip(out.images * 255, 0, 255).astype(jnp.uint8)
        return (out.tokens, images_u8, out.images) if float_images else (out.tokens, images_u8)

    data = P(parallel.DATA_AXIS)
    return jax.jit(
        jax.shard_map(one_device, mesh=mesh, in_specs=(P(), data, data), out_specs=data, check_vma=False)
    )


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same on every process) as a global array laid out by ``sharding``."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _local_blocks(x: jax.Array, b: int) -> dict[int, np.ndarray]:
    """This process's per-device blocks of a ``(D*b, ...)`` array, by device position."""
    return {shard.index[0].indices(len(x))[0] // b: np.asarray(shard.data) for shard in x.addressable_shards}


def sub_batches(
    model: ModelBundle,
    labels_N: np.ndarray,
    seed: int,
    options: SamplingOptions,
    *,
    batch_size: int,
    skip: frozenset[int] = frozenset(),
    float_images: bool = False,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> Iterator[SubBatch]:
    """This process's sub-batches of ``labels_N`` not in ``skip``, in order, drawn on every
    device of ``mesh`` (default: all of them). A step whose sub-batches are all in ``skip`` is
    not run; step ``s + 1`` is dispatched before step ``s`` is copied to the host."""
    if not options.decode:
        raise ValueError("a sample set needs images: SamplingOptions(decode=True)")
    mesh = parallel.make_mesh() if mesh is None else mesh
    num_devices, b, n = mesh.size, batch_size, len(labels_N)
    num_sub = math.ceil(n / b)
    num_steps = math.ceil(num_sub / num_devices)
    real = {j: min(b, n - j * b) for j in range(num_sub)}  # images in sub-batch j
    todo = [j for j in real if j not in skip]
    # Padding repeats the last label, as sampling.sample_batches pads its last batch.
    padded_labels = np.pad(labels_N, (0, num_steps * num_devices * b - n), mode="edge")
    check_configs(model.vqvae_config, model.transformer_config)
    run = _sharded_program(model.vqvae_config, model.transformer_config, options, mesh, float_images)
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.DATA_AXIS))
    params, guidance = jax.tree.map(
        lambda x: _global(np.asarray(x), replicated),
        (
            (model.vqvae_params, model.transformer_params),
            guidance_schedule(options.cfg, model.transformer_config),
        ),
    )
    key, fold_in = jax.random.PRNGKey(seed), jax.jit(jax.vmap(jax.random.fold_in, (None, 0)))
    bar = tqdm(
        total=n,
        initial=n - sum(real[j] for j in todo),
        desc="sampling",
        unit="img",
        disable=not progress or jax.process_index() != 0,
    )

    def to_host(out: tuple[jax.Array, ...], js: np.ndarray) -> Iterator[SubBatch]:
        tokens, images_u8, *images = (_local_blocks(x, b) for x in out)
        for d in sorted(tokens):
            j = int(js[d])
            if j in real and j not in skip:
                k = real[j]
                float_block = images[0][d][:k] if images else None
                yield SubBatch(j, labels_N[j * b : j * b + k], tokens[d][:k], images_u8[d][:k], float_block)
        bar.update(sum(real.get(int(j), 0) for j in js if int(j) not in skip))

    pending = None
    for step in sorted({j // num_devices for j in todo}):
        js = step * num_devices + np.arange(num_devices)
        labels = _global(padded_labels[js[0] * b : (js[-1] + 1) * b], data)
        out = run((params, guidance), labels, _global(np.asarray(fold_in(key, js)), data))
        if pending is not None:
            yield from to_host(*pending)
        pending = (out, js)
    if pending is not None:
        yield from to_host(*pending)
    bar.close()


class Parts:
    """A directory of finished sub-batches (``part_<j>.npz``) and the spec that drew them.

    Every process writes its own sub-batches; the directory must be shared by the hosts.
    """

    def __init__(self, directory: str | os.PathLike, spec: dict[str, Any]):
        self.directory = pathlib.Path(directory)
        self.spec = spec
        spec_path = self.directory / SPEC_FILE
        if spec_path.is_file():
            held = json.loads(spec_path.read_text())
            differ = sorted(k for k in set(held) | set(spec) if held.get(k) != spec.get(k))
            if differ:
                raise ValueError(
                    f"{self.directory} holds the parts of another sample set (they differ in "
                    f"{', '.join(differ)}): draw with the same settings to resume it, or remove it"
                )
        elif jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_write(spec_path) as f:
                f.write(json.dumps(spec, indent=1).encode())
        _sync("sample-set-spec")

    def done(self) -> frozenset[int]:
        """The finished sub-batches, as process 0 sees them (every process gets the same set)."""
        found = np.zeros(self.num_sub_batches, np.int32)
        if jax.process_index() == 0:
            for path in self.directory.glob("part_*.npz"):
                match = _PART.fullmatch(path.name)
                if match and int(match[1]) < len(found):
                    found[int(match[1])] = 1
        if jax.process_count() > 1:
            found = np.asarray(multihost_utils.broadcast_one_to_all(found))
        return frozenset(np.flatnonzero(found).tolist())

    @property
    def num_sub_batches(self) -> int:
        return math.ceil(self.spec["num_images"] / self.spec["batch_size"])

    def _path(self, j: int) -> pathlib.Path:
        return self.directory / f"part_{j:06d}.npz"

    def write(self, sub: SubBatch) -> None:
        with atomic_write(self._path(sub.index)) as f:
            np.savez(f, images=sub.images_u8, labels=sub.labels, tokens=sub.tokens)
        faults.point("sample-set-part", sub.index)

    def read(self, j: int) -> dict[str, np.ndarray]:
        with np.load(self._path(j)) as f:
            return {k: f[k] for k in ("images", "labels", "tokens")}

    def finish(self, *, npz: str | os.PathLike | None, image_folder: str | os.PathLike | None) -> None:
        """Once every process has written its parts: process 0 streams them into ``npz``
        (ADM's layout: ``arr_0`` uint8 ``(N, H, W, 3)``, ``arr_1`` labels) and ``image_folder``
        (``<i>.png``), then removes the parts."""
        _sync("sample-set-parts")
        missing = sorted(set(range(self.num_sub_batches)) - self.done())
        if missing:
            raise RuntimeError(f"{self.directory}: parts {missing[:8]} were never written")
        if jax.process_index() == 0:
            if npz is not None:
                self._write_npz(pathlib.Path(npz))
            if image_folder is not None:
                self._write_folder(pathlib.Path(image_folder))
            shutil.rmtree(self.directory)
        _sync("sample-set-done")

    def _write_npz(self, path: pathlib.Path) -> None:
        first = self.read(0)["images"]
        shape = (self.spec["num_images"], *first.shape[1:])
        labels = []
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            with z.open(_member("arr_0.npy"), "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(first.dtype),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_2_0(member, header)
                for j in tqdm(
                    range(self.num_sub_batches), desc=f"writing {path.name}", unit="part", leave=False
                ):
                    part = self.read(j)
                    member.write(np.ascontiguousarray(part["images"]).tobytes())
                    labels.append(part["labels"])
            buffer = io.BytesIO()
            np.save(buffer, np.concatenate(labels))
            z.writestr(_member("arr_1.npy"), buffer.getvalue())
        print(f"wrote arr_0 {shape} uint8 and arr_1 (labels) to {path}")

    def _write_folder(self, folder: pathlib.Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        b = self.spec["batch_size"]
        for j in tqdm(range(self.num_sub_batches), desc=f"writing {folder.name}/", unit="part", leave=False):
            for i, image in enumerate(self.read(j)["images"]):
                with atomic_write(folder / f"{j * b + i:06d}.png") as f:
                    PIL.Image.fromarray(image).save(f, format="PNG")
        print(f"wrote {self.spec['num_images']} images to {folder}/")


def _member(name: str) -> zipfile.ZipInfo:
    """A zip member stamped with a fixed time (zip's earliest), so that a set's bytes depend on its
    images alone, not on when it was written."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
