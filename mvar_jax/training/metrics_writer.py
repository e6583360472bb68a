"""Metrics and images to TensorBoard, a tqdm progress bar, console and log lines; host 0 writes."""

from __future__ import annotations

import os
import pathlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping

import jax
import numpy as np
import tqdm
from absl import logging

from mvar_jax.training import workdir as workdir_lib

# The task's console line and progress-bar postfix from the averaged metrics after a step.
Summarize = Callable[[int, Mapping[str, float]], tuple[str, dict[str, str]]]


def announce(message: str) -> None:
    """A line for the console (above the progress bar) and the log, from host 0."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)
    logging.info(message)


def average(window: list[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Each metric averaged over the steps of ``window`` that report it (per-scale metrics
    exist only on steps that train that scale)."""
    sums, counts = defaultdict(float), defaultdict(int)
    for metrics in window:
        for k, v in metrics.items():
            sums[k] += float(v)
            counts[k] += 1
    return {k: sums[k] / counts[k] for k in sums}


class MetricsWriter:
    """Writes under ``workdir``: ``tensorboard/`` events and ``<tag>/step_*.png`` images.

    Each write reaches the event file before it returns (no writer thread, no
    buffer), so a killed run loses nothing it logged. Every start writes a file
    of its own; a record torn by a kill ends that file for TensorBoard's reader and
    nothing else (the steps after the last checkpoint are logged again, equal).
    """

    def __init__(
        self, workdir: pathlib.Path, *, start: int, total: int, global_batch: int, summarize: Summarize
    ):
        self._workdir, self._global_batch, self._summarize = workdir, global_batch, summarize
        self._main = jax.process_index() == 0
        self._events = None  # opened at the first write, so a finished run adds no file
        self._bar = tqdm.tqdm(
            total=total,
            initial=start,
            disable=not self._main or start >= total,
            desc="train",
            dynamic_ncols=True,
        )
        self._since = time.perf_counter()

    def _write_event(self, step: int, summary) -> None:
        """One TensorBoard event, written and flushed."""
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event

        if self._events is None:
            directory = self._workdir / "tensorboard"
            directory.mkdir(parents=True, exist_ok=True)
            # A name of its own (tensorboardX truncates an existing file), as TensorFlow's
            # events.out.tfevents.<time>.<host>.<pid>.<uid>.
            self._events = EventsWriter(str(directory / "events"), f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
        self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._events.flush()

    def write_train(self, step: int, window: list[Mapping[str, np.ndarray]]) -> None:
        """The train metrics of the steps since the last call, averaged, after ``step`` steps."""
        scalars = average(window)
        now = time.perf_counter()
        scalars["images_per_sec"] = len(window) * self._global_batch / (now - self._since)
        self._since = now
        line, postfix = self._summarize(step, scalars)
        self._bar.update(len(window))
        self._bar.set_postfix(postfix)
        self.write_scalars(step, scalars)
        announce(f"step {step}: {line}, {scalars['images_per_sec']:.1f} img/s")
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        if self._main:
            self._write_event(
                step, Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
            )

    def write_image(self, tag: str, image_HW3: np.ndarray, step: int) -> None:
        """A uint8 ``(H, W, 3)`` image to TensorBoard and ``<tag>/step_<step>.png``."""
        from tensorboardX import summary

        if self._main:
            self._write_event(step, summary.image(tag, image_HW3, dataformats="HWC"))
        workdir_lib.write_png(self._workdir / tag / f"step_{step:08d}.png", image_HW3)

    def close(self) -> None:
        self._bar.close()
        if self._events is not None:
            self._events.close()
