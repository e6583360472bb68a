"""Tokenizer training through the trainer: evaluation and export, the GAN path, the dead-code
restart's optimizer rows, and the start-up errors. Exact resume after a kill at any
moment is tests/test_kill_anywhere.py's (its ``tokenizer`` run).

Runs train a small VQVAE (16 px, 4x4 latents, patch_nums (1, 2, 4), 64 codes) for a few
steps on built-in shapes drawn into an image folder, with one corrupt file in each
split (skipped and counted by the data pipeline). Compilation dominates their time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
from conftest import event_scalars, set_fields
from test_training import _assert_trees_equal

from mvar_jax import checkpoint, parallel
from mvar_jax.configs import tiny_cpu, vqvae_imagenet256, vqvae_tiny_cpu
from mvar_jax.data import builtin_shapes
from mvar_jax.errors import CheckpointError
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.training import checkpointing, generator, tokenizer, trainer

DRAWN, SIZE, CLASSES = 32, 16, 4  # drawn at 32 px, trained at 16
STEPS = 4
PATCH_NUMS = (1, 2, 4)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """``train/`` (2 images a class) and ``val/`` (1 a class) of built-in shapes,
    and an unreadable ``bad.png`` in each split's first class."""
    root = tmp_path_factory.mktemp("shapes")
    for split, tfds_split, per_class in (("train", "train", 2), ("val", "validation", 1)):
        for c in range(CLASSES):
            class_dir = root / split / f"class{c}"
            class_dir.mkdir(parents=True)
            for i in range(per_class):
                seed = builtin_shapes.example_seed(0, tfds_split, c * per_class + i)
                PIL.Image.fromarray(builtin_shapes.draw_example(c, seed, DRAWN)).save(class_dir / f"{i}.png")
        (root / split / "class0" / "bad.png").write_bytes(b"not a png")
    return root


def _config(shapes, **overrides):
    c = vqvae_tiny_cpu.get_config()
    c.data.name, c.data.data_dir = "folder", str(shapes)
    c.data.image_size, c.data.num_classes, c.data.num_workers = SIZE, CLASSES, 1
    c.model.ch, c.model.ch_mult = 32, (1, 1, 2)  # 4x downsampling: 4x4 latents
    c.model.vocab_size, c.model.z_channels, c.model.patch_nums = 64, 8, PATCH_NUMS
    c.batch_size, c.num_train_steps = 4, STEPS
    c.log_every, c.checkpoint_every = 1, 2
    c.codebook.window, c.codebook.dead_after = 2, 2
    c.eval_every, c.eval_images, c.eval_batch_size, c.grid_images = STEPS, 4, 4, 2
    set_fields(c, overrides)
    return c


def test_trains_evaluates_and_exports_a_generator_tokenizer(shapes, tmp_path):
    config = _config(shapes)
    straight = trainer.train_and_evaluate(config, tmp_path / "straight")
    assert int(straight.step) == STEPS and straight.disc_params is None

    # The export is a tokenizer directory that generator configs accept.
    model_dir = tmp_path / "straight" / "model"
    vqvae_config, params = checkpoint.load_tokenizer(model_dir)
    assert vqvae_config == tokenizer.vqvae_config(config)
    _assert_trees_equal(params, {"params": straight.params})
    gen = tiny_cpu.get_config()
    gen.vqvae_checkpoint, gen.data.image_size = str(model_dir), SIZE
    gen.model.patch_nums, gen.model.refine_step = PATCH_NUMS, 2
    generator.check_config(gen)
    model = generator.transformer_config(gen, generator.load_tokenizer(gen.vqvae_checkpoint, PATCH_NUMS)[0])
    assert (model.vocab_size, model.cvae, model.patch_nums) == (64, 8, PATCH_NUMS)

    # Codebook health every step, the evaluation at the end (the unreadable
    # validation image counted, not scored), and the grid as a PNG.
    scalars = event_scalars(tmp_path / "straight" / "tensorboard")
    for tag in (
        "usage/1x1",
        "usage_official/4x4",
        "perplexity/2x2",
        "usage/all",
        "codebook/restarted",
        "psnr",
        "rec/l2",
        "vq_loss",
    ):
        assert {(tag, s) in scalars for s in range(1, STEPS + 1)} == {True}, tag
    assert scalars[("eval/images", STEPS)] == {4.0}
    assert scalars[("eval/unreadable_images", STEPS)] == {1.0}
    assert 0 < next(iter(scalars[("eval/psnr", STEPS)])) < 60
    assert (tmp_path / "straight" / "reconstructions" / f"step_{STEPS:08d}.png").exists()

    # The data position skipped (and counted) the corrupt training image.
    _, data_state = checkpointing.Checkpointer(tmp_path / "straight" / "checkpoints", max_to_keep=2).restore(
        STEPS, jax.eval_shape(lambda: straight)
    )
    assert data_state["num_bad_records"] >= 1


def test_gan_starts_at_its_step_with_the_adaptive_weight(shapes, tmp_path):
    start = 2
    config = _config(
        shapes,
        eval_every=0,
        **{"gan.weight": 0.5, "gan.start": start, "gan.ndf": 8, "gan.n_layers": 2, "codebook.dead_after": 0},
    )
    state = trainer.train_and_evaluate(config, tmp_path)

    # The discriminator and its optimizer state are checkpointed with the VQVAE.
    checkpointer = checkpointing.Checkpointer(tmp_path / "checkpoints", max_to_keep=2)
    restored, _ = checkpointer.restore(STEPS, jax.eval_shape(lambda: state))
    _assert_trees_equal(restored, state)
    # Untouched before the start (the step-2 checkpoint holds the initial weights), trained after.
    task = tokenizer.TokenizerTask(config, mesh=parallel.make_mesh(), num_steps=STEPS)
    initial = task.init_state(
        jax.tree.map(lambda _: parallel.replicated(parallel.make_mesh()), task.abstract_state())
    )
    at_start, _ = checkpointer.restore(start, jax.eval_shape(lambda: state))
    _assert_trees_equal(at_start.disc_params, initial.disc_params)
    assert not np.array_equal(state.disc_params["conv0"]["kernel"], initial.disc_params["conv0"]["kernel"])

    scalars = event_scalars(tmp_path / "tensorboard")
    for step in range(1, STEPS + 1):
        gan_step = step > start
        assert (("gan/d_loss", step) in scalars) == gan_step
        assert (("gan/d_weight", step) in scalars) == gan_step
        if gan_step:
            assert np.isfinite(next(iter(scalars[("gan/d_loss", step)])))
            weight = next(iter(scalars[("gan/d_weight", step)]))
            # The adaptive ratio of gradient norms, not the configured weight itself.
            assert weight > 0 and weight != pytest.approx(0.5)
    assert checkpoint.load_tokenizer(tmp_path / "model")[0] == tokenizer.vqvae_config(config)


def _train_step(config):
    """The task's no-GAN step, compiled, and its initial state."""
    mesh = parallel.make_mesh()
    task = tokenizer.TokenizerTask(config, mesh=mesh, num_steps=STEPS)
    state = task.init_state(parallel.state_shardings(task.abstract_state(), mesh, fsdp=False))
    return jax.jit(task.train_steps()[0]), state


def _codebook_rows(tree):
    return np.asarray(tree["quantize"]["embedding"]["embedding"])


def test_restart_reseeds_dead_codes_and_zeroes_their_adam_rows(shapes):
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.integers(0, 256, (4, SIZE, SIZE, 3), np.uint8))} for _ in range(2)]
    # dead_after=1: a code that no scale chose in the step just taken is dead.
    restart_step, state = _train_step(_config(shapes, **{"codebook.dead_after": 1}))
    plain_step, _ = _train_step(_config(shapes, **{"codebook.dead_after": 0}))
    state, _ = restart_step(state, batches[0])
    # The second step from the same state, with and without the restart.
    restarted, metrics = restart_step(state, batches[1])
    plain, _ = plain_step(state, batches[1])

    dead = np.asarray(plain.codebook.idle_V) >= 1
    assert int(metrics["codebook/restarted"]) == dead.sum() > 0
    adam_restarted, adam_plain = restarted.opt_state[1], plain.opt_state[1]
    for moments in ("mu", "nu"):
        rows = _codebook_rows(getattr(adam_restarted, moments))
        plain_rows = _codebook_rows(getattr(adam_plain, moments))
        assert not rows[dead].any()  # re-seeded rows start with fresh moments
        # ... which they had not: codes chosen in the first step, not in the second.
        assert np.abs(plain_rows[dead]).sum(axis=1).astype(bool).any()
        np.testing.assert_array_equal(rows[~dead], plain_rows[~dead])  # live rows untouched
    table, plain_table = _codebook_rows(restarted.params), _codebook_rows(plain.params)
    # Two compiled programs: XLA may fuse the live rows' Adam update differently (1 ulp seen).
    np.testing.assert_allclose(table[~dead], plain_table[~dead], rtol=1e-6, atol=0)
    assert not np.any(table[dead] == plain_table[dead])
    # The rest of the model and of the optimizer state is the same with and without.
    _assert_trees_equal(restarted.params["decoder"], plain.params["decoder"])
    _assert_trees_equal(restarted.opt_state[2:], plain.opt_state[2:])
    np.testing.assert_array_equal(adam_restarted.count, adam_plain.count)


@pytest.mark.parametrize("tx, moment_names", [(optax.adam(1e-3), ("mu", "nu")), (optax.lion(1e-3), ("mu",))])
def test_reset_code_moments_touches_only_the_codebook_rows(tx, moment_names):
    params = {
        "quantize": {"embedding": {"embedding": jnp.ones((4, 2))}},
        "decoder": {"embedding": {"embedding": jnp.ones((4, 2))}},
    }
    opt_state = tx.update(params, tx.init(params), params)[1]  # moments of a step: nonzero
    rows = jnp.asarray([True, False, True, False])
    reset = tokenizer.reset_code_moments(opt_state, rows)
    for moments in moment_names:
        got = getattr(reset[0], moments)
        want = getattr(opt_state[0], moments)
        np.testing.assert_array_equal(
            got["quantize"]["embedding"]["embedding"],
            np.where(rows[:, None], 0, want["quantize"]["embedding"]["embedding"]),
        )
        np.testing.assert_array_equal(
            got["decoder"]["embedding"]["embedding"], want["decoder"]["embedding"]["embedding"]
        )


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (
            {"model.patch_nums": (1, 2, 3)},
            ValueError,
            r"patch_nums=\(1, 2, 3\) do not fit config.data.image_size=16: .* must be image_size / 4 = 4",
        ),
        ({"data.image_size": 48}, ValueError, r"image_size=48: .* image_size / 4 = 12"),
        ({"model.vocab_size": 1}, ValueError, "vocab_size=1: a codebook needs >= 2 codes"),
        ({"model.ch": 40}, ValueError, "config.model: .* not divisible by the 32 GroupNorm groups"),
        ({"loss.l2": 0.0, "loss.l1": 0.0}, ValueError, "no reconstruction loss"),
        (
            {"loss.lpips": 0.1},
            CheckpointError,
            "LPIPS is enabled but no file is given for its VGG16 weights",
        ),
        (
            {
                "loss.lpips": 0.1,
                "loss.lpips_vgg": "/nonexistent/vgg16.pth",
                "loss.lpips_lin": "/nonexistent/vgg.pth",
            },
            CheckpointError,
            "VGG16 weights .* file is missing: /nonexistent/vgg16.pth",
        ),
        ({"gan.weight": 0.5, "gan.loss": "wgan"}, ValueError, "gan.loss='wgan'"),
        ({"gan.weight": 0.5}, ValueError, "a 3-layer discriminator .* does not fit 16 px images"),
        ({"codebook.window": 0}, ValueError, "config.codebook: window=0 must be a positive int"),
        ({"codebook.dead_after": -1}, ValueError, "config.codebook: dead_after=-1 must be an int >= 0"),
        ({"optim.base_lr": 0.0}, ValueError, "config.optim: base_lr=0.0 must be positive"),
        (
            {"gan.weight": 0.5, "gan.n_layers": 2, "gan.optim.schedule": "x"},
            ValueError,
            "config.gan.optim: schedule='x'",
        ),
        ({"data.token_cache_dir": "/tmp/tokens"}, ValueError, "token_cache_dir is set"),
        ({"grid_images": 8}, ValueError, r"grid_images=8 must be in \[0, eval_batch_size=4\]"),
    ],
)
def test_bad_configs_fail_before_anything_is_written(shapes, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        trainer.train_and_evaluate(_config(shapes, **overrides), tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_discriminator_starting_past_the_end_fails_at_start_up(shapes, tmp_path):
    config = _config(shapes, **{"gan.weight": 0.5, "gan.start": STEPS, "gan.n_layers": 2})
    with pytest.raises(
        ValueError,
        match=rf"gan.start={STEPS} is past the run's end \({STEPS} "
        "steps\\): the discriminator would never train",
    ):
        trainer.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_missing_validation_split_fails_at_start_up(shapes, tmp_path):
    only_train = tmp_path / "data"
    only_train.mkdir()
    (only_train / "train").symlink_to(shapes / "train", target_is_directory=True)
    with pytest.raises((ValueError, FileNotFoundError), match="val"):
        trainer.train_and_evaluate(_config(only_train), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_tiny_config_passes_its_checks():
    config = vqvae_tiny_cpu.get_config()
    trainer.check_config(config)
    tokenizer.check_config(config)
    assert trainer.task_class(config) is tokenizer.TokenizerTask
    vqvae_config = tokenizer.vqvae_config(config)
    assert (vqvae_config.image_size, vqvae_config.downsample) == (32, 4)


def test_imagenet_recipe_passes_its_checks_once_the_lpips_weights_are_there(tmp_path, monkeypatch):
    config = vqvae_imagenet256.get_config()
    monkeypatch.chdir(tmp_path)  # the config's relative LPIPS paths
    with pytest.raises(CheckpointError, match="file is missing: pretrained/vgg16-397923af.pth"):
        tokenizer.check_config(config)
    for path in (config.loss.lpips_vgg, config.loss.lpips_lin):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_bytes(b"")  # the start-up check looks for the files only
    trainer.check_config(config)
    tokenizer.check_config(config)
    assert tokenizer.vqvae_config(config) == VQVAEConfig()  # the released tokenizer's
    assert 0 < config.gan.start < trainer.total_steps(config)
