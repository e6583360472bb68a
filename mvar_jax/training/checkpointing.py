"""Train-state checkpoints with Orbax: periodic, keep-last-N, asynchronous, exactly resumable.

A checkpoint at step ``s`` (the number of optimizer steps taken) holds two items:

* ``state``: the task's train state (any pytree with a ``step``: params,
  optimizer states, RNG key, ...), restored with the shardings of the current mesh;
* ``data``: every host's data-source position (JSON), so that host ``i`` resumes
  with the batch it would have read next.

Together they make a resumed run continue exactly like an uninterrupted one.

Orbax writes a checkpoint under a temporary name and renames it when complete, so
a killed save leaves no step that looks whole; the next start deletes what it
left (the caller must hold the work directory's lock). A save that fails for lack
of space raises ``workdir.DiskFull`` naming the step, the file and the newest
whole checkpoint, which the failure leaves in place; an asynchronous save's
failure surfaces at the next ``save`` or at ``wait``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mvar_jax.training import workdir
from mvar_jax.training.task import State


def _gather_host_states(local_state: dict[str, Any]) -> dict[str, Any]:
    """``{str(process_index): state}`` of every host, identical on all hosts."""
    if jax.process_count() == 1:
        return {"0": local_state}
    encoded = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([encoded.size]))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return {
        str(i): json.loads(gathered[i, : int(n)].tobytes().decode())
        for i, n in enumerate(lengths.reshape(-1))
    }


class Checkpointer:
    """Saves and restores ``(train state, data-source state)`` under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int, async_save: bool = True):
        self._directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options, item_names=("state", "data"))
        self._last_save: int | None = None  # the step an asynchronous failure belongs to

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def _stop_when_disk_full(self, step: int) -> contextlib.AbstractContextManager:
        """``workdir.DiskFull`` instead of Orbax's error when saving ``step`` found no space."""
        return workdir.stop_when_disk_full(
            f"saving the checkpoint of step {step}",
            self._directory,
            lambda: (
                f"The newest whole checkpoint is {self._newest_whole()}: free space and "
                "run the same command to resume from it."
            ),
        )

    def _newest_whole(self) -> str:
        steps = ocp.utils.checkpoint_steps(self._directory)  # read from disk: renamed ones
        return f"step {max(steps)}" if steps else "none (the run starts afresh)"

    def save(self, state: State, data_state: dict[str, Any]) -> None:
        """Starts saving at ``state.step`` (returns before an async save is done)."""
        step = int(jax.device_get(state.step))
        self.wait()  # the previous save's failure names that save's step
        with self._stop_when_disk_full(step):
            self._manager.save(
                step,
                force=True,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(_gather_host_states(data_state)),
                ),
            )
        self._last_save = step

    def restore(self, step: int, abstract_state: State) -> tuple[State, dict[str, Any]]:
        """State at ``step`` laid out like ``abstract_state`` (``ShapeDtypeStruct`` with
        shardings), and this host's data-source state."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        hosts = restored["data"]
        if len(hosts) != jax.process_count():
            raise ValueError(
                f"checkpoint step {step} was written by {len(hosts)} hosts, but this "
                f"run has {jax.process_count()}; the data position cannot be mapped"
            )
        return restored["state"], hosts[str(jax.process_index())]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        with self._stop_when_disk_full(self._last_save):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the saves in flight and stops Orbax's threads (which may raise a failed
        save's error once more)."""
        with self._stop_when_disk_full(self._last_save):
            try:
                self._manager.wait_until_finished()
            finally:
                self._manager.close()
