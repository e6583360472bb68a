"""Class-conditional sampling from a model directory (``mvar_jax.convert`` or training).

    python sample.py --checkpoint ckpt/mvar_d16 --labels 3,1 --cfg 1.5 --top_k 900 \\
        --top_p 0.96 --seed 0 --out samples.png
    python sample.py --checkpoint ckpt/var_d16 --edit_image dog.png --edit_box 0.2,0.3,0.7,0.9 \\
        --labels 207 --cfg 2 --out edited.png      # class-conditional editing (zero-shot)
    python sample.py --checkpoint ckpt/mvar_d16 --num_per_class 50 --batch_size 64 \\
        --fid_npz mvar_d16_50k.npz        # the papers' 50,000: every class, 50 each, in order
    python sample.py --checkpoint ckpt/var_d16 --kv_compression 0.7 --kv_method hack --out s.png
                                      # VAR with 70% of its KV cache dropped (python -m mvar_jax.hack first)

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

``--edit_image`` edits given images instead of drawing new ones (``sampling.editing``, every
family): ``--edit_mode inpaint`` generates inside ``--edit_box`` (fractions of the image) and
keeps the rest, ``outpaint`` keeps only the box; ``--edit_mask`` (white = generate) replaces the
box. With ``--labels`` the generated part is drawn for those classes (one label for every
image, one per image, or several for one image: it is redrawn as each), with ``--unconditional``
for none.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import types
from collections.abc import Sequence

import jax
import numpy as np
import PIL.Image
from absl import flags

from mvar_jax import checkpoint, cli, compilation_cache, parallel, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.data import preprocess
from mvar_jax.errors import CheckpointError
from mvar_jax.eval import sample_set
from mvar_jax.images import labelled_grid
from mvar_jax.models import kv_compression
from mvar_jax.models.config import NEIGHBORHOOD_IMPLS, TransformerConfig
from mvar_jax.sampling import head_kinds

PROG = "sample.py"
FLAGS = flags.FlagValues()  # this command's own, so that tests can import several commands
cli.define_checkpoint_flag(FLAGS)
cli.define_sampling_flags(FLAGS, batch_size=32, more=("more_smooth", "decode_batch_size", "chunk_tokens"))
flags.DEFINE_integer("num_per_class", 1, "images per label", lower_bound=1, flag_values=FLAGS)
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
# The flags that name files: parse() makes them paths.
_PATH_FLAGS = {
    "out": "FILE.npz or FILE.png",
    "fid_npz": "FILE.npz in ADM's layout for FID evaluators: uint8 arr_0 (N, H, W, 3), labels arr_1",
    "image_folder": "a folder of <i>.png, one per image",
    "parts": (
        "where a sample set keeps its finished batches until it is written, and resumes from "
        "(default: <--fid_npz or --image_folder>.parts)"
    ),
    "edit_image": (
        "edit this image zero-shot instead of drawing new ones: a PNG/JPEG (resized and "
        "centre-cropped to the model's resolution) or an .npz of images (B, H, W, 3) float in [0, 1]"
    ),
    "edit_mask": (
        "instead of --edit_box: a PNG, white = generate, black = keep, at the image's resolution "
        "or the last scale's token grid"
    ),
}
for _name, _help in _PATH_FLAGS.items():
    flags.DEFINE_string(_name, None, _help, flag_values=FLAGS)
del _name, _help
flags.DEFINE_list(
    "edit_box", None, "y0,x0,y1,x1: the edited box, as fractions of the image", flag_values=FLAGS
)
flags.DEFINE_enum(
    "edit_mode",
    "inpaint",
    ["inpaint", "outpaint"],
    "inpaint: generate the box, keep the rest; outpaint: keep the box alone",
    flag_values=FLAGS,
)
flags.DEFINE_float(
    "kv_compression",
    0.0,
    "VAR only: drop this share of the KV cache of earlier scales, in [0, 1) (0: the full cache; "
    "models.kv_compression)",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "kv_method",
    "hack",
    list(kv_compression.METHODS),
    "hack: head-aware (needs `python -m mvar_jax.hack --checkpoint M --calibrate` first); "
    "hack_random: its head kinds shuffled; h2o, snapkv: every head alike",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "unconditional", False, "draw with the null class (no label) instead of --labels", flag_values=FLAGS
)
cli.define_distributed_flags(FLAGS)
cli.define_compilation_cache_flag(FLAGS)


def parse(argv: Sequence[str] | None) -> types.SimpleNamespace:
    """The flags, checked; the ``_PATH_FLAGS`` as paths."""
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    for name in _PATH_FLAGS:
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
    args.distributed = cli.distributed_config(FLAGS, PROG)
    if args.unconditional and args.labels is not None:
        cli.usage_error(PROG, "--unconditional draws no class: drop --labels")
    _check_edit_flags(args)
    try:
        kv_compression.check_ratio(args.kv_compression)
    except ValueError as e:
        cli.usage_error(PROG, f"--{e}")
    args.options = cli.sampling_options(FLAGS, PROG)
    return args


def _check_edit_flags(args: types.SimpleNamespace) -> None:
    edit_flags = cli.given(FLAGS, ("edit_box", "edit_mode", "edit_mask"))
    if args.edit_image is None:
        if edit_flags:
            cli.usage_error(PROG, f"{', '.join(edit_flags)} need --edit_image, the image to edit")
        return
    if (args.edit_box is None) == (args.edit_mask is None):
        cli.usage_error(PROG, "--edit_image needs one of --edit_box y0,x0,y1,x1 and --edit_mask MASK.png")
    if args.set_outputs:
        cli.usage_error(PROG, "editing writes --out alone, not --fid_npz or --image_folder")
    if args.labels is None and not args.unconditional:
        cli.usage_error(PROG, "--edit_image needs --labels (the class to draw) or --unconditional")
    if args.edit_box is not None:
        try:
            box = [float(v) for v in args.edit_box]
        except ValueError:
            box = []
        y0, x0, y1, x1 = box if len(box) == 4 else (0, 0, 0, 0)
        if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
            cli.usage_error(
                PROG,
                f"--edit_box {','.join(args.edit_box)}: expected y0,x0,y1,x1 as fractions of the image, "
                "0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1",
            )
        args.edit_box = box


def _edit_images(path: pathlib.Path, side: int) -> np.ndarray:
    """``(B, side, side, 3)`` float32 in [0, 1] from an image file or an ``.npz`` of ``images``."""
    if not path.is_file():
        cli.usage_error(PROG, f"--edit_image {path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "images" not in f.files:
                cli.usage_error(PROG, f"--edit_image {path}: no 'images' array (it holds {f.files})")
            images = np.asarray(f["images"])
        if (
            images.ndim != 4
            or images.shape[1:] != (side, side, 3)
            or not np.issubdtype(images.dtype, np.floating)
        ):
            cli.usage_error(
                PROG,
                f"--edit_image {path}: images must be float (B, {side}, {side}, 3), "
                f"got {images.dtype} {images.shape}",
            )
        if images.min() < 0 or images.max() > 1:
            cli.usage_error(PROG, f"--edit_image {path}: images must be in [0, 1]")
        return images.astype(np.float32)
    try:
        image = preprocess.decode_rgb(path.read_bytes())
    except preprocess.BadImageError as e:
        cli.usage_error(PROG, f"--edit_image {path}: not an image ({e})")
    return preprocess.Preprocess(side, crop="resize_random_crop")(image, None)[None].astype(np.float32) / 255


def _edit_keep(args: types.SimpleNamespace, side_px: int, grid: int) -> np.ndarray:
    """The keep mask at the last scale, ``(grid, grid)`` float32 (1 = keep)."""
    if args.edit_box is not None:
        try:
            keep = sampling.editing.box_keep_mask(grid, args.edit_box, inpaint=args.edit_mode == "inpaint")
        except ValueError as e:
            cli.usage_error(PROG, f"--edit_box: {e}")
    else:
        try:
            with PIL.Image.open(args.edit_mask) as mask:
                generate = np.asarray(mask.convert("L"), np.float32) / 255
        except (OSError, ValueError) as e:
            cli.usage_error(PROG, f"--edit_mask {args.edit_mask}: cannot read it as an image ({e})")
        if generate.shape == (side_px, side_px):  # the fraction of each token's pixels to generate
            f = side_px // grid
            generate = generate.reshape(grid, f, grid, f).mean(axis=(1, 3))
        elif generate.shape != (grid, grid):
            cli.usage_error(
                PROG,
                f"--edit_mask {args.edit_mask}: {generate.shape[1]}x{generate.shape[0]} px; expected "
                f"the image's {side_px}x{side_px} or the token grid's {grid}x{grid}",
            )
        keep = 1 - generate
    if (keep > 0.5).all():
        cli.usage_error(PROG, "the edit keeps every token: nothing would be generated (white = generate)")
    return keep


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


def compression(args: types.SimpleNamespace, config: TransformerConfig) -> kv_compression.KVCompression:
    """``--kv_compression`` and ``--kv_method`` for this model, its head kinds read for HACK."""
    try:
        sampling.check_kv_cache(config)
    except ValueError as e:
        cli.usage_error(PROG, f"--kv_compression: {e}")
    contextual = None
    if args.kv_method in kv_compression.HEAD_AWARE:
        try:
            contextual = head_kinds.as_flags(head_kinds.load(args.checkpoint, config)[1])
        except CheckpointError as e:
            cli.usage_error(PROG, f"--kv_method {args.kv_method}: {e}")
    return kv_compression.KVCompression(args.kv_compression, args.kv_method, contextual)


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
    compilation_cache.enable(args.compilation_cache)
    parallel.initialize_distributed(args.distributed)  # before any JAX computation
    if args.distributed.enabled:
        if args.out is not None and jax.process_count() > 1:
            cli.usage_error(
                PROG, "--out gathers every image on one host: with several, write --fid_npz or --image_folder"
            )
    model = load(args)
    tcfg = model.transformer_config
    if args.kv_compression:
        args.options = dataclasses.replace(args.options, kv_compression=compression(args, tcfg))
    if args.unconditional:
        labels = [tcfg.num_classes]  # the null class
    else:
        labels = list(range(tcfg.num_classes)) if args.labels is None else args.labels
        bad = sorted({c for c in labels if not 0 <= c < tcfg.num_classes})
        if bad:
            cli.usage_error(PROG, f"--labels {bad} outside the model's classes 0..{tcfg.num_classes - 1}")
    if args.options.top_k >= tcfg.vocab_size:
        print(
            f"{PROG}: note: --top_k {args.options.top_k} keeps the whole vocabulary of {tcfg.vocab_size}",
            file=sys.stderr,
        )
    if args.edit_image is not None:
        return edit(args, model, labels)
    labels_N = np.repeat(np.asarray(labels, np.int32), args.num_per_class)
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


def edit(args: types.SimpleNamespace, model: checkpoint.ModelBundle, labels: list[int]) -> int:
    """``--edit_image``: each image edited ``--num_per_class`` times, with its label; one image
    with several labels is edited once per label (redrawn as each class)."""
    tcfg = model.transformer_config
    grid = tcfg.patch_nums[-1]
    side = grid * model.vqvae_config.downsample
    images = _edit_images(args.edit_image, side)
    if len(images) == 1:
        images = np.repeat(images, len(labels), axis=0)
    if len(labels) not in (1, len(images)):
        cli.usage_error(
            PROG,
            f"--labels: {len(labels)} labels for {len(images)} images; give one, one per image, "
            "or any number for a single image",
        )
    edit_B = sampling.editing.make_edit(model, images, _edit_keep(args, side, grid))
    labels_B = np.broadcast_to(np.asarray(labels, np.int32), (len(images),))
    rows = np.repeat(np.arange(len(images)), args.num_per_class)
    edit_N = sampling.Edit(*(np.asarray(x)[rows] for x in edit_B))
    batches = sampling.sample_batches(
        model, labels_B[rows], args.seed, args.options, batch_size=args.batch_size, edit=edit_N
    )
    images_N, tokens_N = (np.concatenate(parts) for parts in zip(*batches))
    write_out(args.out, images_N, tokens_N, labels_B[rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
