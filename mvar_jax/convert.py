"""Official PyTorch checkpoints <-> the model directories the sampler and trainer read.

    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --mvar mvar-d16.pth --out ckpt/mvar_d16
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out ckpt/var_d16
    python -m mvar_jax.convert ... --mvar var_d16.pth   # VAR weights as MVAR: the fine-tuning start
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --m_var d16.pth --out ckpt/m_var_d16
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --out ckpt/vae   # tokenizer alone
    python -m mvar_jax.convert --to_official_vae vae.pth --model ckpt/vae   # and back
    python -m mvar_jax.convert --to_official_mvar mvar-d16.pth --model ckpt/mvar_d16

A generator model directory (``checkpoint.save_model``) holds both networks'
params and configs, so nothing else is needed to sample from it; a tokenizer
directory (``checkpoint.save_tokenizer``) holds the VQVAE alone.
``--to_official_vae`` writes the VQVAE of either as an official state dict that
the PyTorch ``VQVAE`` loads with ``strict=True``; ``--to_official_<family>`` (one
per family) writes a generator's transformer as that family's official state
dict, buffers included, for its class's ``strict=True`` loading. The model family comes from
the flag (one per family, ``models.families``), not the file: the official MVAR
fine-tuning loads VAR's state dict whole, so its checkpoints may carry VAR's
training mask. M-VAR (``--m_var``) is a different network: its file must hold
the Mamba2 layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import types
from collections.abc import Iterator, Sequence

import numpy as np
from absl import flags

from mvar_jax import checkpoint, cli
from mvar_jax.errors import CheckpointError
from mvar_jax.models import families
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.weights import transformer as transformer_weights, vqvae as vqvae_weights
from mvar_jax.weights.contents import contents
from mvar_jax.weights.state_dict import load_official

PROG = "python -m mvar_jax.convert"
_TRANSFORMER_FLAGS = tuple(f"--{name}" for name in families.NAMES)
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
_EXPORTS = ("to_official_vae", *(f"to_official_{name}" for name in families.NAMES))
_PATHS = ("vae", *families.NAMES, "out", *_EXPORTS, "model")

flags.DEFINE_string(
    "vae",
    None,
    "official VQVAE state dict (vae_ch160v4096z32.pth); without a transformer "
    f"({'/'.join('--' + name for name in families.NAMES)}), --out becomes a tokenizer directory",
    flag_values=FLAGS,
)
for _family in families.FAMILIES.values():
    flags.DEFINE_string(
        _family.name,
        None,
        f"official {_family.title} checkpoint (.pth, plain or a release trainer state): {_family.summary}",
        flag_values=FLAGS,
    )
flags.DEFINE_string("out", None, "model directory to write", flag_values=FLAGS)
flags.DEFINE_string(
    "to_official_vae", None, "OUT.pth: the VQVAE of --model as an official state dict", flag_values=FLAGS
)
for _family in families.FAMILIES.values():
    flags.DEFINE_string(
        f"to_official_{_family.name}",
        None,
        f"OUT.pth: the transformer of the {_family.title} generator --model as an official state dict",
        flag_values=FLAGS,
    )
flags.DEFINE_string(
    "model",
    None,
    "with --to_official_vae: a tokenizer or generator model directory; with --to_official_<family>: "
    "a generator model directory",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "replace the model in --out (whole: written beside it, "
    "then renamed; a directory holding other files is refused), or an existing "
    "--to_official_* file",
    flag_values=FLAGS,
)
for _name, _help in (
    ("num_heads", "attention heads (default: depth, or read off the checkpoint)"),
    ("kernel_size", "MVAR's spatial-Markov neighbourhood side (default 7)"),
    ("refine_step", "MVAR's first scale with spatial-Markov attention (default 8)"),
):
    flags.DEFINE_integer(_name, None, _help, flag_values=FLAGS)
cli.define_int_list(
    "patch_nums",
    None,
    "token pyramid sides (default: the official 256 or 512 px pyramid, told by the transformer's length)",
    FLAGS,
    what="ints",
    example="1,2,3,4,5,6,8,10,13,16",
)


def convert(args: types.SimpleNamespace) -> str:
    """Reads both official files, checks they fit, writes ``args.out``; returns a summary."""
    overrides = {
        name: value
        for name, value in (
            ("num_heads", args.num_heads),
            ("kernel_size", args.kernel_size),
            ("refine_step", args.refine_step),
        )
        if value is not None
    }
    family, weights = _transformer_flag(args)
    with _naming(f"--vae {args.vae}"):
        vqvae_state_dict = _read_vqvae(args)
    with _naming(f"--{family} {weights}"):
        state_dict = _read_transformer(args, family, weights)
        transformer_config = transformer_weights.config_from_state_dict(
            state_dict, family=family, patch_nums=args.patch_nums, **overrides
        )
        transformer_params = transformer_weights.params_from_state_dict(state_dict, transformer_config)
    with _naming(f"--vae {args.vae}"):  # the tokenizer records no pyramid: the transformer's
        vqvae_config, vqvae_params = vqvae_weights.vqvae_from_state_dict(
            vqvae_state_dict, patch_nums=transformer_config.patch_nums
        )
    checkpoint.check_configs(vqvae_config, transformer_config)
    checkpoint.save_model(
        args.out,
        vqvae_config=vqvae_config,
        vqvae_params=vqvae_params,
        transformer_config=transformer_config,
        transformer_params=transformer_params,
        overwrite=args.overwrite,
    )
    t = transformer_config
    return (
        f"wrote {args.out}: {families.get(t.family).title} depth {t.depth}, width {t.embed_dim}, "
        f"{t.num_heads} heads, {t.num_classes} classes, vocab {t.vocab_size}, "
        f"{vqvae_config.image_size}px"
    )


def _transformer_flag(args: types.SimpleNamespace) -> tuple[str, pathlib.Path] | tuple[None, None]:
    """The family whose flag names a transformer file, and the file."""
    for name in families.NAMES:
        if getattr(args, name) is not None:
            return name, getattr(args, name)
    return None, None


@contextlib.contextmanager
def _naming(source: str) -> Iterator[None]:
    """A CheckpointError about a file, prefixed with the flag that named it (unless it says so)."""
    try:
        yield
    except CheckpointError as e:
        if str(e).startswith("--"):
            raise
        raise CheckpointError(f"{source}: {e}") from e


def _read_vqvae(args: types.SimpleNamespace) -> dict[str, np.ndarray]:
    """``--vae``'s state dict, refused with a hint when it holds a transformer."""
    state_dict, _ = load_official(args.vae)
    found = contents(state_dict)
    if found.kind == "transformer":
        flag = f"--{found.family}" if found.family else _TRANSFORMER_FLAGS[0]
        given = [f for f in _TRANSFORMER_FLAGS if getattr(args, f.lstrip("-"))]
        hint = (
            f"did you swap --vae and {given[0]}?" if given else f"pass it as {flag}, with its VQVAE as --vae"
        )
        raise CheckpointError(f"--vae {args.vae} holds {found.describe()}, not a VQVAE: {hint}")
    return state_dict


def _read_transformer(args: types.SimpleNamespace, family: str, path: pathlib.Path) -> dict[str, np.ndarray]:
    """``--<family>``'s state dict: refused with a hint when it holds a VQVAE; converted with a
    warning that says what changes when it holds another family's weights of the same layout."""
    state_dict, wrappers = load_official(path)
    found = contents(state_dict, wrappers, args.patch_nums)
    if found.kind == "vqvae":
        raise CheckpointError(
            f"--{family} {path} holds a VQVAE, not transformer weights: did you swap --vae and --{family}?"
        )
    if found.family and found.family != family and not families.get(found.family).weights_marker:
        held, asked = families.get(found.family), families.get(family)
        print(
            f"{PROG}: warning: --{family} {path} holds {held.title} weights (trained with {held.summary}); "
            f"converted as {asked.title}, they attend as {asked.title} does ({asked.summary}). "
            f"To keep them {held.title}, convert with --{held.name}.",
            file=sys.stderr,
        )
    return state_dict


def _describe(v: VQVAEConfig) -> str:
    return f"vocab {v.vocab_size}, Cvae {v.z_channels}, ch {v.ch}, {v.image_size}px"


def convert_tokenizer(args: types.SimpleNamespace) -> str:
    """Reads the official VQVAE file alone, writes ``args.out`` as a tokenizer directory."""
    patch_nums = {} if args.patch_nums is None else {"patch_nums": args.patch_nums}
    with _naming(f"--vae {args.vae}"):
        config, params = vqvae_weights.vqvae_from_state_dict(_read_vqvae(args), **patch_nums)
    checkpoint.save_tokenizer(args.out, vqvae_config=config, vqvae_params=params, overwrite=args.overwrite)
    return f"wrote {args.out}: tokenizer (VQVAE alone), {_describe(config)}"


def export_official_vae(args: types.SimpleNamespace) -> str:
    """Writes the VQVAE of the directory ``args.model`` as the official ``.pth``; says how
    PyTorch loads it."""
    config, params = checkpoint.load_tokenizer(args.model)
    args.to_official_vae.absolute().parent.mkdir(parents=True, exist_ok=True)
    vqvae_weights.save_official_vqvae(args.to_official_vae, config, params)
    try:
        call = ", ".join(f"{k}={v!r}" for k, v in vqvae_weights.official_class_args(config).items())
        how = f"PyTorch: VQVAE({call}).load_state_dict(state_dict, strict=True)"
    except ValueError as e:
        how = f"note: {e}"
    return f"wrote {args.to_official_vae}: official VQVAE state dict, {_describe(config)}\n{how}"


def export_official_transformer(args: types.SimpleNamespace) -> str:
    """Writes the transformer of the generator ``args.model`` as the official ``.pth`` of the
    family its ``--to_official_<family>`` flag names; says how PyTorch loads it."""
    export = _export_flag(args)
    asked = families.get(export.removeprefix("to_official_"))
    model = checkpoint.load_model(args.model)
    config, params = model.transformer_config, model.transformer_params
    held = families.get(config.family)
    if held is not asked:
        if held.weights_marker or asked.weights_marker:  # another network, not another mask
            raise CheckpointError(
                f"--model {args.model} holds {held.title} weights; {asked.title}'s files hold another "
                f"network: export them with --to_official_{held.name}"
            )
        print(
            f"{PROG}: warning: --model {args.model} holds {held.title} weights ({held.summary}); "
            f"written as {asked.title}'s file, the official {asked.title} code attends as {asked.title} "
            f"does ({asked.summary}). To keep it {held.title}, export with --to_official_{held.name}.",
            file=sys.stderr,
        )
        config = dataclasses.replace(config, family=asked.name)
    out = getattr(args, export)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    transformer_weights.save_official_transformer(out, config, params)
    call = ", ".join(f"{k}={v!r}" for k, v in transformer_weights.official_class_args(config).items())
    return (
        f"wrote {out}: official {asked.title} state dict, depth {config.depth}, width {config.embed_dim}, "
        f"{config.num_heads} heads, {config.num_classes} classes, vocab {config.vocab_size}\n"
        f"PyTorch: the official {asked.title} class with {call} (and the VQVAE: --to_official_vae), "
        "then load_state_dict(state_dict, strict=True)"
    )


def _export_flag(args: types.SimpleNamespace) -> str | None:
    """The ``--to_official_*`` flag given, if any."""
    return next((name for name in _EXPORTS if getattr(args, name) is not None), None)


def _check_args(args: types.SimpleNamespace) -> None:
    """Exits with a usage error on a flag combination that names no conversion."""

    def error(message: str):
        cli.usage_error(PROG, message)

    export = _export_flag(args)
    if export is not None:
        exports = cli.given(FLAGS, _EXPORTS)
        if len(exports) > 1:
            error(f"{' and '.join(exports)}: export one file at a time")
        what = "the VQVAE" if export == "to_official_vae" else "the transformer"
        extra = cli.given(
            FLAGS, ("vae", *families.NAMES, "out", "num_heads", "kernel_size", "refine_step", "patch_nums")
        )
        if extra:
            error(f"--{export} writes {what} of --model; {', '.join(extra)} do not apply")
        target = getattr(args, export)
        if args.model is None:
            kind = "a tokenizer or generator" if export == "to_official_vae" else "a generator"
            error(f"--{export} needs --model ({kind} model directory)")
        if target.is_dir():
            error(f"--{export} {target} is a directory; name the .pth file to write")
        if target.exists() and not args.overwrite:
            error(f"--{export} {target} exists; pass --overwrite to replace it")
        return
    if args.model is not None:
        error("--model names the directory that --to_official_vae or --to_official_<family> exports")
    weights = cli.given(FLAGS, families.NAMES)
    if len(weights) > 1:
        error(f"{' and '.join(weights)}: convert one transformer at a time")
    if args.vae is None or args.out is None:
        error("the following arguments are required: --vae, --out (or --to_official_vae with --model)")
    if not weights:
        extra = cli.given(FLAGS, ("num_heads", "kernel_size", "refine_step"))
        if extra:
            need = ", ".join(_TRANSFORMER_FLAGS)
            error(f"{', '.join(extra)} configure a transformer; they need one of {need}")
    family, _ = _transformer_flag(args)
    mvar_only = cli.given(FLAGS, ("kernel_size", "refine_step"))
    if family is not None and not families.get(family).spatial_markov and mvar_only:
        error(f"{', '.join(mvar_only)} set MVAR's spatial-Markov attention; --{family} has none")
    if args.out.exists() and not args.out.is_dir():
        error(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        error(f"--out {args.out} is not empty; pass --overwrite to replace the model in it")


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    for name in _PATHS:
        if getattr(args, name) is not None:
            setattr(args, name, pathlib.Path(getattr(args, name)))
    _check_args(args)
    export = _export_flag(args)
    if export == "to_official_vae":
        run = export_official_vae
    elif export is not None:
        run = export_official_transformer
    else:
        run = convert if _transformer_flag(args)[0] is not None else convert_tokenizer
    try:
        print(run(args))
    except (CheckpointError, ValueError, OSError) as e:
        cli.usage_error(PROG, str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
