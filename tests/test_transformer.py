"""The VAR / MVAR transformer: official parity, per-scale inference, attention structure."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_transformer

from mvar_jax.models import families
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.mvar import check_refine_step
from mvar_jax.models.transformer import (
    Transformer,
    blocks_are_stacked,
    init_params,
    param_shapes,
    stack_blocks,
    stack_cache,
    unstack_blocks,
)
from mvar_jax.weights import transformer as transformer_weights

# The official MVAR training segments of the tiny fixtures (tiny_meta.json).
SEGMENTS = {"mvar_logits_seg0": (0, 8), "mvar_logits_seg1": (8, 9), "mvar_logits_seg2": (9, 10)}


@functools.cache
def _forward(config, train=False):
    """Jitted teacher forcing (static scale range), compiled once per config."""
    model = Transformer(config)
    return jax.jit(functools.partial(model.apply, train=train), static_argnames=("first_scale", "last_scale"))


def _inputs_for(config, x_BLCv_wo_first_l, first_scale, last_scale):
    """The official trainer's slice of the teacher-forcing input for a scale range."""
    begin, end = config.token_range(first_scale, last_scale)
    return x_BLCv_wo_first_l[:, max(0, begin - config.first_l) : end - config.first_l]


@pytest.fixture(scope="module")
def tiny_mvar(fixture_dir):
    return transformer_weights.load_transformer(fixture_dir / "tiny_mvar.pth", neighborhood_impl="reference")


@pytest.fixture(scope="module")
def tiny_var(fixture_dir):
    return transformer_weights.load_transformer(fixture_dir / "tiny_var.pth")


# ----------------------------------------------------------------------------
# Parity with the official PyTorch code.


@pytest.mark.parametrize("checkpoint", ["tiny_mvar.pth", "tiny_mvar_release_layout.pth"])
def test_mvar_teacher_forcing_matches_official(fixture_dir, tiny_io, checkpoint):
    config, params = transformer_weights.load_transformer(
        fixture_dir / checkpoint, neighborhood_impl="reference"
    )
    assert (config.family, config.depth, config.embed_dim, config.num_heads) == ("mvar", 2, 64, 4)
    forward = _forward(config)
    for name, (first, last) in SEGMENTS.items():
        x = _inputs_for(config, tiny_io["x_BLCv_wo_first_l"], first, last)
        logits = forward(params, tiny_io["label"], x, first_scale=first, last_scale=last)
        assert logits.dtype == jnp.float32
        err = rel_err(logits, tiny_io[name])
        assert err < 1e-5, (name, err)  # measured ~2.4e-7


@pytest.mark.skipif(
    importlib.util.find_spec("mvar_jax.kernels.spatial_markov") is None,
    reason="kernels/spatial_markov.py not written yet",
)
def test_mvar_spatial_markov_through_pallas_kernel_matches_official(tiny_mvar, tiny_io):
    # The 13x13 scale: not a power of two, and most windows touch a border.
    config = dataclasses.replace(tiny_mvar[0], neighborhood_impl="pallas_interpret")
    x = _inputs_for(config, tiny_io["x_BLCv_wo_first_l"], 8, 9)
    logits = _forward(config)(tiny_mvar[1], tiny_io["label"], x, first_scale=8, last_scale=9)
    err = rel_err(logits, tiny_io["mvar_logits_seg1"])
    assert err < 1e-5, err  # measured ~2.5e-7


def test_var_teacher_forcing_matches_official(tiny_var, tiny_io):
    config, params = tiny_var
    logits = _forward(config)(
        params, tiny_io["label"], tiny_io["x_BLCv_wo_first_l"], first_scale=0, last_scale=config.num_scales
    )
    err = rel_err(logits, tiny_io["var_logits"])
    assert err < 1e-5, err  # measured ~2.3e-7


# ----------------------------------------------------------------------------
# Attention structure on a small random model.

SMALL = tiny_transformer(patch_nums=(1, 2, 3, 4, 5), neighborhood_impl="reference")


def _random_params(config, seed=0):
    """Every parameter random and O(1), so that every path visibly moves the logits
    (the official init zeroes the residual gates); M-VAR's Mamba decays slowly, so
    that its memory spans the whole small pyramid."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "A_log":  # A = -0.01
            return np.full(leaf.shape, np.log(0.01), np.float32)
        return 0.3 * rng.standard_normal(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


@functools.cache
def _small_forward(family):
    config = dataclasses.replace(SMALL, family=family)
    forward = _forward(config)
    return (
        config,
        _random_params(config),
        functools.partial(forward, first_scale=0, last_scale=config.num_scales),
    )


def _per_scale_logits(config, params, label_B, x_BLCv_wo_first_l):
    """The inference API driven with teacher-forcing inputs, one scale at a time."""
    stacked = blocks_are_stacked(params)
    model = Transformer(config, scan_blocks=stacked)
    step = jax.jit(functools.partial(model.apply, method=Transformer.scale_logits), static_argnames="si")
    embed = jax.jit(functools.partial(model.apply, method=Transformer.scale_input), static_argnames="si")
    x, cond = model.apply(params, label_B, method=Transformer.start_input)
    cache = families.of(config).init_state(config, label_B.shape[0])
    cache = stack_cache(cache) if stacked else cache
    out = []
    for si in range(config.num_scales):
        if si:
            x = embed(params, _inputs_for(config, x_BLCv_wo_first_l, si, si + 1), si=si)
        logits, cache = step(params, x, cond, si=si, cache=cache)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("family", ["mvar", "var"])
def test_per_scale_inference_reproduces_teacher_forcing(family):
    """MVAR: each scale alone; VAR: the KV cache stands in for the earlier scales.
    (Teacher forcing itself is pinned to the official logits above.)"""
    config, params, forward = _small_forward(family)
    x = np.random.default_rng(0).standard_normal((2, config.seq_len - 1, config.cvae)).astype(np.float32)
    label = jnp.array([2, 0])
    assert (families.of(config).init_state(config, 2) is None) == (family == "mvar")
    err = rel_err(_per_scale_logits(config, params, label, x), forward(params, label, x))
    assert err < 1e-6, err


@pytest.mark.parametrize("family", families.NAMES)
def test_stacked_blocks_scan_to_the_same_logits(family):
    """stack_blocks + scan_blocks (the sampler's form) against the per-block model:
    teacher forcing and per-scale inference (VAR's cache carried and written in
    place, M-VAR's Mamba states scanned through)."""
    config, params, forward = _small_forward(family)
    stacked = stack_blocks(params, config.depth)
    assert blocks_are_stacked(stacked) and not blocks_are_stacked(params)
    assert jax.tree.map(np.array_equal, unstack_blocks(stacked), params) == jax.tree.map(
        lambda _: True, params
    )
    assert jax.tree.leaves(stacked["params"]["blocks"])[0].shape[0] == config.depth
    x = np.random.default_rng(1).standard_normal((2, config.seq_len - 1, config.cvae)).astype(np.float32)
    label = jnp.array([4, 1])
    want = forward(params, label, x)
    scanned = Transformer(config, scan_blocks=True).apply(
        stacked, label, x, first_scale=0, last_scale=config.num_scales
    )
    assert rel_err(scanned, want) < 1e-6
    assert rel_err(_per_scale_logits(config, stacked, label, x), want) < 1e-6
    if family == "var":
        cache = stack_cache(families.of(config).init_state(config, 2))
        assert [c.shape for c in cache] == [(config.depth, 2, config.seq_len, 4, 16)] * 2


def test_stacked_blocks_are_for_inference_and_need_every_block():
    config, params, _ = _small_forward("mvar")
    model = Transformer(config, scan_blocks=True)
    stacked = stack_blocks(params, config.depth)
    x = jnp.zeros((1, config.seq_len - 1, config.cvae))
    with pytest.raises(ValueError, match="scanned blocks are for inference"):
        model.apply(
            stacked,
            jnp.zeros((1,), jnp.int32),
            x,
            first_scale=0,
            last_scale=config.num_scales,
            train=True,
            rngs={"dropout": jax.random.PRNGKey(0)},
        )
    with pytest.raises(ValueError, match=r"\['blocks_2'\] not found"):
        stack_blocks(params, config.depth + 1)
    # A scanned model initialises stacked blocks of the per-block shapes.
    fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), None, first_scale=0, last_scale=1)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)


@hypothesis.settings(max_examples=8, deadline=None, database=None)
@hypothesis.given(family=st.sampled_from(families.NAMES), scale=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_perturbing_one_scale_reaches_only_the_scales_that_attend_to_it(family, scale, seed):
    config, params, forward = _small_forward(family)
    rng = np.random.default_rng(seed)
    label = jnp.array([1, 3])
    x = rng.standard_normal((2, config.seq_len - 1, config.cvae)).astype(np.float32)
    begin, end = config.token_range(scale, scale + 1)
    x_new = x.copy()
    x_new[:, begin - 1 : end - 1] += rng.standard_normal((2, end - begin, config.cvae))
    change = np.abs(np.asarray(forward(params, label, x_new) - forward(params, label, x)))
    for si in range(config.num_scales):
        b, e = config.token_range(si, si + 1)
        reached = si == scale if family == "mvar" else si >= scale
        per_token = change[:, b:e].max(axis=-1)
        if reached:
            assert per_token.max() > 1e-2, (si, per_token.max())
        else:
            assert per_token.max() < 1e-6, (si, per_token.max())


def test_mvar_full_range_equals_its_training_segments():
    # Segment boundaries are only a schedule: MVAR's attention never crosses a scale.
    config, params, forward = _small_forward("mvar")
    x = np.random.default_rng(0).standard_normal((2, config.seq_len - 1, config.cvae))
    label = jnp.array([0, 4])
    full = forward(params, label, x.astype(np.float32))
    apply = _forward(config)
    parts = [
        apply(params, label, _inputs_for(config, x, a, b).astype(np.float32), first_scale=a, last_scale=b)
        for a, b in [(0, 3), (3, 4), (4, 5)]
    ]
    assert rel_err(jnp.concatenate(parts, axis=1), full) < 1e-6


# ----------------------------------------------------------------------------
# Training-time stochasticity, dtype, errors.


def test_class_dropout_replaces_labels_by_the_null_class():
    config = dataclasses.replace(SMALL, cond_drop_rate=0.999)
    params = _random_params(config)
    x = jnp.ones((2, config.seq_len - 1, config.cvae))
    span = dict(first_scale=0, last_scale=config.num_scales)
    dropped = _forward(config, train=True)(
        params, jnp.array([1, 2]), x, rngs={"dropout": jax.random.PRNGKey(0)}, **span
    )
    null = _forward(config)(params, jnp.full((2,), config.num_classes), x, **span)
    kept = _forward(config)(params, jnp.array([1, 2]), x, **span)
    assert rel_err(dropped, null) < 1e-6
    assert rel_err(kept, null) > 1e-2


def test_drop_path_is_stochastic_in_training_only():
    config = dataclasses.replace(SMALL, drop_path_rate=0.5, cond_drop_rate=0.0)
    params = _random_params(config)
    x = jnp.ones((8, config.seq_len - 1, config.cvae))
    label = jnp.arange(8) % config.num_classes
    span = dict(first_scale=0, last_scale=config.num_scales)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    evaluated = _forward(config)(params, label, x, **span)
    trained = _forward(config, train=True)(params, label, x, rngs=rngs, **span)
    # Block 1 (rate 0.5) is dropped for some samples and kept, scaled by 2, for the
    # others: every sample differs from evaluation, which stays deterministic.
    change = np.abs(np.asarray(trained - evaluated)).max(axis=(1, 2))
    assert change.min() > 1e-4
    assert rel_err(_forward(config)(params, label, x, **span), evaluated) == 0


def test_bfloat16_compute_stays_close_to_float32():
    config, params, forward = _small_forward("mvar")
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((2, config.seq_len - 1, config.cvae)), jnp.float32
    )
    label = jnp.array([0, 1])
    bf16 = _forward(dataclasses.replace(config, dtype="bfloat16"))(
        params, label, x, first_scale=0, last_scale=config.num_scales
    )
    assert bf16.dtype == jnp.float32
    err = rel_err(bf16, forward(params, label, x))
    assert 0 < err < 3e-2, err


def test_init_params_follows_official_recipe():
    params = init_params(SMALL, jax.random.PRNGKey(0))["params"]
    std = (1 / (3 * SMALL.embed_dim)) ** 0.5
    ada = np.asarray(params["blocks_0"]["ada_lin"]["kernel"])
    C = SMALL.embed_dim
    assert np.abs(ada[:, : 2 * C]).max() < 1e-4  # gates start closed
    assert 0.2 * std < ada[:, 2 * C :].std() < 0.8 * std
    assert np.all(np.asarray(params["blocks_0"]["attn"]["scale_mul"]) == np.float32(np.log(4)))
    assert not np.any(np.asarray(params["head"]["bias"]))


def test_config_defaults_roundtrip_and_validation():
    d20 = TransformerConfig(depth=20)
    assert (d20.embed_dim, d20.num_heads, d20.head_dim, d20.seq_len) == (1280, 20, 64, 680)
    assert TransformerConfig.from_dict(d20.to_dict()) == d20
    assert TransformerConfig(depth=2, embed_dim=64, num_heads=4).head_dim == 16
    bad = [
        dict(depth=2, embed_dim=64, num_heads=5),
        dict(family="full model"),
        dict(kernel_size=4),
        dict(refine_step=0),
        dict(dtype="fp8"),
        dict(neighborhood_impl="natten"),
        dict(neighborhood_tiling=(64, 64)),
        dict(cond_drop_rate=1.0),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="TransformerConfig"):
            TransformerConfig(**kwargs)
    # What only a family checks, when a model is built from the config.
    for kwargs, message in [
        (dict(kernel_size=15), r"TransformerConfig \(MVAR\): kernel_size 15 exceeds"),
        (dict(refine_step=11), r"refine_step must be in \[1, 10\]"),
        (dict(family="m_var", shared_aln=True), r"\(M-VAR\): M-VAR has no shared AdaLN"),
        (dict(family="gpt"), "unknown model family 'gpt'; expected one of mvar, var, m_var"),
    ]:
        config = TransformerConfig(**kwargs)
        with pytest.raises(ValueError, match=message):
            families.of(config)
        with pytest.raises(ValueError, match=message):
            param_shapes(config)
    assert families.of(TransformerConfig(family="var", refine_step=11)).name == "var"  # MVAR's field
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict({"depth": 16, "heads": 16})
    with pytest.raises(ValueError, match=r"patch_nums must hold >= 2 positive scales"):
        TransformerConfig(patch_nums=(1,), refine_step=1)
    assert TransformerConfig(patch_nums=(1, 2), refine_step=1, kernel_size=1).num_scales == 2


def test_refine_step_rule_of_the_model_and_of_training():
    check_refine_step(1, 4)  # only the start token's scale attends within itself
    check_refine_step(4, 4)
    with pytest.raises(ValueError, match=r"refine_step must be in \[2, 4\] for 4 scales, got 1"):
        check_refine_step(1, 4, training=True)
    with pytest.raises(ValueError, match=r"refine_step must be in \[1, 4\] for 4 scales, got 5"):
        check_refine_step(5, 4)


def test_invalid_ranges_and_inputs_raise():
    config, params, _ = _small_forward("var")
    model = Transformer(config)
    label = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="must start at scale 0"):
        model.apply(params, label, jnp.zeros((2, 9, 8)), first_scale=2, last_scale=3)
    with pytest.raises(ValueError, match=r"must have shape \(2, 4, 8\)"):
        model.apply(params, label, jnp.zeros((2, 5, 8)), first_scale=0, last_scale=2)
    with pytest.raises(ValueError, match="last_scale"):
        model.apply(params, label, jnp.zeros((2, 4, 8)), first_scale=0, last_scale=9)
    x = jnp.zeros((2, 1, config.embed_dim))
    cond = jnp.zeros((2, config.embed_dim))
    with pytest.raises(ValueError, match="VAR inference needs the state of Family.init_state"):
        model.apply(params, x, cond, 0, None, method=Transformer.scale_logits)
    with pytest.raises(ValueError, match="x_BlC for scale 1"):
        model.apply(
            params, x, cond, 1, families.of(config).init_state(config, 2), method=Transformer.scale_logits
        )
    with pytest.raises(ValueError, match="scale 0 comes from start_input"):
        model.apply(params, jnp.zeros((2, 1, 8)), 0, method=Transformer.scale_input)
    mvar, mvar_params, _ = _small_forward("mvar")
    with pytest.raises(ValueError, match="MVAR inference carries no state"):
        Transformer(mvar).apply(mvar_params, x, cond, 0, ((x, x),) * 2, method=Transformer.scale_logits)
