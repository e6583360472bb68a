"""A trained model on disk: params (Orbax) and their configs (JSON).

Two kinds of directory share one layout::

    vqvae_config.json        VQVAEConfig.to_dict()
    transformer_config.json  TransformerConfig.to_dict()      (generator model only)
    params/                  Orbax tree {'vqvae': ..., 'transformer': ...}
                             ({'vqvae': ...} alone in a tokenizer directory)

A generator model (``save_model``) is written by the converter and at the end of
transformer training, and read by the sampler. A tokenizer directory
(``save_tokenizer``) holds a VQVAE alone, as the tokenizer trainer exports it;
``load_tokenizer`` reads the VQVAE of either kind. The configs travel with the
params, so loading needs nothing else, and loading checks that they describe
those params. A save replaces a directory whole (written beside it, then renamed):
a crash never leaves one model's configs beside another's params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from mvar_jax import faults
from mvar_jax.errors import CheckpointError, check_keys
from mvar_jax.models import families
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.quantizer import num_phis
from mvar_jax.models.transformer import blocks_are_stacked, param_shapes, stack_blocks, unstack_blocks
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.weights import vqvae as vqvae_weights

_VQVAE_CONFIG = "vqvae_config.json"
_TRANSFORMER_CONFIG = "transformer_config.json"
PARAMS_DIR = "params"  # Orbax commits it atomically: its presence means a complete save.
_MODEL_ENTRIES = {_VQVAE_CONFIG, _TRANSFORMER_CONFIG, PARAMS_DIR}
_INCOMPLETE, _REPLACED = ".incomplete", ".replaced"  # <directory><suffix>: see _save
_PARAMS_NAMES = {"vqvae": "VQVAE params", "transformer": "transformer params"}


class ModelBundle(NamedTuple):
    vqvae_config: VQVAEConfig
    vqvae_params: Any
    transformer_config: TransformerConfig
    transformer_params: Any


def _config_mismatch(v: VQVAEConfig, t: TransformerConfig) -> str | None:
    if (v.patch_nums, v.z_channels, v.vocab_size) == (t.patch_nums, t.cvae, t.vocab_size):
        return None
    return (
        f"the VQVAE (patch_nums {v.patch_nums}, Cvae {v.z_channels}, vocab {v.vocab_size}) "
        f"and the transformer (patch_nums {t.patch_nums}, Cvae {t.cvae}, vocab "
        f"{t.vocab_size}) do not fit together"
    )


def check_configs(vqvae_config: VQVAEConfig, transformer_config: TransformerConfig) -> None:
    """Raises CheckpointError unless the transformer speaks the VQVAE's token pyramid."""
    mismatch = _config_mismatch(vqvae_config, transformer_config)
    if mismatch:
        raise CheckpointError(mismatch)


def _flat(tree: Any) -> dict[str, Any]:
    """``{'a/b/c': leaf}``: the key form the mismatch errors print."""
    return {"/".join(path): x for path, x in traverse_util.flatten_dict(dict(tree)).items()}


def _expected_params(vqvae_config: VQVAEConfig, transformer_config: TransformerConfig) -> dict:
    """The param trees the configs call for, as ``ShapeDtypeStruct``s (traced, not built)."""
    return {"vqvae": abstract_variables(vqvae_config), "transformer": param_shapes(transformer_config)}


def _check_params(params: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Raises unless each tree in ``expected`` has its shapes in ``params``.

    A directory whose config JSON was edited, or that was assembled from two
    models, fails here with the differing parameters named
    (StateDictMismatchError) rather than deep inside a compiled sampler or train
    step. Leaves need only a ``.shape``, so this checks Orbax metadata before
    anything is read. Messages start with ``source`` (the directory).
    """
    for name, tree in expected.items():
        check_keys(
            _flat(params[name]),
            {k: v.shape for k, v in _flat(tree).items()},
            what=f"{source}: {_PARAMS_NAMES[name]}",
        )


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _put_in_place(staging: pathlib.Path, directory: pathlib.Path, replaced: pathlib.Path) -> None:
    """Renames ``staging`` to ``directory``, moving an existing ``directory`` aside first."""
    if directory.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(directory, replaced)
        faults.point("export-swap")
    os.rename(staging, directory)
    shutil.rmtree(replaced, ignore_errors=True)  # also one a killed save left


def _save(
    directory: str | os.PathLike, configs: dict[str, Any], params: dict[str, Any], overwrite: bool
) -> None:
    """Writes ``{file name: config}`` and the params tree as ``directory``, whole or not at all.

    They go into ``<directory>.incomplete`` first, which then takes the place of
    ``directory`` (moved to ``<directory>.replaced`` and deleted), so a reader finds
    the old model or the new one, never new configs beside old params. A process
    killed between the two renames leaves no ``directory``: the next save cleans up.
    A directory holding anything but a model is never replaced.
    """
    directory = pathlib.Path(directory).absolute()
    staging, replaced = (directory.with_name(directory.name + suffix) for suffix in (_INCOMPLETE, _REPLACED))
    if directory.exists():
        if (directory / PARAMS_DIR).exists() and not overwrite:
            raise FileExistsError(f"{directory} already holds a model; pass overwrite=True to replace it")
        others = sorted(p.name for p in directory.iterdir() if p.name not in _MODEL_ENTRIES)
        if others:
            raise FileExistsError(
                f"{directory} holds files that are not part of a model "
                f"({', '.join(others)}); refusing to replace it"
            )
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # a killed save's
        staging.mkdir(parents=True)
        for name, config in configs.items():
            (staging / name).write_text(json.dumps(config.to_dict(), indent=1))
    _sync("mvar_jax.checkpoint:staging")
    try:
        faults.point("export-configs")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, params)
        if jax.process_index() == 0:
            _put_in_place(staging, directory, replaced)
    except Exception:
        if jax.process_index() == 0:
            shutil.rmtree(staging, ignore_errors=True)  # gives a full disk its space back
        raise
    _sync("mvar_jax.checkpoint:saved")


def save_model(
    directory: str | os.PathLike,
    *,
    vqvae_config: VQVAEConfig,
    vqvae_params: Any,
    transformer_config: TransformerConfig,
    transformer_params: Any,
    overwrite: bool = False,
) -> None:
    """Writes a generator model directory (all hosts must call it; process 0 writes the JSON).

    The transformer's blocks are written one per subtree, stacked or not in memory.
    """
    if blocks_are_stacked(transformer_params):
        transformer_params = unstack_blocks(transformer_params)
    _save(
        directory,
        {_VQVAE_CONFIG: vqvae_config, _TRANSFORMER_CONFIG: transformer_config},
        {"vqvae": vqvae_params, "transformer": transformer_params},
        overwrite,
    )


def save_tokenizer(
    directory: str | os.PathLike, *, vqvae_config: VQVAEConfig, vqvae_params: Any, overwrite: bool = False
) -> None:
    """Writes a tokenizer directory: the VQVAE alone (``{'params': ...}``), no transformer.

    All hosts must call it; process 0 writes the JSON. Transformer configs accept
    the directory as ``vqvae_checkpoint``; ``python -m mvar_jax.convert
    --to_official_vae`` turns it into an official ``.pth``.
    """
    _save(directory, {_VQVAE_CONFIG: vqvae_config}, {"vqvae": vqvae_params}, overwrite)


def _existing(directory: str | os.PathLike, kind: str, needed: tuple[str, ...]) -> pathlib.Path:
    """The absolute directory; CheckpointError if it or one of ``needed`` is missing."""
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        replaced = directory.with_name(directory.name + _REPLACED)
        hint = (
            f" (a save into it was interrupted; the model it replaced is in {replaced})"
            if replaced.is_dir()
            else ""
        )
        raise CheckpointError(f"{kind} directory not found: {directory}{hint}")
    missing = [name for name in needed if not (directory / name).exists()]
    if missing:
        hint = "expected the output of save_model / save_tokenizer / mvar_jax.convert" + (
            f"; a training work directory? its model is {directory / 'model'}"
            if (directory / "model" / PARAMS_DIR).exists()
            else ""
        )
        raise CheckpointError(
            f"incomplete {kind} directory {directory}: missing {', '.join(missing)} ({hint})"
        )
    return directory


def _read_config(directory: pathlib.Path, name: str, cls: type) -> Any:
    try:
        config = cls.from_dict(json.loads((directory / name).read_text()))
        if cls is TransformerConfig:
            families.of(config)  # the family's own checks
        return config
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"invalid config JSON in {directory}: {name}: {e}") from e


def _damaged(params_dir: pathlib.Path, error: Exception | None = None) -> CheckpointError:
    """A model directory whose params cannot be read: one line, what to do."""
    what = "its params cannot be read"
    if error is not None:  # the first clause of Orbax's / TensorStore's message, not its spec
        detail = str(error).split(" [tensorstore_spec")[0].split(" See full TensorStore")[0]
        what += f" ({type(error).__name__}: {detail.splitlines()[0][:160] if detail else ''})"
    return CheckpointError(
        f"damaged model directory {params_dir.parent}: {what}; write it again (python -m "
        "mvar_jax.convert ... --overwrite, or the training run's export)"
    )


def _stored_tree(params_dir: pathlib.Path) -> Any:
    """The saved tree of array metadata (leaves have ``.shape``).

    Read before any array, so that a mismatch names the parameters and a damaged
    directory is reported before TensorStore starts reading it.
    """
    if not (params_dir / "manifest.ocdbt").is_file():  # TensorStore's index of the arrays
        raise _damaged(params_dir)
    with ocp.PyTreeCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(params_dir)
        except Exception as e:  # Orbax raises several types for unreadable metadata.
            raise _damaged(params_dir, e) from e
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if tree is None:  # Orbax logs why and returns nothing
        raise _damaged(params_dir)
    return tree


def _restore(directory: pathlib.Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The subtrees named in ``expected`` from ``directory/params``, on one device.

    The stored shapes are checked first (a mismatch names the parameters instead
    of surfacing as an Orbax restore error). Stored subtrees not in ``expected``
    (a generator's transformer when only the VQVAE is wanted) are not read.
    """
    params_dir = directory / PARAMS_DIR
    stored = _stored_tree(params_dir)
    if not isinstance(stored, dict) or not set(expected) <= set(stored):
        held = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise CheckpointError(f"{params_dir} holds {held}, expected {sorted(expected)}")
    _check_params(stored, expected, str(directory))
    # An explicit single-device target: without one Orbax rebuilds the saved
    # sharding, which fails on a machine with a different device count.
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), expected)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(
            params_dir,
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    except Exception as e:  # Orbax raises several types for unreadable arrays.
        # Left open: closing it under reads still in flight makes TensorStore's callbacks
        # print a traceback each into the closed event loop.
        raise _damaged(params_dir, e) from e
    checkpointer.close()
    return restored


def load_model(directory: str | os.PathLike) -> ModelBundle:
    """Reads a generator model directory written by ``save_model``, ready to sample.

    Params come back as jax arrays on one device, the transformer's blocks
    stacked on a leading depth axis (``transformer.stack_blocks``): the layout in
    which ``sampling.sample`` runs the blocks as one scan per scale, compiling
    fast and holding one block's temporaries at a time (``unstack_blocks`` gives
    the per-block tree the trainer uses). Raises CheckpointError for a missing,
    incomplete or unreadable directory, or a tokenizer directory, and
    StateDictMismatchError (a CheckpointError) when its configs do not describe
    its params.
    """
    directory = _existing(directory, "model", (_VQVAE_CONFIG, PARAMS_DIR))
    if not (directory / _TRANSFORMER_CONFIG).exists():
        stored = _stored_tree(directory / PARAMS_DIR)
        if isinstance(stored, dict) and set(stored) == {"vqvae"}:
            raise CheckpointError(
                f"{directory} is a tokenizer directory (a VQVAE alone, no transformer); a "
                "generator model (VQVAE + transformer, from train.py or mvar_jax.convert "
                "--mvar/--var) was expected"
            )
        _existing(directory, "model", (_TRANSFORMER_CONFIG,))  # Raises: incomplete.
    vqvae_config = _read_config(directory, _VQVAE_CONFIG, VQVAEConfig)
    transformer_config = _read_config(directory, _TRANSFORMER_CONFIG, TransformerConfig)
    mismatch = _config_mismatch(vqvae_config, transformer_config)
    if mismatch:
        raise CheckpointError(f"{directory}: {mismatch}")
    params = _restore(directory, _expected_params(vqvae_config, transformer_config))
    transformer_params = stack_blocks(params.pop("transformer"), transformer_config.depth)
    return ModelBundle(vqvae_config, params["vqvae"], transformer_config, transformer_params)


def abstract_model(vqvae_config: VQVAEConfig, transformer_config: TransformerConfig) -> ModelBundle:
    """What ``load_model`` returns for these configs, as ``jax.ShapeDtypeStruct`` params
    (nothing allocated): for lowering the programs a loaded model runs."""
    return ModelBundle(
        vqvae_config,
        abstract_variables(vqvae_config),
        transformer_config,
        param_shapes(transformer_config, stacked=True),
    )


def read_vqvae_config(directory: str | os.PathLike) -> VQVAEConfig:
    """The tokenizer config of a model or tokenizer directory, without reading any params."""
    directory = _existing(directory, "model", (_VQVAE_CONFIG,))
    return _read_config(directory, _VQVAE_CONFIG, VQVAEConfig)


def load_tokenizer(directory: str | os.PathLike) -> tuple[VQVAEConfig, Any]:
    """``(config, {'params': ...})`` of a tokenizer directory or of a generator model's VQVAE.

    From a generator model only the VQVAE subtree is read. Raises CheckpointError
    as ``load_model`` does.
    """
    directory = _existing(directory, "tokenizer", (_VQVAE_CONFIG, PARAMS_DIR))
    config = _read_config(directory, _VQVAE_CONFIG, VQVAEConfig)
    return config, _restore(directory, {"vqvae": abstract_variables(config)})["vqvae"]


def load_vqvae_checkpoint(
    path: str | os.PathLike, patch_nums: tuple[int, ...] | None = None
) -> tuple[VQVAEConfig, Any]:
    """The VQVAE a config's ``vqvae_checkpoint`` names: an official ``.pth``, a tokenizer
    directory, or a generator model directory (its VQVAE).

    ``patch_nums``: the run's token pyramid (default: the file's, or the official
    release's for a ``.pth``); it does not change the weights, except that a
    tokenizer with one Phi per scale needs as many scales as it was trained with.
    """
    if not os.path.isdir(path):
        extra = {} if patch_nums is None else {"patch_nums": tuple(patch_nums)}
        return vqvae_weights.load_official_vqvae(path, **extra)
    config, params = load_tokenizer(path)
    if patch_nums is None or tuple(patch_nums) == config.patch_nums:
        return config, params
    try:
        run_config = dataclasses.replace(config, patch_nums=tuple(patch_nums))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    held, needed = (
        num_phis(c.quant_resi, c.share_quant_resi, len(c.patch_nums)) for c in (config, run_config)
    )
    if held != needed:
        raise CheckpointError(
            f"{path}: the tokenizer has one Phi per scale ({held}, share_quant_resi=0) but "
            f"patch_nums {tuple(patch_nums)} has {needed} scales"
        )
    return run_config, params
