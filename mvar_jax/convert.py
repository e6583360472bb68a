"""Official PyTorch checkpoints <-> the model directories the sampler and trainer read.

    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --mvar mvar-d16.pth --out ckpt/mvar-d16
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out ckpt/var-d16
    python -m mvar_jax.convert ... --var var_d16.pth --as-mvar   # MVAR fine-tuning start
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --m-var d16.pth --out ckpt/m-var-d16
    python -m mvar_jax.convert --vae vae_ch160v4096z32.pth --out ckpt/vae   # tokenizer alone
    python -m mvar_jax.convert --to-official-vae vae.pth --model ckpt/vae   # and back

A generator model directory (``checkpoint.save_model``) holds both networks'
params and configs, so nothing else is needed to sample from it; a tokenizer
directory (``checkpoint.save_tokenizer``) holds the VQVAE alone.
``--to-official-vae`` writes the VQVAE of either as an official state dict that
the PyTorch ``VQVAE`` loads with ``strict=True``. The attention pattern
comes from the flag, not the file: the official MVAR fine-tuning loads VAR's
state dict whole, so its checkpoints may carry VAR's training mask. M-VAR
(``--m-var``, model attention ``'mamba'``) is a different network, not an
attention pattern: its file must hold the Mamba2 layers.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from mvar_jax import checkpoint, cli, transformer_weights, vqvae_weights
from mvar_jax.torch_checkpoint import CheckpointError
from mvar_jax.transformer import MODEL_NAMES
from mvar_jax.vqvae import VQVAEConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mvar_jax.convert",
        description="Convert official VQVAE (+ MVAR/VAR/M-VAR) .pth files into a mvar_jax model "
                    "directory (a tokenizer directory with --vae alone), or a tokenizer "
                    "back into an official VQVAE .pth (--to-official-vae).")
    parser.add_argument("--vae", type=pathlib.Path,
                        help="official VQVAE state dict (vae_ch160v4096z32.pth); without "
                             "--mvar/--var/--m-var, --out becomes a tokenizer directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--mvar", type=pathlib.Path,
                       help="official MVAR checkpoint (mvar-d16.pth, mvar-finetune-d16.pth, ...)")
    which.add_argument("--var", type=pathlib.Path,
                       help="official VAR checkpoint (var_d16.pth, ...): sampled with a KV cache")
    which.add_argument("--m-var", type=pathlib.Path,
                       help="official M-VAR checkpoint (OliverRensu/MVAR: d16.pth, ...): "
                            "attention within scales, Mamba2 across them")
    parser.add_argument("--as-mvar", action="store_true",
                        help="with --var: load the VAR weights into an MVAR model "
                             "(the starting point of MVAR fine-tuning)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="model directory to write")
    parser.add_argument("--to-official-vae", type=pathlib.Path, metavar="OUT.pth",
                        help="write the VQVAE of --model as an official VQVAE state dict")
    parser.add_argument("--model", type=pathlib.Path,
                        help="with --to-official-vae: a tokenizer or generator model directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the model in --out (whole: written beside it, then "
                             "renamed; a directory holding other files is refused), or an "
                             "existing --to-official-vae file")
    parser.add_argument("--num-heads", type=int,
                        help="attention heads (default: depth, or read off the checkpoint)")
    parser.add_argument("--kernel-size", type=int,
                        help="MVAR spatial-Markov neighbourhood side (default 7)")
    parser.add_argument("--refine-step", type=int,
                        help="first scale with spatial-Markov attention (default 8)")
    parser.add_argument("--patch-nums", type=cli.int_list("ints", "1,2,3,4,5,6,8,10,13,16"),
                        help="token pyramid sides (default 1,2,3,4,5,6,8,10,13,16)")
    return parser


def convert(args: argparse.Namespace) -> str:
    """Reads both official files, checks they fit, writes ``args.out``; returns a summary."""
    patch_nums = {} if args.patch_nums is None else {"patch_nums": args.patch_nums}
    overrides = {name: value for name, value in (("num_heads", args.num_heads),
                                                  ("kernel_size", args.kernel_size),
                                                  ("refine_step", args.refine_step))
                 if value is not None}
    if args.m_var is not None:
        attention, weights = "mamba", args.m_var
    elif args.var is not None:
        attention, weights = ("mvar" if args.as_mvar else "var"), args.var
    else:
        attention, weights = "mvar", args.mvar
    vqvae_config, vqvae_params = vqvae_weights.load_official_vqvae(args.vae, **patch_nums)
    transformer_config, transformer_params = transformer_weights.load_transformer(
        weights, attention=attention, **patch_nums, **overrides)
    checkpoint.check_configs(vqvae_config, transformer_config)
    checkpoint.save_model(args.out, vqvae_config=vqvae_config, vqvae_params=vqvae_params,
                          transformer_config=transformer_config,
                          transformer_params=transformer_params, overwrite=args.overwrite)
    t = transformer_config
    return (f"wrote {args.out}: {MODEL_NAMES[t.attention]} depth {t.depth}, width {t.embed_dim}, "
            f"{t.num_heads} heads, {t.num_classes} classes, vocab {t.vocab_size}, "
            f"{vqvae_config.image_size}px")


def _describe(v: VQVAEConfig) -> str:
    return f"vocab {v.vocab_size}, Cvae {v.z_channels}, ch {v.ch}, {v.image_size}px"


def convert_tokenizer(args: argparse.Namespace) -> str:
    """Reads the official VQVAE file alone, writes ``args.out`` as a tokenizer directory."""
    patch_nums = {} if args.patch_nums is None else {"patch_nums": args.patch_nums}
    config, params = vqvae_weights.load_official_vqvae(args.vae, **patch_nums)
    checkpoint.save_tokenizer(args.out, vqvae_config=config, vqvae_params=params,
                              overwrite=args.overwrite)
    return f"wrote {args.out}: tokenizer (VQVAE alone), {_describe(config)}"


def export_official_vae(args: argparse.Namespace) -> str:
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


def _given(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    """The flags among ``dests`` that were set on the command line."""
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d) not in (None, False)]


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exits with a usage error on a flag combination that names no conversion."""
    if args.to_official_vae is not None:
        extra = _given(args, ("vae", "mvar", "var", "m_var", "out", "as_mvar", "num_heads",
                              "kernel_size", "refine_step", "patch_nums"))
        if extra:
            parser.error(f"--to-official-vae writes the VQVAE of --model; {', '.join(extra)} "
                         "do not apply")
        if args.model is None:
            parser.error("--to-official-vae needs --model (a tokenizer or generator model "
                         "directory)")
        if args.to_official_vae.is_dir():
            parser.error(f"--to-official-vae {args.to_official_vae} is a directory; name the "
                         ".pth file to write")
        if args.to_official_vae.exists() and not args.overwrite:
            parser.error(f"--to-official-vae {args.to_official_vae} exists; pass --overwrite "
                         "to replace it")
        return
    if args.model is not None:
        parser.error("--model names the directory that --to-official-vae exports")
    if args.vae is None or args.out is None:
        parser.error("the following arguments are required: --vae, --out "
                     "(or --to-official-vae with --model)")
    if args.as_mvar and args.var is None:
        parser.error("--as-mvar converts VAR weights; it needs --var")
    if args.mvar is None and args.var is None and args.m_var is None:
        extra = _given(args, ("num_heads", "kernel_size", "refine_step"))
        if extra:
            parser.error(f"{', '.join(extra)} configure a transformer; they need --mvar or --var "
                         "(or --m-var)")
    if args.m_var is not None and (args.kernel_size is not None or args.refine_step is not None):
        parser.error("--kernel-size and --refine-step set MVAR's spatial-Markov attention; "
                     "M-VAR attends within whole scales")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty; pass --overwrite to replace the model in it")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    if args.to_official_vae is not None:
        run = export_official_vae
    else:
        transformer = (args.mvar, args.var, args.m_var)
        run = convert if any(f is not None for f in transformer) else convert_tokenizer
    try:
        print(run(args))
    except (CheckpointError, ValueError, OSError) as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
