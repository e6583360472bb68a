"""Class-conditional sampling from a model directory (``mvar_jax.convert`` or training).

    python sample.py --checkpoint ckpt/mvar_d16 --labels 3,1 --cfg 1.5 --top_k 900 \\
        --top_p 0.96 --seed 0 --out samples.png
    python sample.py --checkpoint ckpt/mvar_d16 --num_per_class 50 --batch_size 64 \\
        --fid_npz mvar_d16_50k.npz        # every class, for the standard FID evaluators

``--out`` ending ``.npz`` stores ``images`` (N, H, W, 3) float32 in [0, 1], ``tokens``
(N, L) int32 and ``labels``; ending ``.png`` it is a grid with each image's class
written under it. ``--fid_npz`` stores uint8 ``arr_0`` (N, H, W, 3). Batch b draws
from ``fold_in(PRNGKey(seed), b)``: the same seed and batch size give the same images.
A file appears only when whole: a run killed while writing ``FILE`` leaves
``FILE.incomplete-<pid>``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types
from collections.abc import Sequence

import numpy as np
from absl import flags

from mvar_jax import checkpoint, cli, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.errors import CheckpointError
from mvar_jax.images import labelled_grid, to_uint8
from mvar_jax.models.config import NEIGHBORHOOD_IMPLS

PROG = "sample.py"
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
cli.define_checkpoint_flag(FLAGS)
cli.define_sampling_flags(FLAGS, batch_size=32)
flags.DEFINE_integer("num_per_class", 1, "images per label", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool(
    "more_smooth",
    False,
    "Gumbel-softmax codebook mixing (visualisation only, not for FID)",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "transformer compute dtype (default: the checkpoint's)",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "neighborhood_impl",
    None,
    list(NEIGHBORHOOD_IMPLS),
    "spatial-Markov attention: the Pallas kernel or the pure-jnp reference "
    "(default: the checkpoint's, normally 'auto')",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "decode_batch_size",
    sampling.DECODE_BATCH_SIZE,
    "images the VQVAE decodes at a time, so that decoding never sets the peak memory",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "chunk_tokens",
    sampling.CHUNK_TOKENS,
    "MVAR: tokens per chunk of images each scale runs at a time (memory vs speed)",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_string("out", None, "FILE.npz or FILE.png", flag_values=FLAGS)
flags.DEFINE_string(
    "fid_npz", None, "also write uint8 arr_0 (N, H, W, 3) for FID evaluators", flag_values=FLAGS
)


def parse(argv: Sequence[str] | None) -> types.SimpleNamespace:
    """The flags, checked; ``out`` and ``fid_npz`` as paths."""
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    args.out = None if args.out is None else pathlib.Path(args.out)
    args.fid_npz = None if args.fid_npz is None else pathlib.Path(args.fid_npz)
    if args.out is None and args.fid_npz is None:
        cli.usage_error(PROG, "nothing to write: pass --out FILE.npz|FILE.png and/or --fid_npz FILE")
    if args.out is not None and args.out.suffix not in (".npz", ".png"):
        cli.usage_error(PROG, f"--out must end in .npz or .png, got {args.out}")
    if args.fid_npz is not None and args.fid_npz.suffix != ".npz":
        cli.usage_error(PROG, f"--fid_npz must end in .npz (an npz archive of arr_0), got {args.fid_npz}")
    args.options = cli.sampling_options(
        FLAGS,
        PROG,
        more_smooth=args.more_smooth,
        decode_batch_size=args.decode_batch_size,
        chunk_tokens=args.chunk_tokens,
    )
    return args


def load(args: types.SimpleNamespace) -> checkpoint.ModelBundle:
    """The model, checked against its configs, at the requested precision."""
    try:
        model = checkpoint.load_model(args.checkpoint)  # Checks configs against weights.
    except (CheckpointError, ValueError, OSError) as e:
        named = str(args.checkpoint) in str(e)  # most errors start with the directory already
        cli.usage_error(PROG, str(e) if named else f"--checkpoint {args.checkpoint}: {e}")
    overrides = {
        name: value
        for name, value in (("dtype", args.dtype), ("neighborhood_impl", args.neighborhood_impl))
        if value is not None
    }
    if overrides:
        model = model._replace(transformer_config=dataclasses.replace(model.transformer_config, **overrides))
    return model


def write_out(
    path: pathlib.Path, images_NHW3: np.ndarray, tokens_NL: np.ndarray, labels_N: np.ndarray
) -> None:
    """``.npz`` with images, tokens and labels, or a labelled ``.png`` grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # killed half-way: no file named ``path``
        if path.suffix == ".npz":
            np.savez(f, images=images_NHW3, tokens=tokens_NL, labels=labels_N)
        else:
            labelled_grid(images_NHW3, labels_N).save(f, format="PNG")
    print(f"wrote {len(images_NHW3)} images to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    model = load(args)
    num_classes = model.transformer_config.num_classes
    labels = list(range(num_classes)) if args.labels is None else args.labels
    bad = sorted({c for c in labels if not 0 <= c < num_classes})
    if bad:
        cli.usage_error(PROG, f"--labels {bad} outside the model's classes 0..{num_classes - 1}")
    labels_N = np.repeat(np.asarray(labels, np.int32), args.num_per_class)
    vocab = model.transformer_config.vocab_size
    if args.options.top_k >= vocab:
        print(
            f"{PROG}: note: --top_k {args.options.top_k} keeps the whole vocabulary of {vocab}",
            file=sys.stderr,
        )

    images, fid_images, tokens = [], [], []
    batches = sampling.sample_batches(model, labels_N, args.seed, args.options, batch_size=args.batch_size)
    for images_b, tokens_b in batches:
        tokens.append(tokens_b)
        if args.out is not None:  # Float copies only when asked: 50k images take 39 GB.
            images.append(images_b)
        if args.fid_npz is not None:
            fid_images.append(to_uint8(images_b))
    if args.out is not None:
        write_out(args.out, np.concatenate(images), np.concatenate(tokens), labels_N)
    if args.fid_npz is not None:
        fid_images = np.concatenate(fid_images)
        args.fid_npz.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.fid_npz) as f:
            np.savez(f, arr_0=fid_images)
        print(f"wrote arr_0 {fid_images.shape} uint8 to {args.fid_npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
