"""The files the trainer writes into the work directory, besides Orbax checkpoints and events.

    WORKDIR/<model>_config.json     the architecture, recorded on the first start
    WORKDIR/<tag>/step_<step>.png   evaluation images (sample grids, reconstructions)
    WORKDIR/model/                  the exported model
    WORKDIR/model/exported_step.json  the train step the export holds, written last

Every file goes through ``write_json`` or ``write_png``: only process 0 writes, and
a file is replaced in one rename, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import PIL.Image
from jax.experimental import multihost_utils

from mvar_jax import checkpoint

EXPORTED_STEP = "exported_step.json"


def _replace(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """``write(tmp)`` then renames ``tmp`` to ``path``, from process 0 only."""
    if jax.process_index() != 0:
        return
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: pathlib.Path, value: Any) -> None:
    _replace(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


def write_png(path: pathlib.Path, image_HW3: np.ndarray) -> None:
    """A uint8 ``(H, W, 3)`` image; creates the directory."""
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda tmp: PIL.Image.fromarray(image_HW3).save(tmp, format="PNG"))


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
        raise ValueError(f"{workdir} holds a run of a different model ({others[0]}); "
                         "use a new --workdir")
    path = workdir / architecture.file
    if not path.exists():
        write_json(path, dict(architecture.fields))
        return
    saved, current = json.loads(path.read_text()), dict(architecture.fields)
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in architecture.execution_fields and saved.get(k) != current.get(k))
    if differ:
        raise ValueError(f"{workdir} holds a run of a different model (fields {differ}); "
                         "use a new --workdir")


def _holds_step(model_dir: pathlib.Path, step: int) -> bool:
    """Whether ``model_dir`` holds the params of train step ``step``, decided once for all hosts.

    An export that crashed before recording its step, or one from before an
    extended run, does not. Every host must agree: saving is collective.
    """
    holds = False
    if jax.process_index() == 0:
        record = model_dir / EXPORTED_STEP
        holds = (record.exists() and (model_dir / checkpoint.PARAMS_DIR).exists()
                 and json.loads(record.read_text()).get("step") == step)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(holds)))


def export_model(model_dir: pathlib.Path, step: int,
                 save: Callable[[pathlib.Path], None]) -> bool:
    """Has ``save`` (re)write ``model_dir`` with train step ``step``'s model, unless it holds it.

    The step is recorded after ``save`` returns, so a half-written export is redone.
    Returns whether it wrote.
    """
    if _holds_step(model_dir, step):
        return False
    if jax.process_index() == 0:
        (model_dir / EXPORTED_STEP).unlink(missing_ok=True)
    save(model_dir)
    write_json(model_dir / EXPORTED_STEP, {"step": step})
    return True
