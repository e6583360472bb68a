"""The official recipe pieces: segment schedule, lr / wd schedules, no-decay set, loss."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import tiny_transformer

from mvar_jax.models import families, transformer
from mvar_jax.models.config import PATCH_NUMS_256, InitScales, TransformerConfig
from mvar_jax.models.segments import Segment
from mvar_jax.training import optimizer, state as state_lib, step as step_lib
from mvar_jax.training.optimizer import OptimizerConfig
from mvar_jax.weights import transformer as transformer_weights


def _schedule(family: str, refine_step: int = 8, ratio_k: int = 8):
    """The family's training schedule at the official 10 scales."""
    config = TransformerConfig(family=family, refine_step=refine_step)
    return families.get(family).schedule(config, ratio_k)


# ----------------------------------------------------------------------------
# Segment schedule.


def test_mvar_cycle_is_8_1_1_at_the_official_setting(fixture_dir):
    cycle = _schedule("mvar")
    assert cycle.segments == (Segment(0, 8), Segment(8, 9), Segment(9, 10))
    visited = [cycle.segment_at(step) for step in range(25)]
    one_cycle = [Segment(0, 8)] * 8 + [Segment(8, 9), Segment(9, 10)]
    assert visited == (one_cycle * 3)[:25]
    # Token ranges agree with the segments the official model was run on.
    meta = json.loads((fixture_dir / "tiny_meta.json").read_text())
    ranges = [(s["L_bg"], s["L_ed"]) for s in meta["mvar_segments"]]
    model = TransformerConfig(patch_nums=PATCH_NUMS_256)
    assert [model.token_range(*seg) for seg in cycle.segments] == ranges
    assert [seg.name(PATCH_NUMS_256) for seg in cycle.segments] == ["1-10", "13", "16"]


def _official_prog_ed(g_it: int, ratio_k: int, refine_step: int, num_scales: int) -> int:
    """The official trainer's choice of last scale at global step g_it (trainer.py)."""
    cur_prog = g_it % (ratio_k + num_scales - refine_step)
    if cur_prog < ratio_k:
        return refine_step - 1
    return refine_step + (cur_prog % ratio_k if ratio_k != 1 else cur_prog - 1)


@pytest.mark.parametrize("ratio_k,refine_step", [(8, 8), (1, 8), (4, 7), (8, 2), (1, 3), (8, 10)])
def test_schedule_matches_the_official_rule(ratio_k, refine_step):
    """Settings where ratio_k is 1 or covers the large scales (every official one); below
    that the official modulo revisits some large scales and skips others."""
    cycle = _schedule("mvar", refine_step, ratio_k)
    for g_it in range(60):
        prog_ed = _official_prog_ed(g_it, ratio_k, refine_step, 10)
        official = Segment(0, refine_step) if prog_ed == refine_step - 1 else Segment(prog_ed, prog_ed + 1)
        assert cycle.segment_at(g_it) == official, g_it


@pytest.mark.parametrize("family", ["var", "m_var"])
def test_var_and_m_var_train_every_scale_each_step(family):
    cycle = _schedule(family, refine_step=11)  # MVAR's refine step means nothing to them
    assert {cycle.segment_at(s) for s in range(12)} == {Segment(0, 10)}


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(refine_step=11), "refine_step must be in"), (dict(refine_step=1), "refine_step must be in")],
)
def test_schedule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _schedule("mvar", **kwargs)
    with pytest.raises(ValueError, match="ratio_k must be >= 1"):
        _schedule("mvar", ratio_k=0)


# ----------------------------------------------------------------------------
# Learning rate and weight decay.


def test_lin0_schedule_at_its_corners():
    peak, total, warmup = 2.0, 1001, 100
    lr = optimizer.learning_rate_schedule(
        peak=peak, total_steps=total, warmup_steps=warmup, kind="lin0", warmup_start=0.005, final_ratio=0.1
    )
    at = lambda s: float(lr(s))  # noqa: E731
    assert at(0) == pytest.approx(0.005 * peak)
    assert at(50) == pytest.approx((0.005 + 0.995 * 0.5) * peak)  # linear warm-up
    assert at(100) == pytest.approx(peak)
    hold_end = warmup + 0.05 * (total - 1 - warmup)  # 5% of the decay phase at the peak
    assert at(int(hold_end) - 1) == pytest.approx(peak)
    assert at(total - 1) == pytest.approx(0.1 * peak)  # wpe at the last step
    mid = (hold_end + total - 1) / 2
    assert at(mid) == pytest.approx((0.1 + 0.9 * 0.5) * peak, rel=1e-5)  # linear decay
    assert np.all(np.diff([at(s) for s in range(int(hold_end) + 1, total)]) < 0)


def test_cos_schedule_and_peak_scaling():
    lr = optimizer.learning_rate_schedule(
        peak=1.0, total_steps=101, warmup_steps=0, kind="cos", final_ratio=0.0
    )
    assert float(lr(0)) == pytest.approx(1.0)
    assert float(lr(50)) == pytest.approx(0.5, abs=1e-6)
    assert OptimizerConfig(base_lr=1e-4).peak_learning_rate(448) == pytest.approx(1.75e-4)
    assert OptimizerConfig(base_lr=1e-4, lr_batch=0).peak_learning_rate(448) == 1e-4
    with pytest.raises(ValueError, match="schedule=.step.; expected one of"):
        optimizer.learning_rate_schedule(peak=1.0, total_steps=10, warmup_steps=0, kind="step")


def test_weight_decay_schedule():
    assert optimizer.weight_decay_schedule(start=0.05, end=0.05, total_steps=10) == 0.05
    wd = optimizer.weight_decay_schedule(start=0.05, end=0.08, total_steps=101)
    assert float(wd(0)) == pytest.approx(0.05)
    assert float(wd(50)) == pytest.approx(0.065)
    assert float(wd(100)) == pytest.approx(0.08)


_TINY = dict(vocab_size=16, cvae=4, num_classes=3, embed_dim=16, num_heads=2, patch_nums=(1, 2, 3))


def _tiny_config(**fields) -> TransformerConfig:
    return tiny_transformer(**{**_TINY, "refine_step": 2, **fields})


def _random_batch(config: TransformerConfig, batch_size: int, seed: int) -> dict[str, jax.Array]:
    """A step's input for ``_tiny_config``: labels, token ids and teacher-forcing features."""
    rng = np.random.default_rng(seed)
    return {
        "label": jnp.asarray(rng.integers(0, 3, (batch_size,))),
        "tokens": jnp.asarray(rng.integers(0, 16, (batch_size, config.seq_len))),
        "x_BLCv": jnp.asarray(rng.normal(size=(batch_size, config.seq_len - 1, 4)), jnp.float32),
    }


def _init(config, **scales):
    return state_lib.init_params(config, InitScales(**scales), jax.random.PRNGKey(0))


@pytest.mark.parametrize("shared_aln", [False, True])
def test_init_multipliers_scale_exactly_the_official_weights(shared_aln):
    """The official init_weights multiplies, after drawing: ada_lin weight rows [:2C] (the
    gates; our kernel's columns) by alng and the rest by aln (ada_gss rows likewise),
    head_nm's ada_lin by aln, head by hd. Against a draw with unit multipliers, that is an
    exact gain on exactly those weights and nothing else changes."""
    config = _tiny_config(shared_aln=shared_aln)
    C = config.embed_dim
    unit = _init(config, adaln=1.0, adaln_gamma=1.0, head=1.0)
    custom = _init(config, adaln=0.25, adaln_gamma=1e-3, head=0.04)
    gates_then_rest = np.r_[np.full(2 * C, 1e-3), np.full(4 * C, 0.25)]
    expected_gain = {"head_nm/ada_lin/kernel": 0.25, "head/kernel": 0.04}
    for i in range(config.depth):
        if shared_aln:
            expected_gain[f"blocks_{i}/ada_gss"] = gates_then_rest.reshape(6, C)
        else:
            expected_gain[f"blocks_{i}/ada_lin/kernel"] = gates_then_rest
    flat_unit, flat_custom = (
        {
            "/".join(k.key for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(p)[0]
        }
        for p in (unit, custom)
    )
    assert flat_unit.keys() == flat_custom.keys() >= expected_gain.keys()
    for name, value in flat_unit.items():
        gain = expected_gain.get(name, 1.0)
        np.testing.assert_allclose(flat_custom[name], value * gain, rtol=1e-6, err_msg=name)
    # And the draws themselves have the official spread: multiplier x init_std for the
    # Linear weights (sqrt(1 / 3C)), multiplier x 1 / sqrt(C) for ada_gss (randn / sqrt(C)).
    for name, gain in expected_gain.items():
        base = C**-0.5 if name.endswith("ada_gss") else (1 / (3 * C)) ** 0.5
        gains = np.broadcast_to(gain, flat_custom[name].shape)
        for g in np.unique(gains):
            spread = flat_custom[name][gains == g].std() / (g * base)
            assert 0.6 < spread < 1.4, (name, g, spread)


def test_init_multipliers_must_be_finite_and_non_negative():
    with pytest.raises(ValueError, match="InitScales: head must be"):
        InitScales(head=-0.02)
    with pytest.raises(ValueError, match="InitScales: adaln_gamma must be"):
        InitScales(adaln_gamma=float("nan"))
    with pytest.raises(ValueError, match="InitScales: std=0.02: only the official automatic init"):
        InitScales(std=0.02)


def test_no_decay_set_is_the_official_one():
    params = transformer.param_shapes(_tiny_config())["params"]
    flat = jax.tree_util.tree_flatten_with_path(optimizer.official_decay_mask(params))[0]
    no_decay = {
        transformer_weights.official_key(tuple(k.key for k in path)) for path, decayed in flat if not decayed
    }
    # filter_params: 1-D tensors, biases and the nowd_keys (pos_*, lvl_embed, scale_mul).
    expected = {
        "pos_start",
        "pos_1LC",
        "lvl_embed.weight",
        "word_embed.bias",
        "head.bias",
        "head_nm.ada_lin.1.bias",
    }
    for i in range(2):
        expected |= {f"blocks.{i}.attn.{n}" for n in ("q_bias", "v_bias", "scale_mul_1H11", "proj.bias")}
        expected |= {f"blocks.{i}.ffn.fc1.bias", f"blocks.{i}.ffn.fc2.bias", f"blocks.{i}.ada_lin.1.bias"}
    assert no_decay == expected
    # Everything else, class embedding included, is decayed.
    # word_embed, class_emb; mat_qkv, proj, fc1, fc2, ada_lin per block; head_nm, head.
    assert len(flat) - len(no_decay) == 2 + 5 * 2 + 2


def test_adamw_matches_torch_with_the_no_decay_groups():
    """One step of the optax chain equals torch AdamW with filter_params' groups and clipping."""
    optim = OptimizerConfig(base_lr=1e-2, weight_decay=0.05, grad_clip=0.5, warmup_fraction=0.0)
    rng = np.random.default_rng(0)
    params = {
        "head": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        }
    }
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    tx, lr = optimizer.make_optimizer(
        optim, global_batch_size=256, total_steps=100, decay_mask=optimizer.official_decay_mask
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params["head"].items()}
    for k, g in grads["head"].items():
        tp[k].grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(list(tp.values()), 0.5)
    opt = torch.optim.AdamW(
        [{"params": [tp["kernel"]], "weight_decay": 0.05}, {"params": [tp["bias"]], "weight_decay": 0.0}],
        lr=float(lr(0)),
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    opt.step()
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(new["head"][k], tp[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_lion_is_the_papers_update_with_the_recipes_clipping_and_decay():
    """Three steps of ``name='lion'`` against Lion written out in numpy (Chen et al. 2023, Alg. 2),
    after global-norm clipping, with decoupled decay on the official no-decay groups."""
    optim = OptimizerConfig(
        name="lion", base_lr=1e-3, weight_decay=0.4, grad_clip=0.5, warmup_fraction=0.0, b1=0.9, b2=0.99
    )
    rng = np.random.default_rng(1)
    params = {"head": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}}
    params = jax.tree.map(lambda p: p.astype(np.float32), params)
    tx, lr = optimizer.make_optimizer(
        optim, global_batch_size=256, total_steps=100, decay_mask=optimizer.official_decay_mask
    )
    state, ours = tx.init(params), params
    want = {k: v.astype(np.float64) for k, v in params["head"].items()}
    momentum = {k: np.zeros_like(v) for k, v in want.items()}
    for step in range(3):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        updates, state = tx.update(grads, state, ours)
        ours = jax.tree.map(lambda p, u: np.asarray(p + u), ours, updates)

        g = {k: v.astype(np.float64) for k, v in grads["head"].items()}
        norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        g = {k: v * min(1.0, 0.5 / norm) for k, v in g.items()}
        rate = float(lr(step))
        for k, decay in (("kernel", 0.4), ("bias", 0.0)):
            direction = np.sign(0.9 * momentum[k] + 0.1 * g[k])
            want[k] = want[k] - rate * (direction + decay * want[k])
            momentum[k] = 0.99 * momentum[k] + 0.01 * g[k]
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(ours["head"][k], want[k], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Loss.


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
    """k micro-batches, one after another, make the step the whole batch makes (float32)."""
    segment = Segment(0, 2)  # from the first scale: the step slices x_BLCv past the start token
    config = _tiny_config(cond_drop_rate=0.0)
    model = transformer.Transformer(config)
    params = transformer.init_params(config, jax.random.PRNGKey(0))["params"]
    batch = _random_batch(config, 8, seed=3)
    tx, lr = optimizer.make_optimizer(
        OptimizerConfig(base_lr=1e-3, warmup_fraction=0.0),
        global_batch_size=8,
        total_steps=10,
        decay_mask=optimizer.official_decay_mask,
    )
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))

    def step(k):
        make = step_lib.make_train_step(model, tx, lr, segment, label_smoothing=0.1, grad_accum_steps=k)
        return jax.jit(make)(state, batch)

    whole, whole_metrics = step(1)
    accumulated, metrics = step(4)  # micro-batches of 2: examples (0, 4), (1, 5), ...
    assert sorted(metrics) == sorted(whole_metrics)
    for name, value in whole_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), accumulated.params, whole.params
    )
    with pytest.raises(ValueError, match="grad_accum_steps=0 must be >= 1"):
        step_lib.make_train_step(model, tx, lr, segment, label_smoothing=0.0, grad_accum_steps=0)


def test_remat_changes_memory_not_the_step():
    """Recomputed blocks (and their attention's lean backward) give the step without remat: loss,
    gradients (through class dropout) and update; drop path still acts (its masks come from
    another key stream). VAR, whose every block attention the lean backward serves; the
    recomputation is the same for every family, and test_attention checks the lean backward."""
    segment = Segment(0, 3)
    batch = _random_batch(_tiny_config(), 4, seed=5)

    def step(remat, drop_path_rate=0.0):
        config = _tiny_config(family="var", drop_path_rate=drop_path_rate, remat=remat)
        model = transformer.Transformer(config)
        params = _init(config, adaln_gamma=0.5)  # open gates: the blocks count
        tx, lr = optimizer.make_optimizer(
            OptimizerConfig(), global_batch_size=4, total_steps=10, decay_mask=optimizer.official_decay_mask
        )
        state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
        make = step_lib.make_train_step(model, tx, lr, segment, label_smoothing=0.0)
        return jax.jit(make)(state, batch)

    plain, plain_metrics = step("none")
    state, metrics = step("block")
    for name in ("loss", "grad_norm", "ce/3x3"):
        np.testing.assert_allclose(metrics[name], plain_metrics[name], rtol=1e-6, err_msg=name)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7), state.params, plain.params)
    dropped = step("block", drop_path_rate=0.5)[1]["loss"]
    assert float(dropped) != pytest.approx(float(metrics["loss"]), rel=1e-6)  # the head is nearly flat
    with pytest.raises(ValueError, match="remat must be one of"):
        _tiny_config(remat="all")


def test_cross_entropy_matches_torch_label_smoothing():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    for smoothing in (0.0, 0.1):
        ours = step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), smoothing)
        ref = torch.nn.functional.cross_entropy(
            torch.tensor(logits).reshape(-1, 11),
            torch.tensor(targets).reshape(-1),
            label_smoothing=smoothing,
            reduction="none",
        ).reshape(2, 5)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_segment_loss_weights_tokens_by_one_over_L():
    """The official loss_weight: every token of any segment counts 1 / L, L the whole pyramid."""
    config = _tiny_config(cond_drop_rate=0.0)
    model = transformer.Transformer(config)
    params = transformer.init_params(config, jax.random.PRNGKey(0))["params"]
    batch = _random_batch(config, 2, seed=2)
    tx, lr = optimizer.make_optimizer(
        OptimizerConfig(
            base_lr=1e-3,
            weight_decay=0.0,
            grad_clip=0.0,
            warmup_fraction=0.0,
            warmup_start=1.0,
            final_lr_ratio=1.0,
        ),
        global_batch_size=256,
        total_steps=10,
        decay_mask=optimizer.official_decay_mask,
    )
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
    segment = Segment(2, 3)  # the 3x3 scale alone: tokens [5, 14)
    train_step = jax.jit(step_lib.make_train_step(model, tx, lr, segment, label_smoothing=0.0))
    _, metrics = train_step(state, batch)
    logits = model.apply(
        {"params": params}, batch["label"], batch["x_BLCv"][:, 4:13], first_scale=2, last_scale=3
    )
    ce = torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits)).reshape(-1, 16),
        torch.tensor(np.asarray(batch["tokens"][:, 5:14])).long().reshape(-1),
        reduction="none",
    )
    expected = ce.reshape(2, 9).sum(1).mean() / config.seq_len
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["ce/3x3"]) == pytest.approx(float(ce.mean()), rel=1e-5)
    assert set(metrics) >= {"grad_norm", "param_norm", "learning_rate", "acc/3x3"}


def test_no_decay_set_of_m_var_is_the_official_one():
    """filter_params on M-VAR's Mamba2 layer: its 1-D tensors and biases are not decayed."""
    config = TransformerConfig(depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2), family="m_var")
    params = transformer.param_shapes(config)["params"]
    flat = jax.tree_util.tree_flatten_with_path(optimizer.official_decay_mask(params))[0]
    decayed = {transformer_weights.official_key(tuple(k.key for k in path)): d for path, d in flat}
    assert {k.removeprefix("blocks.0.mamba."): d for k, d in decayed.items() if ".mamba." in k} == {
        "in_proj.weight": True,
        "out_proj.weight": True,
        "conv1d.weight": True,  # (C, 1, 4)
        "conv1d.bias": False,
        "dt_bias": False,
        "A_log": False,
        "D": False,
        "norm.weight": False,
    }
    assert decayed["blocks.0.ada_lin.1.weight"]  # the 9-way AdaLN, as VAR's 6-way one


def test_optimizer_settings_are_checked():
    for fields, message in [
        (dict(name="lamb"), r"name='lamb'; expected one of \('adamw', 'lion'\)"),
        (dict(base_lr=0.0), "base_lr=0.0 must be positive"),
        (dict(lr_batch=-1), "lr_batch=-1"),
        (dict(schedule="step"), "schedule='step'"),
        (dict(warmup_fraction=1.0), r"warmup_fraction=1.0 must be in \[0, 1\)"),
        (dict(final_lr_ratio=-0.1), "final_lr_ratio=-0.1 must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            OptimizerConfig(**fields)
    assert dataclasses.replace(OptimizerConfig(), base_lr=2e-4).peak_learning_rate(256) == 2e-4
