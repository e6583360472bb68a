"""Class-conditional sampling from a model directory (``mvar_jax.convert`` or training).

    python sample.py --checkpoint ckpt/mvar-d16 --labels 3,1 --cfg 1.5 --top-k 900 \\
        --top-p 0.96 --seed 0 --out samples.png
    python sample.py --checkpoint ckpt/mvar-d16 --num-per-class 50 --batch-size 64 \\
        --fid-npz mvar-d16-50k.npz        # every class, for the standard FID evaluators

``--out`` ending ``.npz`` stores ``images`` (N, H, W, 3) float32 in [0, 1], ``tokens``
(N, L) int32 and ``labels``; ending ``.png`` it is a grid with each image's class
written under it. ``--fid-npz`` stores uint8 ``arr_0`` (N, H, W, 3). Batch b draws
from ``fold_in(PRNGKey(seed), b)``: the same seed and batch size give the same images.
A file appears only when whole: a run killed while writing ``FILE`` leaves
``FILE.incomplete-<pid>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mvar_jax import attention, checkpoint, cli, sampling
from mvar_jax.atomic_write import atomic_write
from mvar_jax.torch_checkpoint import CheckpointError

GRID_COLUMNS = 8
CAPTION_PX = 14


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Sample class-conditional images from an MVAR/VAR/M-VAR model.")
    parser.add_argument("--checkpoint", required=True, type=pathlib.Path,
                        help="model directory written by mvar_jax.convert or training")
    cli.add_sampling_args(parser, batch_size=32, top_k=900, top_p=0.96)
    parser.add_argument("--num-per-class", type=int, default=1,
                        help="images per label (default 1)")
    parser.add_argument("--more-smooth", action="store_true",
                        help="Gumbel-softmax codebook mixing (visualisation only, not for FID)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="transformer compute dtype (default: the checkpoint's)")
    parser.add_argument("--neighborhood-impl", choices=attention.NEIGHBORHOOD_IMPLS,
                        help="spatial-Markov attention: the Pallas kernel or the pure-jnp "
                             "reference (default: the checkpoint's, normally 'auto')")
    parser.add_argument("--decode-batch-size", type=int, default=sampling.DECODE_BATCH_SIZE,
                        help="images the VQVAE decodes at a time, so that decoding never sets "
                             f"the peak memory (default {sampling.DECODE_BATCH_SIZE})")
    parser.add_argument("--chunk-tokens", type=int, default=sampling.CHUNK_TOKENS,
                        help="MVAR: tokens per chunk of images each scale runs at a time "
                             f"(memory vs speed; default {sampling.CHUNK_TOKENS})")
    parser.add_argument("--out", type=pathlib.Path, help="FILE.npz or FILE.png")
    parser.add_argument("--fid-npz", type=pathlib.Path,
                        help="also write uint8 arr_0 (N, H, W, 3) for FID evaluators")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.out is None and args.fid_npz is None:
        parser.error("nothing to write: pass --out FILE.npz|FILE.png and/or --fid-npz FILE")
    if args.out is not None and args.out.suffix not in (".npz", ".png"):
        parser.error(f"--out must end in .npz or .png, got {args.out}")
    for name in ("num_per_class", "decode_batch_size", "chunk_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    cli.check_sampling_args(parser, args)


def load(parser: argparse.ArgumentParser, args: argparse.Namespace) -> checkpoint.ModelBundle:
    """The model, checked against its configs, at the requested precision (per-block params)."""
    try:
        model = checkpoint.load_model(args.checkpoint)  # Checks configs against weights.
    except (CheckpointError, ValueError, OSError) as e:
        parser.error(f"--checkpoint {args.checkpoint}: {e}")
    overrides = {name: value for name, value in (("dtype", args.dtype),
                                                  ("neighborhood_impl", args.neighborhood_impl))
                 if value is not None}
    if overrides:
        model = model._replace(transformer_config=dataclasses.replace(
            model.transformer_config, **overrides))
    return model


def sample_batches(model: checkpoint.ModelBundle, labels_N: np.ndarray,
                   args: argparse.Namespace) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields images ``(b, H, W, 3)`` float32 in [0, 1] and tokens ``(b, L)`` per batch.

    The last batch is padded to the batch size so that one compilation serves all.
    Batch b + 1 is dispatched before batch b is copied to the host, so the device
    never waits for the copy.
    """
    batch_size = min(args.batch_size, len(labels_N))
    key = jax.random.PRNGKey(args.seed)
    starts = range(0, len(labels_N), batch_size)
    pending = None  # (samples on the device, number of real labels)
    for b, start in enumerate(tqdm(starts, desc="sampling", unit="batch",
                                   disable=len(starts) == 1)):
        labels_B = labels_N[start:start + batch_size]
        n = len(labels_B)
        out = sampling.sample(model, np.pad(labels_B, (0, batch_size - n), mode="edge"),
                              jax.random.fold_in(key, b), cfg=args.cfg, top_k=args.top_k,
                              top_p=args.top_p, more_smooth=args.more_smooth,
                              decode_batch_size=args.decode_batch_size,
                              chunk_tokens=args.chunk_tokens)
        if pending is not None:
            yield _to_host(*pending)
        pending = (out, n)
    yield _to_host(*pending)


def _to_host(samples: sampling.Samples, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(samples.images)[:n], np.asarray(samples.tokens)[:n]


def to_uint8(images_NHW3: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by scaling and truncating, as the official evaluation does."""
    return np.clip(images_NHW3 * 255, 0, 255).astype(np.uint8)


def labelled_grid(images_NHW3: np.ndarray, labels_N: np.ndarray) -> Image.Image:
    """Images in rows of up to 8, each with ``class <label>`` written under it."""
    N, H, W, _ = images_NHW3.shape
    cols = min(N, GRID_COLUMNS)
    rows = -(-N // cols)
    grid = Image.new("RGB", (cols * W, rows * (H + CAPTION_PX)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(zip(to_uint8(images_NHW3), labels_N)):
        x, y = (i % cols) * W, (i // cols) * (H + CAPTION_PX)
        grid.paste(Image.fromarray(img), (x, y))
        draw.text((x + 2, y + H + 1), f"class {label}", fill="black")
    return grid


def write_out(path: pathlib.Path, images_NHW3: np.ndarray, tokens_NL: np.ndarray,
              labels_N: np.ndarray) -> None:
    """``.npz`` with images, tokens and labels, or a labelled ``.png`` grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # killed half-way: no file named ``path``
        if path.suffix == ".npz":
            np.savez(f, images=images_NHW3, tokens=tokens_NL, labels=labels_N)
        else:
            labelled_grid(images_NHW3, labels_N).save(f, format="PNG")
    print(f"wrote {len(images_NHW3)} images to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    model = sampling.prepare(load(parser, args))  # Blocks stacked: compiles ~2x faster.
    num_classes = model.transformer_config.num_classes
    labels = list(range(num_classes)) if args.labels is None else args.labels
    bad = sorted({c for c in labels if not 0 <= c < num_classes})
    if bad:
        parser.error(f"--labels {bad} outside the model's classes 0..{num_classes - 1}")
    labels_N = np.repeat(np.asarray(labels, np.int32), args.num_per_class)

    images, fid_images, tokens = [], [], []
    for images_b, tokens_b in sample_batches(model, labels_N, args):
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
