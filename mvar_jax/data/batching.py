"""Resumable host-local numpy batches, decoded on threads, and their prefetch to the devices.

``BatchSource`` walks an order (``order.ShuffledEpochs`` or ``order.SinglePass``),
loads each example with a ``load(index, epoch)`` function on a thread pool, stacks
them, and tags every batch with the state reached after it. Because the order
and each example's randomness are fixed by their indices, ``get_state()`` after
batch k and ``set_state()`` on a fresh source reproduce batch k+1 exactly.
``DevicePrefetch`` keeps a few of those batches in flight to the devices
without losing that exactness.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np

from mvar_jax import parallel
from mvar_jax.data import order as order_lib

Example = dict[str, np.ndarray]
# (index, epoch) -> example, or None if it could not be read (the loader logs
# it, the source counts it).
LoadFn = Callable[[int, int], Example | None]
# Per-example field shapes and dtypes, e.g. {'label': ((), np.int32)}.
Spec = Mapping[str, tuple[tuple[int, ...], Any]]
State = dict[str, int]

_NUM_BAD = "num_bad_records"
_MAX_CONSECUTIVE_BAD = 10_000  # beyond this the data is broken, not noisy


class Order(Protocol):
    num_records: int

    def initial_state(self) -> State: ...

    def check_state(self, state: Any) -> State: ...

    def slots(self, state: State) -> Iterator[order_lib.Slot]: ...


def _batches(
    order: Order,
    state: State,
    load: LoadFn,
    spec: Spec,
    batch_size: int,
    num_workers: int,
    with_mask: bool,
) -> Iterator[tuple[dict[str, np.ndarray], State]]:
    """Yields (batch, state after it).

    Unreadable examples are replaced by the next ones (training), or kept as
    zero rows with ``mask`` False (eval, so that hosts stay in step).
    """
    slots = order.slots({k: v for k, v in state.items() if k != _NUM_BAD})
    num_bad = state[_NUM_BAD]
    pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 1 else None
    mapper = pool.map if pool else map
    consecutive_bad = 0

    def load_slot(slot: order_lib.Slot) -> Example | None:
        return None if slot.index is None else load(slot.index, slot.epoch)

    try:
        while True:
            rows: list[Example | None] = []
            after = None
            while len(rows) < batch_size:
                chunk = list(itertools.islice(slots, batch_size - len(rows)))
                if not chunk:
                    break
                for slot, example in zip(chunk, mapper(load_slot, chunk), strict=True):
                    after = slot.after
                    unreadable = example is None and slot.index is not None
                    num_bad += unreadable
                    consecutive_bad = consecutive_bad + 1 if unreadable else 0
                    if consecutive_bad > _MAX_CONSECUTIVE_BAD:
                        raise RuntimeError(
                            f"more than {_MAX_CONSECUTIVE_BAD} unreadable examples in a row; "
                            "is the dataset corrupt?"
                        )
                    if example is not None or with_mask:
                        rows.append(example)
            if not rows:
                return
            yield _stack(rows, spec, batch_size, with_mask), {**after, _NUM_BAD: num_bad}
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


def _stack(rows: list[Example | None], spec: Spec, batch_size: int, with_mask: bool) -> dict[str, np.ndarray]:
    batch = {k: np.zeros((batch_size, *shape), dtype) for k, (shape, dtype) in spec.items()}
    mask_b = np.zeros(batch_size, bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        if row.keys() != batch.keys():
            raise ValueError(f"example has fields {sorted(row)}, expected {sorted(batch)}")
        for k, v in row.items():
            batch[k][i] = v
        mask_b[i] = True
    if with_mask:
        batch["mask"] = mask_b
    return batch


class _Background:
    """Runs an iterator on a daemon thread, at most ``size`` items ahead."""

    _END = object()

    def __init__(self, items: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
        finally:
            items.close()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END or isinstance(item, BaseException):
            self._done = True
            if item is self._END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class BatchSource:
    """Host-local batches with ``get_state()`` / ``set_state()``; see the module docstring.

    Attributes:
      num_examples: examples in the whole split (all hosts).
      num_batches: batches per pass for a finite source, None for an endless one.
    """

    def __init__(
        self,
        order: Order,
        load: LoadFn,
        spec: Spec,
        batch_size: int,
        *,
        num_workers: int = 0,
        prefetch: int = 0,
        with_mask: bool = False,
    ):
        if batch_size <= 0:
            raise ValueError(f"per-host batch size must be positive, got {batch_size}")
        self._order = order
        self._make_batches = functools.partial(
            _batches,
            order,
            load=load,
            spec=dict(spec),
            batch_size=batch_size,
            num_workers=num_workers,
            with_mask=with_mask,
        )
        self._prefetch = prefetch
        self._state: State = {**order.initial_state(), _NUM_BAD: 0}
        self._pending: Any = None
        self._closer: weakref.finalize | None = None
        self.num_examples = order.num_records
        self.num_batches: int | None = getattr(order, "num_batches", None)

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pending is None:
            batches = self._make_batches(self._state)
            self._pending = _Background(batches, self._prefetch) if self._prefetch else batches
            # Stops the thread (or closes the generator) once, at close() or when collected.
            self._closer = weakref.finalize(self, self._pending.close)
        batch, self._state = next(self._pending)
        return batch

    def get_state(self) -> State:
        """JSON-serialisable position after the last batch returned (per host)."""
        return dict(self._state)

    def set_state(self, state: Mapping[str, int]) -> None:
        """The next batch will be the one that followed ``state`` when it was taken."""
        state = dict(state)
        if not isinstance(state.get(_NUM_BAD), int):
            raise ValueError(f"data source state lacks an int {_NUM_BAD!r}: {state!r}")
        num_bad = state.pop(_NUM_BAD)
        state = self._order.check_state(state)
        self.close()
        self._state = {**state, _NUM_BAD: num_bad}

    @property
    def num_bad_records(self) -> int:
        """Unreadable examples met so far (skipped in training, masked in eval)."""
        return self._state[_NUM_BAD]

    def reset(self) -> None:
        """Back to the start (for another eval pass)."""
        self.set_state({**self._order.initial_state(), _NUM_BAD: 0})

    def close(self) -> None:
        """Stops the background work; iterating again resumes from the current state."""
        if self._pending is not None:
            self._closer()
            self._pending = None


class DevicePrefetch:
    """Wraps a ``BatchSource``; yields global ``jax.Array`` batches laid out by ``sharding``.

    Each host contributes its local batch (``parallel.host_batch_to_global``).
    Up to ``size`` batches are transferred ahead, so ``get_state()`` reports the
    state after the last batch *returned*, not the last one transferred.
    """

    def __init__(self, source: BatchSource, sharding: jax.sharding.Sharding, size: int = 2):
        if size < 1:
            raise ValueError(f"size={size} must be >= 1")
        self._source = source
        self._sharding = sharding
        self._size = size
        self._ahead: collections.deque = collections.deque()
        self._state = source.get_state()

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while len(self._ahead) < self._size:
            try:
                batch = next(self._source)
            except StopIteration:
                break
            global_batch = parallel.host_batch_to_global(batch, self._sharding)
            self._ahead.append((global_batch, self._source.get_state()))
        if not self._ahead:
            raise StopIteration
        batch, self._state = self._ahead.popleft()
        return batch

    def get_state(self) -> State:
        return dict(self._state)

    def set_state(self, state: Mapping[str, int]) -> None:
        self._ahead.clear()
        self._source.set_state(state)
        self._state = self._source.get_state()
