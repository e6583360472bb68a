"""Progressive training against the official VAR trainer's rule (train.py, trainer.py,
utils/arg_util.py, utils/lr_control.py of FoundationVision/VAR), worked by hand."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
import torch
from conftest import event_scalars, set_fields, tiny_transformer

from mvar_jax.configs import tiny_cpu
from mvar_jax.models import families, transformer
from mvar_jax.models.config import PATCH_NUMS_256, TransformerConfig
from mvar_jax.models.segments import Segment
from mvar_jax.training import optimizer, progressive, state as state_lib, step as step_lib, trainer
from mvar_jax.training.optimizer import OptimizerConfig
from mvar_jax.training.progressive import Curriculum, ProgressiveConfig, Ramp, StepPlan
from mvar_jax.training.synthetic import SyntheticTokenSource

REPO = pathlib.Path(__file__).parent.parent

# 1000 steps, a 20-step lr warm-up, --pg 0.8 --pg0 4 over the 10 scales of 256 px.
_RUN = dict(num_scales=10, total_steps=1000, lr_warmup_steps=20.0)


def _stage(step: int, **fields) -> int:
    return progressive.stage_at(step, **_RUN, progressive=ProgressiveConfig(**{"fraction": 0.8, **fields}))


@pytest.mark.parametrize(
    "step,stage",
    [
        (0, 4),
        (20, 4),  # through the warm-up (g_it <= wp_it)
        (98, 4),  # progress 78/780 * 5 = 0.5: Python's round takes the even 0
        (99, 5),
        (253, 5),  # 233/780 * 5 = 1.49
        (254, 6),  # 234/780 * 5 = 1.5 -> 2
        (799, 9),  # 779/780 * 5 rounds up to the last stage
        (800, 9),  # from max_it * pg on: every scale
        (999, 9),
    ],
)
def test_stage_is_the_official_one(step, stage):
    assert _stage(step) == stage


def test_stage_from_the_first_scale_and_off():
    # --pg0 1 (the official local_debug setting): delta 8 over the same span.
    assert [_stage(s, first_stage=1) for s in (20, 68, 69, 400)] == [1, 1, 2, 1 + round(380 / 780 * 8)]
    assert {progressive.stage_at(s, **_RUN, progressive=ProgressiveConfig()) for s in range(0, 1000, 7)} == {
        9
    }


def _curriculum(family: str, **fields) -> Curriculum:
    schedule = families.get(family).schedule(TransformerConfig(family=family), 8)
    return Curriculum(schedule, **_RUN, progressive=ProgressiveConfig(**{"fraction": 0.8, **fields}))


def test_new_scales_ramp_up_as_the_official_loss_weight():
    curriculum = _curriculum("var")
    ramps = {plan.segment.last_scale - 1: plan.ramp for plan in curriculum.plans}
    # The first stage is eased in by the lr warm-up, the last is plain training.
    assert ramps[4] is None and ramps[9] is None
    # Stage 5 starts at step 99; 1000 / 300 steps of warm-up: prog_it / prog_wp_it, prog_it from 1.
    assert ramps[5] == Ramp(5, 99, 1000 / 300)
    np.testing.assert_allclose([ramps[5].weight(s) for s in (99, 100, 101, 102, 500)], [0.3, 0.6, 0.9, 1, 1])
    assert float(Ramp(5, 99, 500.0).weight(99)) == pytest.approx(0.01)  # 1/500, floored at 0.01
    weights = progressive.token_weights(
        Segment(0, 6), ramps[5], TransformerConfig(patch_nums=PATCH_NUMS_256), 99
    )
    np.testing.assert_allclose(weights, [1.0] * 55 + [0.3] * 36, rtol=1e-6)  # 1x1..5x5, then 6x6


def test_var_grows_the_pyramid_and_mvar_cuts_its_cycle():
    var = _curriculum("var")
    assert [plan.segment for plan in var.plans] == [Segment(0, s + 1) for s in range(4, 10)]
    assert [var.plan_at(s).segment for s in (0, 98, 99, 254, 999)] == [Segment(0, 5)] * 2 + [
        Segment(0, 6),
        Segment(0, 7),
        Segment(0, 10),
    ]

    mvar = _curriculum("mvar")
    small, large_13, large_16 = Segment(0, 8), Segment(8, 9), Segment(9, 10)
    assert mvar.stage_at(567) == 8 and 567 % 9 == 0
    # Stage 8 (13x13 arrives): a cycle of 9, 1-10 eight times, then 13x13 with its ramp.
    at = [mvar.plan_at(s) for s in range(567, 577)]
    assert [p.segment for p in at] == [small] * 8 + [large_13, small]
    assert at[8].ramp.scale == 8 and at[0].ramp is None
    # Every scale: the plain 8:1:1 cycle at the official places.
    assert [mvar.plan_at(s) for s in range(990, 1000)] == [StepPlan(small)] * 8 + [
        StepPlan(large_13),
        StepPlan(large_16),
    ]
    # Before the large scales: the small segment cut at the stage.
    assert {mvar.plan_at(s).segment for s in range(0, 99)} == {Segment(0, 5)}


def test_without_progression_the_plans_are_the_schedule():
    schedule = families.get("mvar").schedule(TransformerConfig(), 8)
    curriculum = Curriculum(schedule, **_RUN, progressive=ProgressiveConfig())
    assert curriculum.plans == [StepPlan(s) for s in schedule.segments]
    assert all(curriculum.index_at(s) == schedule.index_at(s) for s in range(100))


def test_settings_are_checked():
    for fields, message in [
        (dict(fraction=1.0), r"fraction=1.0 must be in \[0, 1\)"),
        (dict(first_stage=-1), "first_stage=-1"),
        (dict(warmup_fraction=0.0), r"warmup_fraction=0.0 must be in \(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            ProgressiveConfig(**fields)
    with pytest.raises(ValueError, match="first_stage=10 must be below the 10 scales"):
        _curriculum("var", first_stage=10)
    assert ProgressiveConfig(fraction=0.8).lr_schedule == "lin0.8"


def test_progressive_lr_schedule_is_lin_pg():
    """lr_wd_annealing's 'lin<T>' branch: down to the midpoint at T of the decay, then to wpe."""
    peak, total, warmup, turn, wpe = 1.0, 1001, 0, 0.8, 0.1
    lr = optimizer.learning_rate_schedule(
        peak=peak, total_steps=total, warmup_steps=warmup, kind="lin0.8", final_ratio=wpe
    )
    mid = (1 + wpe + (1 - wpe) * (1 - turn)) / 2  # 0.64
    assert float(lr(0)) == pytest.approx(1.0)
    assert float(lr(400)) == pytest.approx(1 + (mid - 1) * 0.5, rel=1e-6)
    assert float(lr(800)) == pytest.approx(mid, rel=1e-6)
    assert float(lr(1000)) == pytest.approx(wpe, rel=1e-6)
    lin00 = optimizer.learning_rate_schedule(
        peak=1.0, total_steps=11, warmup_steps=0, kind="lin00", final_ratio=0
    )
    np.testing.assert_allclose([lin00(s) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-7)
    exp = optimizer.learning_rate_schedule(
        peak=1.0, total_steps=101, warmup_steps=0, kind="exp", final_ratio=0.01
    )
    np.testing.assert_allclose([exp(s) for s in (10, 15, 100)], [1.0, 1.0, 0.01], rtol=1e-5)
    for bad in ("lin1", "lin-0.5", "linear"):
        with pytest.raises(ValueError, match=f"schedule='{bad}'"):
            OptimizerConfig(schedule=bad)


def test_ramped_step_loss_is_the_official_weighted_loss():
    """trainer.py: lw = loss_weight[:, :ed] with the newest scale times prog_wp, summed, batch mean."""
    config = tiny_transformer(family="var", cond_drop_rate=0.0, drop_path_rate=0.0)
    model = transformer.Transformer(config)
    params = transformer.init_params(config, jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(4)
    batch = {
        "label": rng.integers(0, 10, (2,)),
        "tokens": rng.integers(0, config.vocab_size, (2, config.seq_len)),
        "x_BLCv": rng.normal(size=(2, config.seq_len - 1, config.cvae)).astype(np.float32),
    }
    tx, lr = optimizer.make_optimizer(
        OptimizerConfig(), global_batch_size=2, total_steps=10, decay_mask=optimizer.official_decay_mask
    )
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1)).replace(step=3)
    ramp = Ramp(scale=2, start=2, steps=4.0)  # step 3: prog_it 2 of 4 -> weight 0.5
    step = step_lib.make_train_step(model, tx, lr, Segment(0, 3), label_smoothing=0.0, ramp=ramp)
    _, metrics = jax.jit(step)(state, batch)

    logits = model.apply(
        {"params": params}, batch["label"], batch["x_BLCv"][:, :13], first_scale=0, last_scale=3
    )
    ce = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)).reshape(-1, config.vocab_size),
        torch.tensor(batch["tokens"][:, :14]).reshape(-1),
        reduction="none",
    ).reshape(2, 14)
    lw = torch.ones(1, config.seq_len)[:, :14] / config.seq_len
    lw[:, 5:14] *= 0.5
    assert float(metrics["loss"]) == pytest.approx(float(ce.mul(lw).sum(-1).mean()), rel=1e-5)
    assert float(metrics["progressive_weight"]) == 0.5
    assert "ce/4x4" not in metrics and float(metrics["ce/3x3"]) == pytest.approx(
        float(ce[:, 5:].mean()), rel=1e-5
    )


def test_a_progressive_run_trains_each_stage_in_turn(tmp_path):
    """8 steps of the tiny VAR, --pg 0.75 --pg0 1, no lr warm-up: stage 1 for steps 0-1, stage 2
    (ramped over 2 steps) for 2-4, every scale from 5; the log shows which scales trained."""
    c = tiny_cpu.get_config("fixture")
    set_fields(
        c,
        {
            "vqvae_checkpoint": str(REPO / c.vqvae_checkpoint),
            "model.family": "var",
            "model.depth": 1,
            "batch_size": 4,
            "num_train_steps": 8,
            "log_every": 1,
            "checkpoint_every": 8,
            "sample_every": 0,
            "optim.warmup_fraction": 0.0,
            "progressive.fraction": 0.75,
            "progressive.first_stage": 1,
            "progressive.warmup_fraction": 0.25,
        },
    )
    source = SyntheticTokenSource(batch_size=4, seq_len=30, vocab_size=64, num_classes=10)
    trainer.train_and_evaluate(c, tmp_path, source=source)
    scalars = event_scalars(tmp_path / "tensorboard")
    logged = lambda tag: sorted(step for t, step in scalars if t == tag)  # noqa: E731
    assert logged("ce/2x2") == list(range(1, 9))
    assert logged("ce/3x3") == list(range(3, 9))
    assert logged("ce/4x4") == list(range(6, 9))
    assert [scalars["progressive_weight", s] for s in logged("progressive_weight")] == [{0.5}, {1.0}, {1.0}]
    assert logged("progressive_weight") == [3, 4, 5]
    # The lr follows lin0.75 (lr_wd_annealing, wp 0, 7 decay steps): to the midpoint at 75%, then wpe.
    peak, wpe = c.optim.base_lr * 4 / 256, c.optim.final_lr_ratio
    mid = (1 + wpe + (1 - wpe) * 0.25) / 2
    lr = {step: value for (tag, step), (value,) in scalars.items() if tag == "learning_rate"}
    assert lr[1] == pytest.approx(peak, rel=1e-6)  # the lr of step 0, logged after it
    assert lr[4] == pytest.approx(peak * (1 + (mid - 1) * (3 / 7) / 0.75), rel=1e-5)
    assert lr[8] == pytest.approx(peak * wpe, rel=1e-5)
