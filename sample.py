"""Class-conditional sampling from a model directory (``mvar_jax.convert`` or training).

    python sample.py --checkpoint ckpt/mvar_d16 --labels 3,1 --cfg 1.5 --top_k 900 \\
        --top_p 0.96 --seed 0 --out samples.png
    python sample.py --checkpoint ckpt/mvar_d16 --num_per_class 50 --batch_size 64 \\
        --fid_npz mvar_d16_50k.npz        # the papers' 50,000: every class, 50 each, in order

Every device of every host draws (``--distributed`` joins a multi-host job): each runs
``--batch_size`` images at a time, and batch b of the labels draws from ``fold_in(PRNGKey(seed),
b)`` on whichever device it lands, so the same seed and batch size give the same tokens on any
number of devices.

``--out`` ending ``.npz`` stores ``images`` (N, H, W, 3) float32 in [0, 1], ``tokens``
(N, L) int32 and ``labels``; ending ``.png`` it is a grid with each image's class
written under it. ``--fid_npz`` stores ADM's layout, uint8 ``arr_0`` (N, H, W, 3) and the
labels as ``arr_1``; ``--image_folder`` one ``<i>.png`` per image. These two are a sample
set (``mvar_jax.eval.sample_set``): finished batches are kept in ``--parts`` until the set
is written, so a killed run, started again with the same flags, resumes where it stopped
and writes the same bytes. A file appears only when whole: a run killed while writing
``FILE`` leaves ``FILE.incomplete-<pid>``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from mvar_jax import checkpoint, cli, parallel, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.errors import CheckpointError
from mvar_jax.eval import sample_set
from mvar_jax.images import labelled_grid
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
    "fid_npz",
    None,
    "FILE.npz in ADM's layout for FID evaluators: uint8 arr_0 (N, H, W, 3), labels arr_1",
    flag_values=FLAGS,
)
flags.DEFINE_string("image_folder", None, "a folder of <i>.png, one per image", flag_values=FLAGS)
flags.DEFINE_string(
    "parts",
    None,
    "where a sample set keeps its finished batches until it is written, and resumes from "
    "(default: <--fid_npz or --image_folder>.parts)",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "distributed",
    False,
    "join a multi-host job (jax.distributed.initialize; the address, process count and id "
    "are auto-detected on SLURM, Open MPI and Cloud TPU, or given below)",
    flag_values=FLAGS,
)
flags.DEFINE_string(
    "coordinator_address", None, "with --distributed: host:port of process 0", flag_values=FLAGS
)
flags.DEFINE_integer(
    "num_processes", -1, "with --distributed: the process count (-1: detect)", flag_values=FLAGS
)
flags.DEFINE_integer(
    "process_id", -1, "with --distributed: this process's id (-1: detect)", flag_values=FLAGS
)


def parse(argv: Sequence[str] | None) -> types.SimpleNamespace:
    """The flags, checked; ``out`` and ``fid_npz`` as paths."""
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    for name in ("out", "fid_npz", "image_folder", "parts"):
        setattr(args, name, None if getattr(args, name) is None else pathlib.Path(getattr(args, name)))
    args.set_outputs = [p for p in (args.fid_npz, args.image_folder) if p is not None]
    if args.out is None and not args.set_outputs:
        cli.usage_error(
            PROG, "nothing to write: pass --out FILE.npz|FILE.png, --fid_npz FILE and/or --image_folder DIR"
        )
    if args.out is not None and args.out.suffix not in (".npz", ".png"):
        cli.usage_error(PROG, f"--out must end in .npz or .png, got {args.out}")
    if args.fid_npz is not None and args.fid_npz.suffix != ".npz":
        cli.usage_error(PROG, f"--fid_npz must end in .npz (an npz archive of arr_0), got {args.fid_npz}")
    if args.parts is not None and not args.set_outputs:
        cli.usage_error(PROG, "--parts keeps a sample set's batches: it needs --fid_npz or --image_folder")
    if args.parts is None and args.set_outputs:
        args.parts = args.set_outputs[0].with_name(args.set_outputs[0].name + ".parts")
    named = cli.given(FLAGS, ("coordinator_address", "num_processes", "process_id"))
    if named and not args.distributed:
        cli.usage_error(PROG, f"{', '.join(named)} configure --distributed, which is off")
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
    if args.distributed:  # before any JAX computation
        parallel.initialize_distributed(
            types.SimpleNamespace(
                enabled=True,
                coordinator_address=args.coordinator_address,
                num_processes=args.num_processes,
                process_id=args.process_id,
            )
        )
        if args.out is not None and jax.process_count() > 1:
            cli.usage_error(
                PROG, "--out gathers every image on one host: with several, write --fid_npz or --image_folder"
            )
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

    batch_size = min(args.batch_size, len(labels_N))  # the same on any number of devices
    parts, done = None, frozenset()
    if args.set_outputs:
        spec = sample_set.spec(model, labels_N, args.seed, args.options, batch_size)
        try:
            parts = sample_set.Parts(args.parts, spec)
        except ValueError as e:
            cli.usage_error(PROG, f"--parts {e}")
        done = parts.done()
        if done and args.out is not None:
            cli.usage_error(
                PROG,
                f"--out needs every image, and {args.parts} holds {len(done)} finished batches: "
                "resume without --out",
            )
        if done:
            print(f"resuming: {len(done)} of {parts.num_sub_batches} batches are in {args.parts}")
    kept = []  # Float copies only for --out: 50k images take 39 GB.
    batches = sample_set.sub_batches(
        model,
        labels_N,
        args.seed,
        args.options,
        batch_size=batch_size,
        skip=done,
        float_images=args.out is not None,
    )
    for sub in batches:
        if parts is not None:
            parts.write(sub)
        if args.out is not None:
            kept.append(sub)
    if parts is not None:
        parts.finish(npz=args.fid_npz, image_folder=args.image_folder)
    if args.out is not None:
        images, tokens = (np.concatenate([getattr(s, k) for s in kept]) for k in ("images", "tokens"))
        write_out(args.out, images, tokens, labels_N)
    return 0


if __name__ == "__main__":
    sys.exit(main())
