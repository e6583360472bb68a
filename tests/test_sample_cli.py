"""``sample.py`` end to end on the CLI-converted tiny fixture.

Greedy runs with two images per call share one compilation (of the block-stacked
model that ``checkpoint.load_model`` returns and sample.py samples from).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import usage_error_of
from PIL import Image

import sample
from mvar_jax import checkpoint
from mvar_jax.eval import sample_set
from mvar_jax.images import CAPTION_PX
from mvar_jax.models.transformer import blocks_are_stacked

REPO = pathlib.Path(__file__).resolve().parents[1]
GREEDY = ["--cfg", "1.5", "--top_k", "1", "--top_p", "0", "--seed", "0"]


def _error_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_npz_and_fid_layout(tiny_checkpoints, tiny_io, tmp_path):
    labels = tiny_io["label"]  # Two labels; two per class in batches of two.
    out, fid = tmp_path / "samples.npz", tmp_path / "fid.npz"
    sample.main(
        [
            "--checkpoint",
            str(tiny_checkpoints["mvar"]),
            "--labels",
            ",".join(map(str, labels)),
            "--num_per_class",
            "2",
            "--batch_size",
            "2",
            *GREEDY,
            "--out",
            str(out),
            "--fid_npz",
            str(fid),
        ]
    )
    with np.load(out) as f:
        images, tokens = f["images"], f["tokens"]
        np.testing.assert_array_equal(f["labels"], np.repeat(labels, 2))
    assert images.shape == (4, 256, 256, 3) and images.dtype == np.float32
    assert tokens.shape == (4, 680) and tokens.dtype == np.int32
    # Greedy: each image is the official one of its label, whatever its batch.
    ref = tiny_io["mvar_greedy_img"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(images, np.repeat(ref, 2, axis=0), atol=1e-4, rtol=0)
    with np.load(fid) as f:
        assert list(f.files) == ["arr_0", "arr_1"]  # ADM's sample batches: images, labels
        arr = f["arr_0"]
        np.testing.assert_array_equal(f["arr_1"], np.repeat(labels, 2))
    assert arr.dtype == np.uint8 and arr.shape == (4, 256, 256, 3)
    np.testing.assert_array_equal(arr, np.clip(images * 255, 0, 255).astype(np.uint8))


def test_m_var_checkpoint_samples_the_official_images(m_var_checkpoints, m_var_io, capsys, tmp_path):
    # Same batch and options as test_m_var's greedy test: one compilation serves both.
    io, ckpt = m_var_io["l20"], str(m_var_checkpoints["l20"])
    out = tmp_path / "m_var.npz"
    sample.main(
        [
            "--checkpoint",
            ckpt,
            "--labels",
            ",".join(map(str, io["label"])),
            *GREEDY,
            "--batch_size",
            "2",
            "--out",
            str(out),
        ]
    )
    with np.load(out) as f:
        np.testing.assert_array_equal(f["tokens"], io["greedy_BL"])
        np.testing.assert_allclose(f["images"], io["greedy_img"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    assert "[10]" in _error_of(capsys, ["--checkpoint", ckpt, "--labels", "10", "--out", str(out)])


def test_png_grid_has_captions(tiny_checkpoints, tiny_io, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(
        ["--checkpoint", str(tiny_checkpoints["mvar"]), "--labels", "3,0", *GREEDY, "--out", str(out)]
    )
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (256 + CAPTION_PX, 2 * 256, 3)
    captions = grid[256:]
    assert (captions < 128).any() and (captions == 255).mean() > 0.5  # Dark text on white.


def test_bad_input_is_a_clear_error(tiny_checkpoints, capsys, tmp_path):
    ckpt = str(tiny_checkpoints["mvar"])
    out = str(tmp_path / "x.npz")
    assert "[10]" in _error_of(capsys, ["--checkpoint", ckpt, "--labels", "3,10", "--out", out])
    assert "[-1]" in _error_of(capsys, ["--checkpoint", ckpt, "--labels", "3,-1", "--out", out])
    err = _error_of(capsys, ["--checkpoint", str(tmp_path / "none"), "--out", out])
    assert "model directory not found" in err
    assert "--out must end" in _error_of(capsys, ["--checkpoint", ckpt, "--out", "x.jpg"])
    # A config that does not match the weights.
    edited = tmp_path / "edited"
    shutil.copytree(ckpt, edited)
    config = json.loads((edited / "transformer_config.json").read_text())
    (edited / "transformer_config.json").write_text(json.dumps(dict(config, depth=3)))
    err = _error_of(capsys, ["--checkpoint", str(edited), "--out", out])
    assert "transformer params does not match" in err and "blocks_2" in err
    # A tokenizer directory where a generator model is expected.
    vqvae_config, vqvae_params = checkpoint.load_tokenizer(ckpt)
    checkpoint.save_tokenizer(tmp_path / "tokenizer", vqvae_config=vqvae_config, vqvae_params=vqvae_params)
    err = _error_of(capsys, ["--checkpoint", str(tmp_path / "tokenizer"), "--out", out])
    assert "is a tokenizer directory" in err and "generator model" in err
    # The tokenizer trainer's work directory (its model is in model/).
    (tmp_path / "tokenizer_run").mkdir()
    shutil.move(tmp_path / "tokenizer", tmp_path / "tokenizer_run" / "model")
    err = _error_of(capsys, ["--checkpoint", str(tmp_path / "tokenizer_run"), "--out", out])
    assert "missing vqvae_config.json" in err
    assert f"its model is {tmp_path / 'tokenizer_run' / 'model'}" in err
    assert not (tmp_path / "x.npz").exists()


def test_memory_options_are_checked_and_reach_the_sampler(tiny_checkpoints, capsys, tmp_path, monkeypatch):
    ckpt = str(tiny_checkpoints["mvar"])
    out = str(tmp_path / "x.npz")
    err = _error_of(capsys, ["--checkpoint", ckpt, "--decode_batch_size", "0", "--out", out])
    assert "--decode_batch_size=0: 0 is not a positive integer" in err
    assert "--chunk_tokens=-1: -1 is not a positive integer" in _error_of(
        capsys, ["--checkpoint", ckpt, "--chunk_tokens", "-1", "--out", out]
    )
    calls = []

    def fake_sub_batches(model, labels_N, seed, options, **kwargs):  # Records the call, skips the work.
        calls.append((model, options))
        n, L = len(labels_N), model.transformer_config.seq_len
        images = np.zeros((n, 2, 2, 3), np.float32)
        yield sample_set.SubBatch(0, labels_N, np.zeros((n, L), np.int32), images.astype(np.uint8), images)

    monkeypatch.setattr(sample_set, "sub_batches", fake_sub_batches)
    sample.main(
        [
            "--checkpoint",
            ckpt,
            "--labels",
            "1",
            "--out",
            out,
            "--decode_batch_size",
            "1",
            "--chunk_tokens",
            "64",
        ]
    )
    ((model, options),) = calls
    assert (options.decode_batch_size, options.chunk_tokens) == (1, 64)
    assert blocks_are_stacked(model.transformer_params)  # as load_model returns it


def test_a_second_process_reuses_the_compiled_programs(tiny_checkpoints, tiny_io, tmp_path):
    """--compilation_cache: the first run fills it; the second finds every program there (it
    writes nothing new) and draws the same, official, images."""
    cache = tmp_path / "xla"

    def run(out: pathlib.Path) -> np.ndarray:
        labels = ",".join(map(str, tiny_io["label"]))
        argv = ["--checkpoint", str(tiny_checkpoints["mvar"]), "--labels", labels, *GREEDY, "--out", str(out)]
        subprocess.run(
            [sys.executable, "sample.py", *argv, "--compilation_cache", str(cache)], cwd=REPO, check=True
        )
        with np.load(out) as f:
            return f["images"]

    first = run(tmp_path / "a.npz")
    entries = sorted(p.name for p in cache.iterdir())
    assert entries  # the sampler and the decoder
    np.testing.assert_array_equal(run(tmp_path / "b.npz"), first)
    assert sorted(p.name for p in cache.iterdir()) == entries
    np.testing.assert_allclose(first, tiny_io["mvar_greedy_img"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_command_line_exit_status(tiny_checkpoints, tmp_path):
    err = usage_error_of(
        "sample.py",
        "--checkpoint",
        str(tiny_checkpoints["mvar"]),
        "--labels",
        "12",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert "[12]" in err


def test_precision_and_attention_overrides_reach_the_model(tiny_checkpoints):
    args = sample.parse(
        [
            "--checkpoint",
            str(tiny_checkpoints["mvar"]),
            "--out",
            "x.png",
            "--dtype",
            "bfloat16",
            "--neighborhood_impl",
            "reference",
        ]
    )
    config = sample.load(args).transformer_config
    assert (config.dtype, config.neighborhood_impl) == ("bfloat16", "reference")
    args = sample.parse(["--checkpoint", str(tiny_checkpoints["mvar"]), "--out", "x.png"])
    assert sample.load(args).transformer_config.neighborhood_impl == "auto"
