"""Random token batches with the data-source protocol, for tests and benchmarks.

Batch ``i`` of host ``p`` is a pure function of ``(seed, p, i)``, so the source
resumes exactly from ``get_state()`` and needs neither images nor a VQVAE encoder.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class SyntheticTokenSource:
    """Yields ``{'tokens': (b, L) int32, 'label': (b,) int32}`` per host, forever."""

    def __init__(
        self,
        *,
        batch_size: int,
        seq_len: int,
        vocab_size: int,
        num_classes: int,
        seed: int = 0,
        process_index: int = 0,
    ):
        self._shape = (batch_size, seq_len)
        self._vocab_size, self._num_classes = vocab_size, num_classes
        self._seed, self._process_index = seed, process_index
        self._next = 0

    def batch(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self._seed, self._process_index, index))
        return {
            "tokens": rng.integers(0, self._vocab_size, self._shape, dtype=np.int32),
            "label": rng.integers(0, self._num_classes, self._shape[:1], dtype=np.int32),
        }

    def __iter__(self) -> SyntheticTokenSource:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._next += 1
        return self.batch(self._next - 1)

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        self._next = int(state["next_batch"])
