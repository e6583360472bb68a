"""End-to-end training on the tiny config: learning, exact resume, NaN stop, config errors.

Runs use token batches from ``SyntheticTokenSource`` (no image decoding), the tiny
official-layout VQVAE for the teacher-forcing input, and a few steps each.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from conftest import FAST_COMPILE, event_scalars, set_fields, xla_flags

import sample
from mvar_jax import checkpoint
from mvar_jax.configs import tiny_cpu, tiny_cpu_m_var
from mvar_jax.eval import classifier as classifier_lib, quality
from mvar_jax.models import families
from mvar_jax.models.config import InitScales
from mvar_jax.models.transformer import Transformer, unstack_blocks
from mvar_jax.models.vqvae import VQVAE
from mvar_jax.training import (
    checkpointing,
    generator,
    metrics_writer,
    state as state_lib,
    step as step_lib,
    trainer,
    workdir,
)
from mvar_jax.training.synthetic import SyntheticTokenSource

REPO = pathlib.Path(__file__).parent.parent
BATCH = 8
STEPS = 6  # with ratio_k 2 the cycle is [1-3, 1-3, 4]: both segments, twice


def _config(**overrides):
    c = tiny_cpu.get_config("fixture")
    c.vqvae_checkpoint = str(REPO / c.vqvae_checkpoint)
    c.batch_size = BATCH
    c.num_train_steps = STEPS
    c.ratio_k = 2
    c.log_every = 1
    c.checkpoint_every = 3
    set_fields(c, overrides)
    return c


def _source(seed: int = 0) -> SyntheticTokenSource:
    return SyntheticTokenSource(batch_size=BATCH, seq_len=30, vocab_size=64, num_classes=10, seed=seed)


class _CrashingSource:
    """Delegates to a source, raising instead of returning batch ``crash_at`` (a killed job)."""

    def __init__(self, source, crash_at: int):
        self._source, self._crash_at, self._served = source, crash_at, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._served == self._crash_at:
            raise RuntimeError("simulated crash")
        self._served += 1
        return next(self._source)

    def get_state(self):
        return self._source.get_state()

    def set_state(self, state):
        self._source.set_state(state)


class _SizedSource(SyntheticTokenSource):
    """A synthetic source that reports a train split of ``num_examples``."""

    def __init__(self, num_examples: int):
        super().__init__(batch_size=BATCH, seq_len=30, vocab_size=64, num_classes=10)
        self.num_examples = num_examples


class _FixedSource:
    """Always the same batch."""

    def __init__(self, batch):
        self._batch = batch

    def __iter__(self):
        return self

    def __next__(self):
        return self._batch

    def get_state(self):
        return {}

    def set_state(self, state):
        del state


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tiny_config_learns_a_fixed_batch(tmp_path):
    config = _config(
        num_train_steps=30,
        ratio_k=8,
        checkpoint_every=30,
        log_every=30,
        sample_every=30,
        sample_classes=(0, 1, 2),
        **{"optim.warmup_fraction": 0.05, "optim.base_lr": 0.3},
    )
    batch = _source(seed=1).batch(0)
    state = trainer.train_and_evaluate(config, tmp_path, source=_FixedSource(batch))

    vqvae_config, vqvae_params = generator.load_tokenizer(config.vqvae_checkpoint, config.model.patch_nums)
    model_config = generator.transformer_config(config, vqvae_config)
    model = Transformer(model_config)
    ids = jnp.split(batch["tokens"], np.cumsum([1, 4, 9])[:3], axis=1)
    x_BLCv = VQVAE(vqvae_config).apply(vqvae_params, ids, method=VQVAE.idx_to_var_input)

    @jax.jit
    def mean_ce(params):
        """Mean per-token cross-entropy over the whole pyramid, segment by segment."""
        total = 0.0
        for seg in families.of(model_config).schedule(model_config, 1).segments:
            begin, end = model_config.token_range(*seg)
            logits = model.apply(
                {"params": params},
                batch["label"],
                x_BLCv[:, max(begin - 1, 0) : end - 1],
                first_scale=seg.first_scale,
                last_scale=seg.last_scale,
            )
            total += step_lib.cross_entropy(logits, batch["tokens"][:, begin:end]).sum()
        return total / batch["tokens"].size

    scales = InitScales(**config.init)
    start = float(mean_ce(state_lib.init_params(model_config, scales, jax.random.PRNGKey(config.seed))))
    assert start == pytest.approx(math.log(64), rel=0.01)  # near-uniform logits at init
    assert float(mean_ce(state.params)) < 0.5 * start
    # The run leaves a loadable model, a checkpoint, TensorBoard events and a sample grid.
    bundle = checkpoint.load_model(tmp_path / "model")
    _assert_trees_equal(unstack_blocks(bundle.transformer_params)["params"], state.params)
    assert checkpointing.Checkpointer(tmp_path / "checkpoints", max_to_keep=1).all_steps() == [30]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    grid = np.asarray(PIL.Image.open(tmp_path / "samples" / "step_00000030.png"))
    assert grid.shape == (64, 3 * 64, 3)


def test_logged_scalars_are_on_disk_when_the_write_returns(tmp_path):
    """A killed run loses nothing it logged; a record it tore does not trouble the next run."""
    writer = metrics_writer.MetricsWriter(tmp_path, start=0, total=3, global_batch=1, summarize=None)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": float(step)})
    (events,) = (tmp_path / "tensorboard").iterdir()
    assert event_scalars(tmp_path / "tensorboard") == {("loss", s): {float(s)} for s in (1, 2, 3)}
    with open(events, "ab") as f:  # a record torn by a kill: half a length header
        f.write(bytes(5))
    resumed = metrics_writer.MetricsWriter(tmp_path, start=3, total=4, global_batch=1, summarize=None)
    resumed.write_scalars(4, {"loss": 4.0})  # into a file of its own
    assert event_scalars(tmp_path / "tensorboard") == {("loss", s): {float(s)} for s in (1, 2, 3, 4)}
    writer.close()
    resumed.close()


class _SmallDisk:
    """A directory on a filesystem the test can fill: a tmpfs it mounts where it may (root),
    else a plain directory where a patched ``open`` refuses writes (ENOSPC) under the
    directory ``fill`` names (Python's writes only: TensorStore's array files still land,
    Orbax's metadata does not)."""

    SIZE, SLACK = 64 * 2**20, 64 * 2**10  # bytes; the slack fits logs, not a checkpoint

    def __init__(self, path: pathlib.Path, monkeypatch, *, mount: bool = True):
        self.path, self._full = path, None
        path.mkdir()
        self.mounted = (
            mount
            and subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(path)], capture_output=True
            ).returncode
            == 0
        )
        if not self.mounted:
            real_open = builtins.open

            def open_(file, mode="r", *args, **kwargs):
                if self._full and any(m in mode for m in "wax+") and str(file).startswith(str(self._full)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
                return real_open(file, mode, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", open_)

    def fill(self, where: pathlib.Path) -> None:
        """Fills the tmpfs (``where`` is on it), or refuses writes under ``where``."""
        self._full = where
        if self.mounted:
            with open(self.path / "filler", "wb") as f:
                f.write(bytes(shutil.disk_usage(self.path).free - self.SLACK))

    def free(self) -> None:
        self._full = None
        (self.path / "filler").unlink(missing_ok=True)

    def __enter__(self) -> _SmallDisk:
        return self

    def __exit__(self, *exc) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A tmpfs where the machine allows it, else the patched ``open``."""
    with _SmallDisk(tmp_path / "small_disk", monkeypatch) as disk:
        yield disk


@pytest.fixture(params=[True, False], ids=["tmpfs-if-allowed", "patched-open"])
def each_small_disk(request, tmp_path, monkeypatch):
    with _SmallDisk(tmp_path / "small_disk", monkeypatch, mount=request.param) as disk:
        yield disk


@flax.struct.dataclass
class _TinyState:
    step: jax.Array
    w: jax.Array


def _tiny_state(step: int) -> _TinyState:
    """1 MB of random floats: more than the full disk's slack, whatever the compression."""
    return _TinyState(jnp.int32(step), jax.random.normal(jax.random.PRNGKey(step), (250_000,)))


# A failed Orbax save's thread may still touch its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_on_a_full_disk_names_its_step_and_keeps_the_last_checkpoint(each_small_disk):
    small_disk = each_small_disk
    directory = small_disk.path / "checkpoints"
    checkpointer = checkpointing.Checkpointer(directory, max_to_keep=1)
    checkpointer.save(_tiny_state(1), {"position": 1})
    checkpointer.wait()
    small_disk.fill(directory)
    checkpointer.save(_tiny_state(2), {"position": 2})  # returns; the write fails meanwhile
    with pytest.raises(
        workdir.DiskFull,
        match=(
            # The file named is the one Orbax failed on when its error names one (the step's
            # temporary directory); an error without a file name (a failed write or flush)
            # names the checkpoint directory.
            rf"disk full while saving the checkpoint of step 2: no space left writing "
            rf"{directory}(/2\.orbax-checkpoint-tmp\S*)? \(.* free there\)\. The newest whole "
            "checkpoint is step 1"
        ),
    ):
        checkpointer.save(_tiny_state(3), {"position": 3})
    with contextlib.suppress(workdir.DiskFull):  # Orbax may raise the failure once more
        checkpointer.close()
    small_disk.free()
    # Keeping the last 1 did not delete step 1 for a step 2 that never completed.
    fresh = checkpointing.Checkpointer(directory, max_to_keep=1)
    assert fresh.all_steps() == [1]
    restored, position = fresh.restore(1, jax.eval_shape(lambda: _tiny_state(1)))
    _assert_trees_equal(restored, _tiny_state(1))
    assert position == {"position": 1}
    fresh.close()


def test_a_run_that_dies_while_evaluating_evaluates_that_step_on_resume(tmp_path, monkeypatch):
    config = _config(sample_every=3, sample_classes=(0, 1))
    evaluate = generator.GeneratorTask.evaluate

    def dies_at_the_last_step(self, state, step, writer):
        if step == STEPS:
            raise RuntimeError("simulated crash while sampling")
        evaluate(self, state, step, writer)

    with monkeypatch.context() as m:
        m.setattr(generator.GeneratorTask, "evaluate", dies_at_the_last_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.train_and_evaluate(config, tmp_path, source=_source())
    # Not saved at step 6: a checkpoint means its step was evaluated too.
    assert checkpointing.Checkpointer(tmp_path / "checkpoints", max_to_keep=2).all_steps() == [3]
    assert not (tmp_path / "samples" / f"step_{STEPS:08d}.png").exists()
    trainer.train_and_evaluate(config, tmp_path, source=_source())
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_00000003.png",
        f"step_{STEPS:08d}.png",
    ]


def test_a_crash_and_a_full_disk_then_resume_equal_an_uninterrupted_run(tmp_path, small_disk):
    reference = trainer.train_and_evaluate(_config(), tmp_path / "straight", source=_source())

    crashed = small_disk.path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies reading batch 6
        trainer.train_and_evaluate(_config(), crashed, source=_CrashingSource(_source(), 5))
    assert checkpointing.Checkpointer(crashed / "checkpoints", max_to_keep=2).all_steps() == [3]
    assert not (crashed / "model").exists()

    # The disk fills up: the final (step-6) save fails in the background, and the run
    # stops when it waits for it, before the export, saying so.
    small_disk.fill(crashed / "checkpoints")
    with pytest.raises(
        workdir.DiskFull,
        match=(
            rf"disk full while saving the checkpoint of step {STEPS}: no space left writing "
            rf"{crashed}/checkpoints(/\S+)? \(.* free there\)\. The newest whole checkpoint is "
            "step 3: free space and run the same command to resume from it."
        ),
    ):
        trainer.train_and_evaluate(_config(), crashed, source=_source())
    assert not (crashed / "model").exists()
    small_disk.free()

    resumed = trainer.train_and_evaluate(_config(), crashed, source=_source())  # a fresh start
    assert int(resumed.step) == STEPS
    _assert_trees_equal(resumed.params, reference.params)
    _assert_trees_equal(resumed.opt_state, reference.opt_state)

    # Running a finished workdir again changes nothing.
    again = trainer.train_and_evaluate(_config(), crashed, source=_source())
    _assert_trees_equal(again.params, reference.params)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = trainer.train_and_evaluate(_config(num_train_steps=3), tmp_path, source=_source())
    shutil.rmtree(tmp_path / "model")
    # Same run continued to 6 steps with an absurd learning rate: the step-4 update
    # overflows; logging is off, so the check before the step-6 save must catch it.
    config = _config(log_every=100, **{"optim.base_lr": 1e37})
    with pytest.raises(FloatingPointError, match=r"step 4 .*Last good checkpoint: step 3"):
        trainer.train_and_evaluate(config, tmp_path, source=_source())
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", max_to_keep=2)
    assert checkpointer.all_steps() == [3]
    restored, _ = checkpointer.restore(3, jax.eval_shape(lambda: good))
    _assert_trees_equal(restored, good)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"model.family": "vqgan"}, "unknown model family 'vqgan'"),
        ({"model.refine_step": 9}, "refine_step must be in"),
        ({"model.kernel_size": 5}, "kernel_size 5 exceeds"),
        ({"vqvae_checkpoint": "/nonexistent/vae.pth"}, "vqvae_checkpoint: not found"),
        ({"finetune_from": "/nonexistent/var_d16.pth"}, "finetune_from: not found"),
        ({"optim.schedule": "step"}, "config.optim: schedule='step'"),
        ({"num_train_steps": -1, "num_epochs": 0}, "nothing to train"),
        ({"data.image_size": 128}, "image_size=128 does not fit"),
        ({"init.std": 0.02}, "config.init: InitScales: std=0.02"),
        ({"sample_classes": (3, 10)}, r"sample_classes \[10\] outside \[0, config.data.num_classes=10"),
        ({"sample_classes": ()}, "sample_classes is empty"),
        ({"sampling.top_k": -1}, "config.sampling: top_k=-1"),
        ({"sampling.top_p": 1.5}, r"config.sampling: top_p=1.5 must be in \[0, 1\]"),
        ({"sampling.cfg": -1.0}, r"config.sampling: cfg=-1.0 must be"),
        ({"grad_accum_steps": 3}, "grad_accum_steps=3 must be a whole number >= 1 that divides"),
    ],
)
def test_invalid_configs_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        trainer.train_and_evaluate(_config(**overrides), tmp_path, source=_source())
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_a_different_model_is_refused(tmp_path):
    (tmp_path / "transformer_config.json").write_text('{"depth": 3}')
    with pytest.raises(ValueError, match="different model"):
        trainer.train_and_evaluate(_config(), tmp_path, source=_source())


def test_resume_may_change_execution_fields_only(tmp_path):
    trainer.train_and_evaluate(_config(num_train_steps=3), tmp_path, source=_source())
    config = json.loads((tmp_path / "transformer_config.json").read_text())
    assert config["neighborhood_impl"] == "auto" and config["dtype"] == "float32"
    # The documented fallback for a failing Pallas kernel, and bfloat16 compute, resume.
    state = trainer.train_and_evaluate(
        _config(num_train_steps=3, **{"model.neighborhood_impl": "reference", "model.dtype": "bfloat16"}),
        tmp_path,
        source=_source(),
    )
    assert int(state.step) == 3
    with pytest.raises(ValueError, match=r"different model \(fields \['depth'\]\)"):
        trainer.train_and_evaluate(
            _config(num_train_steps=3, **{"model.depth": 3}), tmp_path, source=_source()
        )
    assert not list(tmp_path.glob("*.incomplete-*"))


def test_export_follows_extended_runs_and_repairs_an_incomplete_one(tmp_path):
    def exported():
        return unstack_blocks(checkpoint.load_model(tmp_path / "model").transformer_params)["params"]

    short = trainer.train_and_evaluate(_config(num_train_steps=3), tmp_path, source=_source())
    _assert_trees_equal(exported(), short.params)
    # Resuming with more steps trains on and replaces the stale export.
    extended = trainer.train_and_evaluate(_config(), tmp_path, source=_source())
    assert int(extended.step) == STEPS
    _assert_trees_equal(exported(), extended.params)
    # An export that died before its params were written is redone, with nothing to train.
    shutil.rmtree(tmp_path / "model" / "params")
    again = trainer.train_and_evaluate(_config(), tmp_path, source=_source())
    _assert_trees_equal(exported(), extended.params)
    _assert_trees_equal(again.params, extended.params)


def test_epochs_use_the_data_source_size(tmp_path):
    config = _config(num_train_steps=-1, num_epochs=2, checkpoint_every=100)
    assert trainer.total_steps(config) == 2 * math.ceil(config.num_train_examples / BATCH)
    assert trainer.total_steps(config, num_examples=20) == 6  # 2 epochs of ceil(20 / 8)
    state = trainer.train_and_evaluate(config, tmp_path, source=_SizedSource(num_examples=20))
    assert int(state.step) == 6


def _m_var_overrides(**extra) -> dict:
    """tiny_cpu_m_var:fixture at depth 1: the M-VAR runs' cheap steps."""
    return {
        "vqvae_checkpoint": str(REPO / tiny_cpu_m_var.get_config("fixture").vqvae_checkpoint),
        "model.depth": 1,
        "batch_size": BATCH,
        "log_every": 1,
        "checkpoint_every": 2,
        "sample_every": 0,
        **extra,
    }


@pytest.mark.slow  # ~50 s of compiling; test_a_crash_and_a_full_disk_... covers the trainer
def test_m_var_resumes_exactly(tmp_path):
    config = tiny_cpu_m_var.get_config("fixture")
    for key, value in _m_var_overrides(num_train_steps=4).items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    reference = trainer.train_and_evaluate(config, tmp_path / "straight", source=_source())
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies reading batch 4
        trainer.train_and_evaluate(config, tmp_path / "crashed", source=_CrashingSource(_source(), 3))
    resumed = trainer.train_and_evaluate(config, tmp_path / "crashed", source=_source())
    _assert_trees_equal(resumed, reference)


@pytest.fixture(scope="module")
def m_var_run(builtin_shapes_dir, tmp_path_factory) -> pathlib.Path:
    """The work directory of a 2-step ``train.py`` run of tiny_cpu_m_var on the built-in data,
    with a sample grid after step 2; run from a scratch directory with the package found only
    as installed, as a user who left the repository runs it (the config's paths resolve)."""
    workdir = tmp_path_factory.mktemp("m_var") / "run"
    overrides = _m_var_overrides(
        **{
            "data.data_dir": builtin_shapes_dir,
            "num_train_steps": 2,
            "sample_every": 2,
            "sample_classes": "(0,3)",
        }
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": xla_flags(FAST_COMPILE),
    }
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--config",
            f"{REPO / 'configs/tiny_cpu_m_var.py'}:fixture",
            "--workdir",
            str(workdir),
            *(f"--config.{k}={v}" for k, v in overrides.items()),
        ],
        env=env,
        cwd=workdir.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def _m_var_data_config(builtin_shapes_dir):
    data_cfg = tiny_cpu_m_var.get_config("fixture").data
    data_cfg.data_dir = str(builtin_shapes_dir)
    return data_cfg


def test_m_var_trains_every_scale_in_each_step_through_train_py(m_var_run, builtin_shapes_dir):
    grid = np.asarray(PIL.Image.open(m_var_run / "samples" / "step_00000002.png"))
    assert grid.shape == (64, 2 * 64, 3)  # sample_classes (0, 3)
    # One segment: every step reports all four scales, and the loss is their sum over
    # the pyramid's 30 tokens (each token weighs 1 / L, as in the official trainer).
    scalars = event_scalars(m_var_run / "tensorboard")
    for step in (1, 2):
        (ce,) = zip(*(scalars[f"ce/{pn}x{pn}", step] for pn in (1, 2, 3, 4)))
        assert all(len(scalars[f"acc/{pn}x{pn}", step]) == 1 for pn in (1, 2, 3, 4))
        (loss,) = scalars["loss", step]
        assert loss == pytest.approx(np.dot(ce, [1, 4, 9, 16]) / 30, rel=1e-5)
    # The export is an M-VAR model that the quality measure's checks accept.
    model, labels = quality.load_generator(m_var_run / "model", _m_var_data_config(builtin_shapes_dir))
    assert model.transformer_config.family == "m_var" and labels == list(range(10))


@pytest.mark.slow  # ~30 s of compiling; the sampler is tested on M-VAR in test_sample_cli
def test_m_var_model_samples_and_evaluates(m_var_run, builtin_shapes_dir, tmp_path):
    """sample.py and the demo's quality measure on the trained export."""
    # An untrained judge: this test is about the model's path.
    data_cfg = _m_var_data_config(builtin_shapes_dir)
    judge = jax.jit(classifier_lib.Classifier(classifier_lib.ClassifierConfig(), 10).init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))
    )
    classifier_lib.save_classifier(
        classifier_lib.classifier_cache_path(tmp_path, data_cfg),
        classifier_lib.TrainedClassifier(classifier_lib.ClassifierConfig(), 10, 64, judge, 0.0, 0.0),
    )
    report = quality.evaluate_model(
        m_var_run / "model",
        classifier_cache=tmp_path,
        data_cfg=data_cfg,
        labels=[0, 3],
        num_per_class=1,
        batch_size=2,
        progress=False,
    )
    assert report["model"]["family"] == "m_var"
    assert np.isfinite(report["frechet_distance"]["generated"])
    assert quality.report_markdown(report).startswith("M-VAR depth 1, 64 px")
    # sample.py with evaluate_model's batch and options: the same compiled sampler.
    npz = tmp_path / "samples.npz"
    sample.main(
        [
            "--checkpoint",
            str(m_var_run / "model"),
            "--labels",
            "0,3",
            "--cfg",
            "1.5",
            "--top_k",
            "0",
            "--top_p",
            "0",
            "--batch_size",
            "2",
            "--out",
            str(npz),
        ]
    )
    with np.load(npz) as f:
        assert f["images"].shape == (2, 64, 64, 3) and f["tokens"].shape == (2, 30)


def test_validation_reports_each_scale_as_the_model_scores_it(tmp_path, builtin_shapes_dir):
    """val_every: every scale's teacher-forced loss and accuracy on the eval split, against
    the exported model scoring the same images one scale at a time (MVAR's scales are
    independent given their inputs, so one segment per scale must give the same logits)."""
    cfg = _config(val_every=2, val_images=12, val_batch_size=8, sample_every=0, num_train_steps=2)
    cfg.data.data_dir = str(builtin_shapes_dir)
    trainer.train_and_evaluate(cfg, tmp_path, source=_source())
    scalars = event_scalars(tmp_path / "tensorboard")
    assert scalars["val/images", 2] == {16.0}  # two whole batches
    assert ("val/images", 1) not in scalars  # every val_every steps
    at_2 = {tag: value for (tag, step), (value,) in scalars.items() if step == 2}

    model = checkpoint.load_model(tmp_path / "model")  # the step-2 params
    config, vqvae = model.transformer_config, VQVAE(model.vqvae_config)
    images, labels = classifier_lib.validation_images(cfg.data)
    ids = vqvae.apply(model.vqvae_params, jnp.asarray(images[:16]) / 127.5 - 1, method=VQVAE.img_to_idx)
    x_BLCv = vqvae.apply(model.vqvae_params, ids, method=VQVAE.idx_to_var_input)
    tokens = jnp.concatenate(ids, axis=1)
    transformer = Transformer(config)
    params = {"params": unstack_blocks(model.transformer_params)["params"]}
    ce, acc = [], []
    for si, pn in enumerate(config.patch_nums):
        begin, end = config.token_range(si, si + 1)
        logits = transformer.apply(
            params,
            jnp.asarray(labels[:16]),
            x_BLCv[:, max(begin - 1, 0) : end - 1],
            first_scale=si,
            last_scale=si + 1,
        )
        ce.append(float(step_lib.cross_entropy(logits, tokens[:, begin:end]).mean()))
        acc.append(float((logits.argmax(-1) == tokens[:, begin:end]).mean() * 100))
        np.testing.assert_allclose(at_2[f"val/ce/{pn}x{pn}"], ce[-1], rtol=1e-5)
        np.testing.assert_allclose(at_2[f"val/acc/{pn}x{pn}"], acc[-1], rtol=1e-5)
    sizes = np.array([pn * pn for pn in config.patch_nums])
    np.testing.assert_allclose(at_2["val/loss"], np.dot(ce, sizes) / sizes.sum(), rtol=1e-5)
