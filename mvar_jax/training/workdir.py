"""The work directory: who may write it, the files the trainer writes, a full disk.

    WORKDIR/lock                    held by the run writing the directory (``lock``)
    WORKDIR/<model>_config.json     the architecture, recorded on the first start
    WORKDIR/<tag>/step_<step>.png   evaluation images (sample grids, reconstructions)
    WORKDIR/model/                  the exported model
    WORKDIR/model/exported_step.json  the train step the export holds, written last

Besides Orbax checkpoints and events, every file goes through ``write_json`` or
``write_png``: only process 0 writes, and a file is replaced in one rename
(``atomic_write``), so a crash leaves the old file or the new one. A write that
fails for lack of space stops the run with ``DiskFull`` (``stop_when_disk_full``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import PIL.Image
from absl import logging
from jax.experimental import multihost_utils

from mvar_jax import checkpoint, faults
from mvar_jax.atomic_write import atomic_write

EXPORTED_STEP = "exported_step.json"
LOCK = "lock"


class WorkdirInUse(RuntimeError):
    """Another run holds the work directory's lock."""


class DiskFull(OSError):
    """A write into the work directory failed for lack of space (or quota)."""


def _any_host(flag: bool) -> bool:
    """Process 0's ``flag``, on every host."""
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _try_lock(path: pathlib.Path) -> int | None:
    """An open descriptor of ``path`` holding its ``flock``; None where the filesystem
    has no locks. Raises WorkdirInUse, naming the holder, if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise WorkdirInUse(
            f"{path.parent} is in use by another run ({holder}); a second run would "
            "interleave its writes with it. Wait for it to end or stop it (a killed run "
            "frees the directory at once), or use another --workdir"
        ) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        os.close(fd)
        logging.warning("cannot lock %s (%s): nothing stops a second run on this work directory", path, e)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(
        fd,
        f"pid {os.getpid()} on host {socket.gethostname()}, since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
        0,
    )
    return fd


@contextlib.contextmanager
def lock(workdir: pathlib.Path) -> Iterator[None]:
    """Holds ``workdir/lock`` for the block; raises WorkdirInUse (on every host) if another
    run holds it, before anything is written.

    ``fcntl.flock``: the kernel releases it when the holder exits or is killed, so
    no stale lock outlives a run. Process 0 alone locks, as it alone writes the
    directory's own files (the other hosts of a run follow it in every
    collective). On NFS, Linux implements flock with NFS byte-range locks, so a run
    on another machine is refused too; a filesystem without locks gets a warning
    and no protection.
    """
    fd, refusal = None, None
    if jax.process_index() == 0:
        try:
            fd = _try_lock(workdir / LOCK)
        except WorkdirInUse as e:
            refusal = e
    if _any_host(refusal is not None):
        raise refusal or WorkdirInUse(f"{workdir} is in use by another run (see process 0)")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _reports_full_disk(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it came from says ENOSPC or EDQUOT (an OSError, or
    TensorStore's ValueError text inside Orbax)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    while error is not None:
        if isinstance(error, OSError) and error.errno in codes:
            return True
        if any(os.strerror(code) in str(error) for code in codes):
            return True
        error = error.__cause__ or error.__context__
    return False


def _failed_path(error: BaseException, default: pathlib.Path) -> pathlib.Path:
    """The file ``error`` names (OSError.filename, or the last quoted path of Orbax's text)."""
    if isinstance(error, OSError) and error.filename:
        return pathlib.Path(error.filename)
    quoted = re.findall(r'"(/[^"]+)"', str(error))
    return pathlib.Path(quoted[-1]) if quoted else default


def _free_space(path: pathlib.Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def stop_when_disk_full(what: str, path: pathlib.Path, then: str | Callable[[], str] = "") -> Iterator[None]:
    """Turns a full-disk error of the block into ``DiskFull``: "disk full while ``what``:
    no space left writing <file> (<free> MiB free there). ``then``" (``then()`` if a
    function: what to do, known only after the failure)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if not _reports_full_disk(e):
            raise
        file = _failed_path(e, path)
        advice = then() if callable(then) else then
        raise DiskFull(
            f"disk full while {what}: no space left writing {file} ({_free_space(file)}). {advice}".strip()
        ) from e


def _replace(path: pathlib.Path, write: Callable[[Any], None]) -> None:
    """``write(file)`` into a temporary file renamed to ``path``, from process 0 only."""
    if jax.process_index() != 0:
        return
    with atomic_write(path) as f:
        write(f)


def write_json(path: pathlib.Path, value: Any) -> None:
    _replace(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def write_png(path: pathlib.Path, image_HW3: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` image; creates the directory."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda f: PIL.Image.fromarray(image_HW3).save(f, format="PNG"))


class Architecture(NamedTuple):
    """What the work directory records on the first start and checks on every resume.

    ``file``: the record's name, ``<model>_config.json``; ``fields``: the JSON-able
    architecture; ``execution_fields``: fields that leave the params unchanged, so a
    resumed run may change them (e.g. an attention kernel's implementation).
    """

    file: str
    fields: Mapping[str, Any]
    execution_fields: tuple[str, ...] = ()


def check_architecture(workdir: pathlib.Path, architecture: Architecture) -> None:
    """Records the architecture on the first start; refuses a run of another model."""
    others = sorted(p.name for p in workdir.glob("*_config.json") if p.name != architecture.file)
    if others:
        raise ValueError(f"{workdir} holds a run of a different model ({others[0]}); use a new --workdir")
    path = workdir / architecture.file
    if not path.exists():
        write_json(path, dict(architecture.fields))
        return
    saved, current = json.loads(path.read_text()), dict(architecture.fields)
    differ = sorted(
        k
        for k in set(saved) | set(current)
        if k not in architecture.execution_fields and saved.get(k) != current.get(k)
    )
    if differ:
        raise ValueError(f"{workdir} holds a run of a different model (fields {differ}); use a new --workdir")


def exported_step(model_dir: str | os.PathLike) -> int | None:
    """The train step of the whole export in ``model_dir``, or None if it holds none.

    An export that crashed before recording its step holds none.
    """
    model_dir = pathlib.Path(model_dir)
    record = model_dir / EXPORTED_STEP
    if not (record.exists() and (model_dir / checkpoint.PARAMS_DIR).exists()):
        return None
    return json.loads(record.read_text()).get("step")


def _holds_step(model_dir: pathlib.Path, step: int) -> bool:
    """Whether ``model_dir`` holds the params of train step ``step``, decided once for all hosts.

    An export that crashed before recording its step, or one from before an
    extended run, does not. Every host must agree: saving is collective.
    """
    return _any_host(jax.process_index() == 0 and exported_step(model_dir) == step)


def export_model(model_dir: pathlib.Path, step: int, save: Callable[[pathlib.Path], None]) -> bool:
    """Has ``save`` (re)write ``model_dir`` with train step ``step``'s model, unless it holds it.

    The step is recorded after ``save`` returns, so a half-written export is redone.
    Returns whether it wrote.
    """
    if _holds_step(model_dir, step):
        return False
    if jax.process_index() == 0:
        (model_dir / EXPORTED_STEP).unlink(missing_ok=True)
    with stop_when_disk_full(
        f"exporting the model of step {step}",
        model_dir,
        "The checkpoints are whole: free space and run the same command to export again.",
    ):
        save(model_dir)
        faults.point("export-record")
        write_json(model_dir / EXPORTED_STEP, {"step": step})
    return True
