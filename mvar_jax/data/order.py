"""Which example goes where: epoch permutations, host shards, per-example randomness, resume state.

Everything is a pure function of (seed, epoch, index) and the host layout, so
the stream is identical whatever the thread count, and a state of two integers
(epoch, position) pins the next example exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

# Distinct first words keep the permutation and augmentation streams independent.
_PERMUTATION_STREAM = 0
_EXAMPLE_STREAM = 1


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of example ``index`` in ``epoch``."""
    return np.random.default_rng([_EXAMPLE_STREAM, seed, epoch, index])


class Slot(NamedTuple):
    """One place in a host's stream: example ``index`` (None: padding) and the state after it."""

    index: int | None
    epoch: int
    after: dict[str, int]


def _check_host(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")


def _check_state(state: Any, keys: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(state, dict) or set(state) != set(keys):
        raise ValueError(f"data source state must be a dict with keys {keys}, got {state!r}")
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in keys):
        raise ValueError(f"data source state values must be non-negative ints, got {state!r}")
    return {k: state[k] for k in keys}


@dataclasses.dataclass(frozen=True)
class ShuffledEpochs:
    """Endless training order: each epoch a fresh permutation, dealt round-robin to hosts.

    The last ``num_records % process_count`` examples of each permutation are
    dropped so that every host sees the same number per epoch.
    """

    num_records: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        _check_host(self.process_index, self.process_count)
        if self.num_records < self.process_count:
            raise ValueError(f"{self.num_records} examples cannot be shared by {self.process_count} hosts")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be non-negative")

    @property
    def per_host(self) -> int:
        return self.num_records // self.process_count

    def host_indices(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([_PERMUTATION_STREAM, self.seed, epoch]).permutation(self.num_records)
        return perm[self.process_index : self.per_host * self.process_count : self.process_count]

    def initial_state(self) -> dict[str, int]:
        return {"epoch": 0, "position": 0}

    def check_state(self, state: Any) -> dict[str, int]:
        state = _check_state(state, ("epoch", "position"))
        if state["position"] >= self.per_host:
            raise ValueError(f"position {state['position']} is past the epoch ({self.per_host} per host)")
        return state

    def slots(self, state: dict[str, int]) -> Iterator[Slot]:
        epoch, position = state["epoch"], state["position"]
        while True:
            indices = self.host_indices(epoch)
            for p in range(position, self.per_host):
                after = {"epoch": epoch, "position": p + 1}
                if p + 1 == self.per_host:
                    after = {"epoch": epoch + 1, "position": 0}
                yield Slot(int(indices[p]), epoch, after)
            epoch, position = epoch + 1, 0


@dataclasses.dataclass(frozen=True)
class SinglePass:
    """Finite eval order: index i goes to host i % process_count, in order.

    Each host's share is padded to ``num_batches * batch_size`` slots so that all
    hosts run the same number of steps; padding slots have index None.
    """

    num_records: int
    batch_size: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        _check_host(self.process_index, self.process_count)

    @property
    def num_batches(self) -> int:
        return -(-self.num_records // (self.batch_size * self.process_count))

    def initial_state(self) -> dict[str, int]:
        return {"position": 0}

    def check_state(self, state: Any) -> dict[str, int]:
        state = _check_state(state, ("position",))
        if state["position"] > self.num_batches * self.batch_size:
            raise ValueError(f"position {state['position']} is past the end of the pass")
        return state

    def slots(self, state: dict[str, int]) -> Iterator[Slot]:
        for p in range(state["position"], self.num_batches * self.batch_size):
            index = p * self.process_count + self.process_index
            yield Slot(index if index < self.num_records else None, 0, {"position": p + 1})
