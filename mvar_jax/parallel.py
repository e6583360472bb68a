"""Device mesh and shardings: data parallelism, optional FSDP, multi-host start-up.

One mesh axis, ``'data'``, spans every device of every host. Batches are split
along it; parameters and optimizer state are either replicated (plain data
parallelism) or, for the large models, split FSDP-style along their largest axis
that the device count divides. ``jax.jit`` inserts the collectives.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(cfg: ml_collections.ConfigDict | types.SimpleNamespace) -> None:
    """Joins a multi-host job when ``cfg.enabled`` (``config.parallel.distributed``'s fields);
    must run before any other JAX call.

    Empty address / negative counts are left to ``jax.distributed.initialize``'s
    auto-detection (SLURM, Cloud TPU, ...).
    """
    if not cfg.enabled:
        return
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes if cfg.num_processes > 0 else None,
        process_id=cfg.process_id if cfg.process_id >= 0 else None,
    )


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
    """Splits the largest axis that ``num_shards`` divides; small or indivisible arrays stay whole.

    Ties go to the earlier axis, so a square matrix is split by rows.
    """
    if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [(size, -axis) for axis, size in enumerate(shape) if size % num_shards == 0]
    if not divisible:
        return P()
    axis = -max(divisible)[1]
    return P(*([None] * axis + [DATA_AXIS]))


def state_shardings(tree: Any, mesh: Mesh, *, fsdp: bool, min_size: int = 2**16) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s).

    The rule looks only at shapes, so parameters and their Adam moments land on
    the same devices.
    """

    def leaf_sharding(x):
        if not fsdp:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(np.shape(x), mesh.size, min_size))

    return jax.tree.map(leaf_sharding, tree)


def jit_train_step(
    step_fn: Callable[[Any, Any], tuple[Any, Any]], state_shardings: Any, mesh: Mesh
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """``step_fn(state, batch) -> (state, metrics)`` compiled over ``mesh``.

    The state keeps ``state_shardings`` and is donated (the old one is dead after the
    step), the batch is split along ``'data'``, the metrics come back replicated.
    """
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and hosts."""
    if global_batch_size % mesh.size:
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the number of devices ({mesh.size})"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by the number of hosts ({jax.process_count()})"
        )


def host_batch_to_global(
    batch: Mapping[str, np.ndarray], target: Mesh | jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays.

    ``target``: a mesh (the batch axis split over it, ``batch_sharding``) or the
    sharding to lay the arrays out with.
    """
    sharding = batch_sharding(target) if isinstance(target, Mesh) else target
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
