"""The exceptions every layer shares, and the one key/shape check behind the mismatch errors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class ConfigError(ValueError):
    """A setting that cannot run, found before anything runs: the message names the field and
    says what to do. Commands report it in a line (exit status 2), not as a traceback."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# Keys named per kind of mismatch in a message (the exception keeps them all).
SHOWN_KEYS = 12


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


class StateDictMismatchError(CheckpointError):
    """A state dict whose keys or shapes differ from what the model expects."""

    def __init__(self, what: str, missing=(), unexpected=(), mis_shaped=()):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mis_shaped = sorted(mis_shaped)
        lines = [f"{what} does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + _listed(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + _listed(self.unexpected))
        for key, got, want in self.mis_shaped[:SHOWN_KEYS]:
            lines.append(f"  wrong shape for {key}: got {tuple(got)}, expected {tuple(want)}")
        if len(self.mis_shaped) > SHOWN_KEYS:
            lines.append(f"  ... {len(self.mis_shaped) - SHOWN_KEYS} more of the wrong shape")
        super().__init__("\n".join(lines))


def check_keys(
    state_dict: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    what: str = "state dict",
    ignore: tuple[str, ...] = (),
) -> None:
    """Raises StateDictMismatchError unless keys and shapes match exactly.

    ``ignore`` lists keys that may be present without being used (buffers the
    Flax model recomputes, such as attention masks); they are neither missing
    nor unexpected.
    """
    got = {k for k in state_dict if k not in ignore}
    want = set(expected_shapes)
    mis_shaped = [
        (k, state_dict[k].shape, expected_shapes[k])
        for k in sorted(got & want)
        if tuple(state_dict[k].shape) != tuple(expected_shapes[k])
    ]
    if got != want or mis_shaped:
        raise StateDictMismatchError(what, want - got, got - want, mis_shaped)
