"""Sample sets (``sample.py --fid_npz``, ``mvar_jax.eval.sample_set``): drawn on every device,
the same tokens on 1 device and 8, and a killed run resumed gives its uninterrupted bytes.

Ten images of the tiny fixture, one per batch: 10 batches, two steps on 8 devices.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import xla_flags

import sample
from mvar_jax import checkpoint, sampling
from mvar_jax.eval import sample_set

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--cfg", "1.5", "--top_k", "8", "--top_p", "0.9", "--seed", "3", "--batch_size", "1"]


def _argv(checkpoint: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), *FLAGS, "--fid_npz", str(out / "set.npz"), *extra]


def _on_eight_devices(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"),
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("MVAR_JAX_KILL_AT", None)
    if kill_at:
        env["MVAR_JAX_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, str(REPO / "sample.py"), *argv], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def one_device(tiny_checkpoints, tmp_path_factory) -> dict[str, np.ndarray]:
    """The uninterrupted run on this process's one device: the set's bytes, tokens and images."""
    out = tmp_path_factory.mktemp("one_device")
    sample.main(_argv(tiny_checkpoints["mvar"], out, "--out", str(out / "float.npz")))
    assert not (out / "set.npz.parts").exists()  # removed once the set is written
    with np.load(out / "float.npz") as f, np.load(out / "set.npz") as s:
        return {
            "bytes": (out / "set.npz").read_bytes(),
            "tokens": f["tokens"],
            "images": f["images"],
            "arr_0": s["arr_0"],
            "arr_1": s["arr_1"],
        }


def test_the_set_is_adm_layout_in_the_official_order(one_device, tiny_checkpoints):
    np.testing.assert_array_equal(one_device["arr_1"], np.arange(10))  # every class, in order
    assert one_device["arr_0"].shape == (10, 256, 256, 3) and one_device["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(
        one_device["arr_0"], np.clip(one_device["images"] * 255, 0, 255).astype(np.uint8)
    )
    np.testing.assert_array_equal(sample_set.official_labels(3, 2), [0, 0, 1, 1, 2, 2])


def test_one_device_draws_what_sample_batches_draws(one_device, tiny_checkpoints):
    model = checkpoint.load_model(tiny_checkpoints["mvar"])
    labels = np.arange(2, dtype=np.int32)
    for cfg in (1.5, 4.0):  # one compiled program for both: the guidance is its input
        options = sampling.SamplingOptions(cfg=cfg, top_k=8, top_p=0.9)
        batches = list(sampling.sample_batches(model, labels, 3, options, batch_size=1))
        subs = list(sample_set.sub_batches(model, labels, 3, options, batch_size=1, progress=False))
        np.testing.assert_array_equal(
            np.concatenate([s.tokens for s in subs]), np.concatenate([t for _, t in batches])
        )
        if cfg == 1.5:
            np.testing.assert_array_equal(subs[0].tokens, one_device["tokens"][:1])
        else:
            assert (np.concatenate([s.tokens for s in subs]) != one_device["tokens"][:2]).any()


def test_a_crash_resumes_to_the_same_bytes(one_device, tiny_checkpoints, tmp_path, monkeypatch, capsys):
    written = []
    real_write = sample_set.Parts.write

    def crash_after_four(self, sub):
        if len(written) == 4:
            raise KeyboardInterrupt  # the user's ^C between two batches
        real_write(self, sub)
        written.append(sub.index)

    monkeypatch.setattr(sample_set.Parts, "write", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        sample.main(_argv(tiny_checkpoints["mvar"], tmp_path))
    assert sorted(p.name for p in (tmp_path / "set.npz.parts").glob("part_*")) == [
        f"part_{j:06d}.npz" for j in range(4)
    ]
    assert not (tmp_path / "set.npz").exists()
    # Other settings are refused rather than mixed into the set.
    with pytest.raises(SystemExit):
        sample.main([*_argv(tiny_checkpoints["mvar"], tmp_path), "--seed", "4"])
    assert "holds the parts of another sample set (they differ in seed)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(_argv(tiny_checkpoints["mvar"], tmp_path, "--out", str(tmp_path / "f.npz")))
    assert "holds 4 finished batches: resume without --out" in capsys.readouterr().err
    monkeypatch.setattr(sample_set.Parts, "write", real_write)
    sample.main(_argv(tiny_checkpoints["mvar"], tmp_path))
    assert "resuming: 4 of 10 batches" in capsys.readouterr().out
    assert (tmp_path / "set.npz").read_bytes() == one_device["bytes"]


def test_eight_devices_draw_the_same_tokens_and_resume_to_the_same_bytes(
    one_device, tiny_checkpoints, tmp_path
):
    argv = _argv(tiny_checkpoints["mvar"], tmp_path, "--image_folder", str(tmp_path / "png"))
    # Killed after its fourth batch (device 3 of step 0) is written.
    proc = _on_eight_devices(argv, kill_at="sample-set-part=3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    parts = tmp_path / "set.npz.parts"
    for j in range(4):
        with np.load(parts / f"part_{j:06d}.npz") as f:
            np.testing.assert_array_equal(f["tokens"], one_device["tokens"][j : j + 1])
    # (A kill while the set itself is written leaves no set.npz: test_kill_anywhere.py.)
    proc = _on_eight_devices(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 4 of 10 batches" in proc.stdout
    # The CPU's per-device program is the one device's: the bytes agree exactly here.
    assert (tmp_path / "set.npz").read_bytes() == one_device["bytes"]
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    assert not parts.exists()
