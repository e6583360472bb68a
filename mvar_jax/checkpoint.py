"""A trained model on disk: both networks' params (Orbax) and their configs (JSON).

Layout of a model directory::

    vqvae_config.json        VQVAEConfig.to_dict()
    transformer_config.json  TransformerConfig.to_dict()
    params/                  Orbax tree {'vqvae': ..., 'transformer': ...}

Written by the converter (official .pth -> JAX) and at the end of training; read
by the sampler. The configs travel with the params, so loading needs nothing else,
and loading checks that they describe those params.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mvar_jax.torch_checkpoint import CheckpointError, check_keys
from mvar_jax.transformer import TransformerConfig, param_shapes
from mvar_jax.vqvae import VQVAEConfig, abstract_variables

_VQVAE_CONFIG = "vqvae_config.json"
_TRANSFORMER_CONFIG = "transformer_config.json"
PARAMS_DIR = "params"  # Orbax commits it atomically: its presence means a complete save.


class ModelBundle(NamedTuple):
    vqvae_config: VQVAEConfig
    vqvae_params: Any
    transformer_config: TransformerConfig
    transformer_params: Any


def _config_mismatch(v: VQVAEConfig, t: TransformerConfig) -> str | None:
    if (v.patch_nums, v.z_channels, v.vocab_size) == (t.patch_nums, t.cvae, t.vocab_size):
        return None
    return (f"the VQVAE (patch_nums {v.patch_nums}, Cvae {v.z_channels}, vocab {v.vocab_size}) "
            f"and the transformer (patch_nums {t.patch_nums}, Cvae {t.cvae}, vocab "
            f"{t.vocab_size}) do not fit together")


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
    return {"vqvae": abstract_variables(vqvae_config),
            "transformer": param_shapes(transformer_config)}


def check_bundle(bundle: ModelBundle, source: str = "model", *,
                 expected: dict | None = None) -> None:
    """Raises unless the configs fit together and each param tree has their shapes.

    A model whose config JSON was edited, or that was assembled from two models,
    fails here with the differing parameters named (StateDictMismatchError)
    rather than deep inside a compiled sampler or train step. Messages start
    with ``source`` (e.g. the directory). Leaves need only a ``.shape``, so
    this also checks Orbax metadata before anything is read. ``expected``:
    ``_expected_params`` of the bundle's configs, if the caller already has it.
    """
    mismatch = _config_mismatch(bundle.vqvae_config, bundle.transformer_config)
    if mismatch:
        raise CheckpointError(f"{source}: {mismatch}")
    if expected is None:
        expected = _expected_params(bundle.vqvae_config, bundle.transformer_config)
    for what, key, params in (("VQVAE params", "vqvae", bundle.vqvae_params),
                              ("transformer params", "transformer", bundle.transformer_params)):
        check_keys(_flat(params), {k: v.shape for k, v in _flat(expected[key]).items()},
                   what=f"{source}: {what}")


def save_model(directory: str | os.PathLike, *, vqvae_config: VQVAEConfig, vqvae_params: Any,
               transformer_config: TransformerConfig, transformer_params: Any,
               overwrite: bool = False) -> None:
    """Writes a model directory (all hosts must call it; process 0 writes the JSON)."""
    directory = pathlib.Path(directory).absolute()
    if (directory / PARAMS_DIR).exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already holds a model; pass overwrite=True to replace it")
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _VQVAE_CONFIG).write_text(json.dumps(vqvae_config.to_dict(), indent=1))
        (directory / _TRANSFORMER_CONFIG).write_text(
            json.dumps(transformer_config.to_dict(), indent=1))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR,
                          {"vqvae": vqvae_params, "transformer": transformer_params},
                          force=overwrite)


def load_model(directory: str | os.PathLike) -> ModelBundle:
    """Reads a model directory written by ``save_model``; params come back as jax arrays.

    Raises CheckpointError for a missing, incomplete or unreadable directory, and
    StateDictMismatchError (a CheckpointError) when its configs do not describe
    its params (``check_bundle``).
    """
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"model directory not found: {directory}")
    missing = [name for name in (_VQVAE_CONFIG, _TRANSFORMER_CONFIG, PARAMS_DIR)
               if not (directory / name).exists()]
    if missing:
        raise CheckpointError(
            f"incomplete model directory {directory}: missing {', '.join(missing)} "
            "(expected the output of save_model / mvar_jax.convert)")
    try:
        vqvae_config = VQVAEConfig.from_dict(json.loads((directory / _VQVAE_CONFIG).read_text()))
        transformer_config = TransformerConfig.from_dict(
            json.loads((directory / _TRANSFORMER_CONFIG).read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"invalid config JSON in {directory}: {e}") from e
    params_dir = directory / PARAMS_DIR
    expected = _expected_params(vqvae_config, transformer_config)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            metadata = checkpointer.metadata(params_dir)
        except Exception as e:  # Orbax raises several types for unreadable metadata.
            raise CheckpointError(f"cannot read the params metadata in {params_dir}: "
                                  f"{type(e).__name__}: {e}") from e
        # Orbax 0.12 exposes the saved tree here; other versions may not, and then
        # the restore below still catches a mismatch, if less readably.
        stored = getattr(getattr(metadata, "item_metadata", None), "tree", None)
        if stored is not None:
            if not isinstance(stored, dict) or set(stored) != {"vqvae", "transformer"}:
                held = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
                raise CheckpointError(
                    f"{params_dir} holds {held}, expected ['transformer', 'vqvae']")
            # Check the stored shapes first: a mismatch names the parameters
            # instead of surfacing as an Orbax restore error.
            check_bundle(ModelBundle(vqvae_config, stored["vqvae"], transformer_config,
                                     stored["transformer"]), source=str(directory),
                         expected=expected)
        # An explicit single-device target: without one Orbax rebuilds the saved
        # sharding, which fails on a machine with a different device count.
        on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), expected)
        try:
            params = checkpointer.restore(params_dir, target)
        except Exception as e:  # Orbax raises several types for unreadable arrays.
            raise CheckpointError(f"cannot restore params from {params_dir}: "
                                  f"{type(e).__name__}: {e}") from e
    return ModelBundle(vqvae_config, params["vqvae"], transformer_config, params["transformer"])
