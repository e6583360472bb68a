"""What a model brings to the trainer: the ``Task`` protocol.

``trainer.train_and_evaluate`` owns everything both models share (mesh, data,
checkpoints with exact resume, the NaN stop, logging, the export bookkeeping); a
task owns the rest. ``config.task`` names the task (``trainer.TASKS``). See
docs/training.md, "Adding a model to the trainer".
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
from jax.sharding import Mesh

from mvar_jax import data, parallel
from mvar_jax.training.metrics_writer import MetricsWriter
from mvar_jax.training.workdir import Architecture

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class State(Protocol):
    """A train state: any pytree (e.g. a ``flax.struct.dataclass``) that counts its steps.

    Everything a run needs to continue bit for bit lives in it; it is checkpointed
    whole, so a task may add what it needs (a second model, a second optimizer
    state, running statistics).
    """

    step: jax.Array  # int32 (): optimizer steps taken so far


StepFn = Callable[[Any, Batch], tuple[Any, Metrics]]


class Task(Protocol):
    """One model's part of training.

    Made by ``TaskClass(config, mesh=mesh, num_steps=num_steps)`` after
    ``TaskClass.check_config(config)`` passed; the constructor loads what the
    model needs (frozen networks, weights to start from) and may still raise
    ValueError on settings that need those files to check.
    """

    architecture: Architecture
    finite_metrics: tuple[str, ...]  # the metrics the NaN/Inf stop reads, where a step has them
    eval_every: int  # steps between ``evaluate`` calls (0: never)

    @staticmethod
    def check_config(config: ml_collections.ConfigDict) -> None:
        """Raises ValueError naming the field, before anything is read or written."""

    def abstract_state(self) -> State:
        """The train state's shapes (``jax.eval_shape`` of the initial state)."""

    def init_state(self, shardings: Any) -> State:
        """The step-0 state, born with ``shardings`` (a tree like the state)."""

    def train_steps(self) -> Sequence[StepFn]:
        """Pure ``(state, batch) -> (state, metrics)`` steps; the trainer compiles each."""

    def step_index(self, step: int) -> int:
        """Which of ``train_steps()`` trains global step ``step`` (0-based)."""

    def prepare_batch(self, batch: Batch) -> Batch:
        """A global device batch from the data source -> the train steps' input (on device)."""

    def summarize(self, step: int, scalars: Mapping[str, float]) -> tuple[str, dict[str, str]]:
        """The console line's metrics and the progress bar's postfix after ``step`` steps,
        from the metrics averaged since the last log."""

    def evaluate(self, state: State, step: int, writer: MetricsWriter) -> None:
        """Every ``eval_every`` steps, on every host: scalars and images to ``writer``."""

    def export(self, state: State, model_dir: pathlib.Path) -> None:
        """Writes the trained model directory (collective: every host calls it)."""


def from_config(section: str, cls: type, values: Any) -> Any:
    """``cls(**config.<section>)`` (a section made by ``configs.common.from_dataclass``), its
    ValueError naming the config field."""
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"config.{section}: {e}") from e


def open_eval_source(data_cfg: ml_collections.ConfigDict, global_batch_size: int, mesh: Mesh) -> Any:
    """The eval split's batch source for a task's evaluation, opened when the task is made, so
    that a missing validation split stops the run at start-up."""
    parallel.check_batch_size(global_batch_size, mesh)
    return data.build_eval_source(
        data_cfg,
        global_batch_size=global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
