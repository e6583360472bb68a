"""A persistent cache of compiled programs: a second process loads them instead of compiling.

``sample.py`` and ``make demo`` turn it on by default (``--compilation_cache``): the
sampler and the decoder take seconds to tens of seconds to compile, the same every run.
The directory is ``--compilation_cache DIR``, else ``$MVAR_JAX_COMPILATION_CACHE``, else
``~/.cache/mvar_jax/xla`` (under ``$XDG_CACHE_HOME`` when set); an empty value turns it
off. JAX keys each entry by the program, the backend and the compiler's flags, so a
cached program is the one the compiler would have built.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax

from mvar_jax import cli

ENV = "MVAR_JAX_COMPILATION_CACHE"
# Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = 0.5


def default_dir() -> pathlib.Path:
    return cli.user_cache_dir() / "xla"


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns the cache on in ``directory`` (None: ``$MVAR_JAX_COMPILATION_CACHE`` or the default;
    '': off) and returns it; a directory that cannot be created leaves it off, with a warning."""
    if directory is None:
        directory = os.environ.get(ENV, str(default_dir()))
    if not str(directory):
        return None
    path = pathlib.Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: compilation cache off: cannot create {path}: {e.strerror}", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
