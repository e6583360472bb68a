"""mvar_jax.demo: stages run in order, a stage whose output is whole is skipped, a killed run
resumes at the stage it was in, and each stage's test of its output (the expensive stages
themselves run in `make demo`, measured in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
from conftest import make_image_folder

from mvar_jax import checkpoint, data, demo
from mvar_jax.data import token_cache
from mvar_jax.training import trainer, workdir


def _file_stage(path: pathlib.Path, calls: list[str], *, fail_first: bool = False) -> demo.Stage:
    """A stage writing ``path``; with ``fail_first`` its first run dies before writing."""

    def run():
        calls.append(path.name)
        if fail_first and calls.count(path.name) == 1:
            raise KeyboardInterrupt("killed")
        path.write_text("whole")

    return demo.Stage(path.name, path, path.exists, run)


def test_stages_skip_whole_outputs_and_resume_after_a_kill(tmp_path):
    calls, log = [], []
    stages = [
        _file_stage(tmp_path / "a", calls),
        _file_stage(tmp_path / "b", calls, fail_first=True),
        _file_stage(tmp_path / "c", calls),
    ]
    with pytest.raises(KeyboardInterrupt):
        demo.run_stages(stages, log.append)
    assert calls == ["a", "b"] and not (tmp_path / "b").exists()
    assert demo.run_stages(stages, log.append) == ["b", "c"]  # a is whole: skipped
    assert calls == ["a", "b", "b", "c"]
    assert log[-6].startswith("[1/3] a: done already")
    assert demo.run_stages(stages, log.append) == []
    assert log[-1] == "demo complete (nothing to do)" and calls == ["a", "b", "b", "c"]


def test_a_stage_that_leaves_no_whole_output_stops_the_demo(tmp_path):
    later = []
    stages = [
        demo.Stage("tokens", tmp_path / "t", lambda: False, lambda: None),
        demo.Stage("next", tmp_path / "n", lambda: False, lambda: later.append(1)),
    ]
    with pytest.raises(RuntimeError, match="stage 'tokens' finished without a whole"):
        demo.run_stages(stages, lambda _: None)
    assert not later


def _touch(path: pathlib.Path, mtime: float) -> None:
    os.utime(path, (mtime, mtime))


def _fake_export(model_dir: pathlib.Path, step: int, mtime: float) -> None:
    (model_dir / checkpoint.PARAMS_DIR).mkdir(parents=True, exist_ok=True)
    (model_dir / workdir.EXPORTED_STEP).write_text(json.dumps({"step": step}))
    _touch(model_dir / workdir.EXPORTED_STEP, mtime)


def test_each_stage_is_done_when_its_output_is_whole_and_newer_than_its_input(tmp_path):
    out = tmp_path / "demo_out"
    stages = {
        s.name: s
        for s in demo.demo_stages(
            out, data_dir=str(tmp_path / "tfds"), classifier_cache=tmp_path / "classifiers"
        )
    }
    assert list(stages) == ["data", "tokenizer", "tokens", "generator", "samples", "report"]
    assert not any(stages[n].done() for n in list(stages)[1:])
    tokenizer_steps = trainer.total_steps(demo._config("vqvae_tiny_cpu", None))
    generator_steps = trainer.total_steps(demo._config("tiny_cpu", None))

    # A training stage is done when its export holds the run's last step.
    _fake_export(out / "tokenizer" / "model", tokenizer_steps - 1, 1000)
    assert not stages["tokenizer"].done()  # an export from before the run ended
    _fake_export(out / "tokenizer" / "model", tokenizer_steps, 1000)
    assert stages["tokenizer"].done()

    # Tokens: a whole cache made after the tokenizer.
    folder = tmp_path / "folder"
    make_image_folder(folder, num_classes=2, per_class=3)
    cfg = data.default_config()
    cfg.update(name="folder", data_dir=str(folder), num_classes=2, num_workers=1)

    def write_tokens():
        return token_cache.write_token_cache(
            cfg,
            lambda img: np.zeros((len(img), 5), np.int32),
            out / "tokens",
            "train",
            batch_size=2,
            chunk_size=4,
        )

    split = write_tokens()
    assert stages["tokens"].done()
    (split / "chunk-000001.tokens.npy").unlink()  # a killed caching run
    assert not stages["tokens"].done()
    write_tokens()
    assert stages["tokens"].done()
    _fake_export(out / "tokenizer" / "model", tokenizer_steps, (split / "meta.json").stat().st_mtime + 1)
    assert not stages["tokens"].done()  # the tokenizer was trained again since

    # The generator, then the grid and the report made from its export.
    _fake_export(out / "model", generator_steps, 2000)
    assert stages["generator"].done()
    for name, path in (("samples", out / "samples.png"), ("report", out / "report.json")):
        path.write_text("x")
        _touch(path, 1999)
        assert not stages[name].done()  # older than the model
        _touch(path, 2001)
        assert stages[name].done()
