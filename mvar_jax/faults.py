"""A test hook: ``MVAR_JAX_KILL_AT=<point>`` makes the process SIGKILL itself at a named point.

Not a feature: ``tests/test_kill_anywhere.py`` sets it to land a kill inside a phase
that a timer would rarely hit (a train step, an asynchronous checkpoint save, the
export, the token cache between a chunk's two files). ``<point>`` is a name passed to
``point`` (the first time it is reached) or ``<name>=<key>`` (the time it is reached
with that key, e.g. ``train-step=3``). Unset, ``point`` compares with None and returns.

Points: ``train-step=<step>`` (step dispatched, not finished), ``checkpoint-save=<step>``
(the asynchronous write in flight), ``export-configs`` (a model directory's configs
written, its params not), ``export-swap`` (the old model directory moved aside, the new
one not yet in place), ``export-record`` (the model written, its step record not),
``token-cache-chunk=<chunk>`` (a chunk's labels written, its tokens not), ``sample-set-part=<j>``
(a sample set's batch j written, the next not).
"""

from __future__ import annotations

import os
import signal

_KILL_AT = os.environ.get("MVAR_JAX_KILL_AT")


def point(name: str, key: int | None = None) -> None:
    """SIGKILLs this process when ``MVAR_JAX_KILL_AT`` names this point (see the module)."""
    if _KILL_AT is not None and _KILL_AT in (name, f"{name}={key}"):
        os.kill(os.getpid(), signal.SIGKILL)
