"""The trainer: one loop for every model, from set-up to export.

``train_and_evaluate(config, workdir)`` is everything ``train.py`` does;
``config.task`` picks the model's part (``TASKS``, see ``task.Task``). The work
directory holds::

    lock                  held by the run writing the directory: a second run is refused
    checkpoints/<step>/   Orbax train state + every host's data position (keep-last-N)
    tensorboard/          event files
    <tag>/step_*.png      evaluation images (the generator's samples/, the tokenizer's
                          reconstructions/)
    model/                the final model; model/exported_step.json says which step it holds
    <model>_config.json   the architecture, checked when resuming
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from mvar_jax import data, faults, parallel
from mvar_jax.data import config as data_config
from mvar_jax.errors import CheckpointError, ConfigError
from mvar_jax.training import checkpointing, generator, tokenizer, workdir as workdir_lib
from mvar_jax.training.metrics_writer import MetricsWriter, announce
from mvar_jax.training.task import State, Task

# config.task -> the task class (constructor and ``check_config``, see task.Task).
TASKS: dict[str, Any] = {"generator": generator.GeneratorTask, "tokenizer": tokenizer.TokenizerTask}


def task_class(config: ml_collections.ConfigDict) -> Any:
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r} is unknown; expected one of {tuple(TASKS)}")
    return TASKS[config.task]


def total_steps(config: ml_collections.ConfigDict, num_examples: int | None = None) -> int:
    """``num_train_steps``, else epochs of ``ceil(examples / batch)`` steps (the official
    sampler's ``iters_train``, which fills the last batch).

    ``num_examples``: the train split's size as the data source reports it; it wins
    over ``config.num_train_examples`` (ImageNet's count by default).
    """
    if config.num_train_steps > 0:
        return config.num_train_steps
    examples = config.num_train_examples if num_examples is None else num_examples
    return config.num_epochs * math.ceil(examples / config.batch_size)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on the trainer's own settings."""
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size={config.batch_size} must be positive")
    if total_steps(config) <= 0:
        raise ValueError(
            "nothing to train: set config.num_epochs (with num_train_examples) or "
            "config.num_train_steps to a positive value"
        )
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be positive")
    data_config.check_config(config.data)


def _num_steps(config: ml_collections.ConfigDict, source: Iterator) -> int:
    """``total_steps`` with the source's own split size when it reports one."""
    num_examples = getattr(source, "num_examples", None)
    if num_examples is not None and config.num_train_steps <= 0 and num_examples != config.num_train_examples:
        announce(
            f"the data source holds {num_examples} train examples, not "
            f"config.num_train_examples={config.num_train_examples}; epochs use "
            f"{num_examples}"
        )
    num_steps = total_steps(config, num_examples)
    if num_steps <= 0:
        raise ValueError(f"nothing to train: the data source holds {num_examples} examples")
    return num_steps


def _check_finite(
    window: list[Mapping[str, np.ndarray]],
    names: tuple[str, ...],
    *,
    steps_before: int,
    last_saved: int | None,
) -> None:
    """Raises on the first step of ``window`` where a metric of ``names`` is not finite."""
    for offset, metrics in enumerate(window):
        values = {k: float(metrics[k]) for k in names if k in metrics}
        if not all(math.isfinite(v) for v in values.values()):
            kept = f"step {last_saved}" if last_saved is not None else "none saved yet"
            raise FloatingPointError(
                f"non-finite training values at step {steps_before + offset + 1} ({values}); "
                f"stopped without saving this state. Last good checkpoint: {kept}"
            )


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """The set-up's ValueErrors (a field out of range, settings that do not fit together) as
    ``ConfigError``: a user's mistake, which the command reports in a line, as it does a
    ``CheckpointError`` (a file that cannot be read or does not fit)."""
    try:
        yield
    except (ConfigError, CheckpointError):
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, source: Iterator | None = None
) -> State:
    """Trains to ``total_steps``, resuming from ``workdir`` if it holds a checkpoint.

    Args:
      source: iterator of per-host numpy batches (default: ``data.build_train_source``
        from ``config.data``) with ``get_state`` / ``set_state`` for exact resumption;
        its ``num_examples``, if it has one, sizes the epochs.
    Returns:
      The final train state (its model also exported to ``workdir/model``).
    Raises:
      ConfigError: a setting that cannot train, or files that do not fit it (before
        anything is written).
      workdir.WorkdirInUse: another run holds ``workdir``.
      workdir.DiskFull: a write found no space (the newest checkpoint stays whole).
    """
    with _config_errors():
        make_task = task_class(config)
        check_config(config)
        make_task.check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)

    with contextlib.ExitStack() as cleanup:
        # Before anything is written; released last, after the export.
        cleanup.enter_context(workdir_lib.lock(workdir))
        cleanup.enter_context(workdir_lib.stop_when_disk_full(f"training in {workdir}", workdir))
        if source is None:
            source = data.build_train_source(
                config.data,
                global_batch_size=config.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                seed=config.seed,
            )
        if hasattr(source, "close"):
            cleanup.callback(source.close)
        with _config_errors():
            num_steps = _num_steps(config, source)
            task: Task = make_task(config, mesh=mesh, num_steps=num_steps)
            workdir_lib.check_architecture(workdir, task.architecture)

        # Restore the newest checkpoint (train state and data position), or start afresh.
        abstract_state = task.abstract_state()
        shardings = parallel.state_shardings(
            abstract_state, mesh, fsdp=config.parallel.fsdp, min_size=config.parallel.fsdp_min_size
        )
        checkpointer = cleanup.enter_context(
            contextlib.closing(
                checkpointing.Checkpointer(
                    workdir / "checkpoints",
                    max_to_keep=config.keep_checkpoints,
                    async_save=config.async_checkpointing,
                )
            )
        )
        # Global batches assembled from every host's slice, two in flight; its state is
        # that of the last batch handed out, which is what a checkpoint must record.
        batches = data.DevicePrefetch(source, parallel.batch_sharding(mesh), size=2)
        start = checkpointer.latest_step()
        if start is None:
            start, state = 0, task.init_state(shardings)
        else:
            announce(f"resuming {workdir} from step {start} of {num_steps}")
            state, data_state = checkpointer.restore(start, _with_shardings(abstract_state, shardings))
            batches.set_state(data_state)
        if start >= num_steps:
            announce(f"{workdir} is already trained ({start} of {num_steps} steps)")

        train_steps = [parallel.jit_train_step(step_fn, shardings, mesh) for step_fn in task.train_steps()]
        writer = cleanup.enter_context(
            contextlib.closing(
                MetricsWriter(
                    workdir,
                    start=start,
                    total=num_steps,
                    global_batch=config.batch_size,
                    summarize=task.summarize,
                )
            )
        )
        window = []  # device metrics of the steps since the last log
        last_saved = checkpointer.latest_step()
        for step in range(start, num_steps):
            batch = task.prepare_batch(next(batches))
            state, metrics = train_steps[task.step_index(step)](state, batch)
            window.append(metrics)
            done = step + 1
            faults.point("train-step", done)
            save = done % config.checkpoint_every == 0 or done == num_steps
            if save or done % config.log_every == 0:
                window = jax.device_get(window)
                _check_finite(
                    window, task.finite_metrics, steps_before=done - len(window), last_saved=last_saved
                )
                writer.write_train(done, window)
                window = []
            # A step's evaluation comes before its checkpoint: a run that dies while
            # evaluating resumes from the checkpoint before and evaluates that step again.
            if task.eval_every and done % task.eval_every == 0:
                task.evaluate(state, done, writer)
            if save:
                checkpointer.save(state, batches.get_state())
                faults.point("checkpoint-save", done)
                last_saved = done
        checkpointer.wait()

        final_step = max(start, num_steps)  # the state's step, known on every host
        if workdir_lib.export_model(
            workdir / "model", final_step, lambda model_dir: task.export(state, model_dir)
        ):
            announce(f"exported the model at step {final_step} to {workdir / 'model'}")
    return state
