"""Train-state checkpoints with Orbax: periodic, keep-last-N, asynchronous, exactly resumable.

A checkpoint at step ``s`` (the number of optimizer steps taken) holds two items:

* ``state``: the task's train state (any pytree with a ``step``: params,
  optimizer states, RNG key, ...), restored with the shardings of the current mesh;
* ``data``: every host's data-source position (JSON), so that host ``i`` resumes
  with the batch it would have read next.

Together they make a resumed run continue exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mvar_jax.training.task import State


def _gather_host_states(local_state: dict[str, Any]) -> dict[str, Any]:
    """``{str(process_index): state}`` of every host, identical on all hosts."""
    if jax.process_count() == 1:
        return {"0": local_state}
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size]))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return {str(i): json.loads(gathered[i, :int(n)].tobytes().decode())
            for i, n in enumerate(lengths.reshape(-1))}


class Checkpointer:
    """Saves and restores ``(train state, data-source state)`` under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory), options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: State, data_state: dict[str, Any]) -> None:
        """Starts saving at ``state.step`` (returns before an async save is done)."""
        step = int(jax.device_get(state.step))
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_gather_host_states(data_state))))

    def restore(self, step: int, abstract_state: State) -> tuple[State, dict[str, Any]]:
        """State at ``step`` laid out like ``abstract_state`` (``ShapeDtypeStruct`` with
        shardings), and this host's data-source state."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        hosts = restored["data"]
        if len(hosts) != jax.process_count():
            raise ValueError(f"checkpoint step {step} was written by {len(hosts)} hosts, but this "
                             f"run has {jax.process_count()}; the data position cannot be mapped")
        return restored["state"], hosts[str(jax.process_index())]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
