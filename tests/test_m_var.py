"""M-VAR: parity with the official code (tests/fixtures/m_var), and inference that carries
each Mamba layer's state from scale to scale against the official re-run."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import M_VAR_VARIANTS, rel_err, tiny_transformer, trace_generate

from mvar_jax import checkpoint, sampling
from mvar_jax.models import families, m_var
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.mamba2 import Mamba2
from mvar_jax.models.transformer import (
    Transformer,
    blocks_are_stacked,
    init_params,
    param_shapes,
    stack_cache,
)
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig

CFG = 1.5  # The fixtures' guidance (greedy, top_k 1).


@pytest.fixture(scope="module")
def models(m_var_checkpoints) -> dict[str, checkpoint.ModelBundle]:
    return {variant: checkpoint.load_model(path) for variant, path in m_var_checkpoints.items()}


@functools.partial(jax.jit, static_argnames="config")
def _teacher_forcing(config: TransformerConfig, params, label_B, x_BLCv):
    """Teacher forcing, with the blocks as the params hold them (stacked: scanned)."""
    model = Transformer(config, scan_blocks=blocks_are_stacked(params))
    return model.apply(params, label_B, x_BLCv, first_scale=0, last_scale=config.num_scales)


@pytest.mark.parametrize("variant", M_VAR_VARIANTS)
def test_teacher_forcing_matches_official(models, m_var_io, variant):
    model, io = models[variant], m_var_io[variant]
    config = model.transformer_config
    assert (config.family, config.attn_l2_norm, config.depth, config.num_heads) == (
        "m_var",
        variant == "l21",
        2,
        4,
    )
    logits = _teacher_forcing(config, model.transformer_params, io["label"], io["x_BLCv_wo_first_l"])
    err = rel_err(logits, io["tf_logits"])
    assert err < 1e-5, err  # measured 3.4e-7


@functools.partial(jax.jit, static_argnames="config")
def _var_input(config: VQVAEConfig, vqvae_params, ids_BL):
    """The teacher-forcing input of the tokens ``ids_BL`` (B, L)."""
    sizes = np.cumsum([pn * pn for pn in config.patch_nums])[:-1]
    return VQVAE(config).apply(vqvae_params, jnp.split(ids_BL, sizes, axis=1), method=VQVAE.idx_to_var_input)


@functools.partial(jax.jit, static_argnames=("config", "rerun"))
def _inference_logits(config: TransformerConfig, params, label_B, x_BLCv, *, rerun: bool):
    """Pre-guidance logits ``(2B, L, V)``, rows [cond; uncond], of the per-scale inference
    API fed the tokens behind ``x_BLCv`` (the sampler's loop with the tokens fixed)."""
    stacked = blocks_are_stacked(params)
    model = Transformer(config, scan_blocks=stacked)
    label_2B = jnp.concatenate([label_B, jnp.full_like(label_B, config.num_classes)])
    x_BlC, cond_BD = model.apply(params, label_2B, method=Transformer.start_input)
    cache = (m_var.init_rerun_cache if rerun else m_var.init_mamba_states)(config, label_2B.shape[0])
    cache = stack_cache(cache) if stacked else cache
    out = []
    for si in range(config.num_scales):
        if si:
            begin, end = config.token_range(si, si + 1)
            x_BlC = model.apply(params, x_BLCv[:, begin - 1 : end - 1], si, method=Transformer.scale_input)
            x_BlC = jnp.concatenate([x_BlC, x_BlC])
        logits, cache = model.apply(params, x_BlC, cond_BD, si, cache, method=Transformer.scale_logits)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def _greedy_tokens(logits_2BLV: np.ndarray, config: TransformerConfig) -> np.ndarray:
    """argmax of the guided logits, token by token."""
    weights_LW = np.repeat(
        sampling.guidance_schedule(CFG, config), [pn * pn for pn in config.patch_nums], axis=0
    )
    cond, uncond = np.split(np.asarray(logits_2BLV), 2)
    return np.argmax(weights_LW[:, :1] * cond - weights_LW[:, 1:] * uncond, axis=-1)


@pytest.mark.parametrize("variant", M_VAR_VARIANTS)
def test_inference_carrying_mamba_state_matches_the_official_rerun(models, m_var_io, variant):
    """The fixture's inference logits come from the official sampler, which re-runs Mamba
    over all earlier scales; ours carry its state."""
    model, io = models[variant], m_var_io[variant]
    config = model.transformer_config
    logits = _inference_logits(
        config,
        model.transformer_params,
        io["label"],
        _var_input(model.vqvae_config, model.vqvae_params, io["greedy_BL"]),
        rerun=False,
    )
    err = rel_err(logits, io["infer_logits_pre_cfg"])
    assert err < 1e-5, err  # measured 2.7e-7 (both)
    # From the official history we pick the official greedy tokens at every scale
    # (smallest guided top-2 gap 5.3e-4), so the sampling loop produces exactly them.
    np.testing.assert_array_equal(_greedy_tokens(logits, config), io["greedy_BL"])


def _slow_decay_model(**overrides):
    """A random M-VAR whose Mamba decays slowly (A = -0.01): every scale's logits depend
    on all earlier ones, unlike the fixture's freshly initialised layers. Returns the
    arguments of ``_inference_logits``; ``overrides``: config fields."""
    config = tiny_transformer(family="m_var", depth=1, patch_nums=(1, 2, 3, 4, 5), **overrides)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            np.full(leaf.shape, np.log(0.01), np.float32)
            if path[-1].key == "A_log"
            else rng.normal(0, 0.3, leaf.shape).astype(np.float32)
        ),
        param_shapes(config),
    )
    return (
        config,
        params,
        jnp.array([1, 4]),
        rng.normal(size=(2, config.seq_len - 1, config.cvae)).astype(np.float32),
    )


def test_carried_state_equals_our_rerun_where_history_matters():
    """Our copy of the official algorithm (``init_rerun_cache``) against the carried state."""
    args = _slow_decay_model()
    config = args[0]
    carried = _inference_logits(*args, rerun=False)
    rerun = _inference_logits(*args, rerun=True)
    err = rel_err(carried, rerun)
    assert err < 1e-5, err  # measured 2.2e-7
    np.testing.assert_array_equal(_greedy_tokens(carried, config), _greedy_tokens(rerun, config))
    # The history matters: new inputs for scales 1-3 move the last scale's logits.
    changed = args[3].copy()
    changed[:, : config.token_range(0, 4)[1] - 1] += 1.0
    last = slice(*config.token_range(4, 5))
    moved = _inference_logits(*args[:3], changed, rerun=False)
    assert rel_err(moved[:, last], carried[:, last]) > 1e-2  # measured 0.10


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_inference_logits_do_not_depend_on_the_inference_chunk_size(chunk_size):
    """Chunks of 1 and 4 tokens (scales of up to 25 tokens: many chunks, the last one
    partial) against one chunk per scale, on the carried state."""
    one_chunk = _slow_decay_model(mamba_inference_chunk_size=256)
    chunked = _slow_decay_model(mamba_inference_chunk_size=chunk_size)
    expected = _inference_logits(*one_chunk, rerun=False)
    got = _inference_logits(*chunked, rerun=False)
    err = rel_err(got, expected)
    assert err < 1e-5, err  # measured 2.2e-7 (1), 2.0e-7 (4)
    config = chunked[0]
    np.testing.assert_array_equal(_greedy_tokens(got, config), _greedy_tokens(expected, config))


def test_greedy_sampling_matches_official(models, m_var_io):
    # The sampler's loop is shared by both variants, and l21's greedy tokens follow
    # from its logits above: one variant end to end keeps this to one compilation.
    io = m_var_io["l20"]
    out = sampling.sample(
        models["l20"], io["label"], jax.random.PRNGKey(0), sampling.SamplingOptions(cfg=CFG, top_k=1)
    )
    np.testing.assert_array_equal(out.tokens, io["greedy_BL"])
    np.testing.assert_allclose(
        out.images, io["greedy_img"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0
    )  # measured 9.4e-6


def _mamba_calls(model: checkpoint.ModelBundle, rerun: bool):
    """Traces generate (no compile): (tokens in, SSM state shape, scan chunk) of every
    Mamba2 call."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Mamba2) and context.method_name == "__call__":
            state = args[1] if len(args) > 1 else None
            ssm_shape = None if state is None else state.ssm_BHPN.shape
            calls.append((args[0].shape[1], ssm_shape, context.module.config.chunk_size))
        return next_fun(*args, **kwargs)

    trace_generate(model, record, jnp.array([1, 2, 3]), m_var.init_rerun_cache if rerun else None)
    return calls


def test_sampler_runs_each_scale_once_on_a_fixed_size_state(models):
    model = models["l21"]
    config = model.transformer_config
    sizes = [pn * pn for pn in config.patch_nums]
    mamba = m_var.mamba_config(config)
    state_shape = (6, mamba.nheads, mamba.headdim, mamba.d_state)
    # Ours: each block's Mamba sees this scale's tokens and the state from the last one,
    # in inference's chunks (the loaded blocks are stacked: one traced call per scale,
    # which the scan runs for every block).
    assert config.mamba_inference_chunk_size == 16
    assert _mamba_calls(model, rerun=False) == [(n, state_shape, 16) for n in sizes]
    # The official algorithm: all tokens so far, from scratch, at every scale, in
    # mamba_ssm's chunks.
    assert _mamba_calls(model, rerun=True) == [
        (sum(sizes[: si + 1]), None, 256) for si in range(config.num_scales)
    ]


def _random_params(abstract, seed: int, std: float):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32), abstract)


def test_m_var_settings_and_errors():
    config = TransformerConfig(
        depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 3), family="m_var"
    )  # refine_step 8 > 3 scales: unused
    mamba = m_var.mamba_config(config)
    assert (mamba.d_state, mamba.d_conv, mamba.expand, mamba.headdim, mamba.nheads) == (64, 4, 2, 64, 2)
    assert sampling.guidance_schedule(1.0, config) is not None  # Guides at cfg 1, as VAR.
    with pytest.raises(ValueError, match="M-VAR has no shared AdaLN"):
        families.of(TransformerConfig(depth=2, embed_dim=64, shared_aln=True, family="m_var"))
    with pytest.raises(ValueError, match="mamba_inference_chunk_size must be a positive int, got 0"):
        TransformerConfig(depth=2, embed_dim=64, family="m_var", mamba_inference_chunk_size=0)
    with pytest.raises(ValueError, match="Mamba2 layer: .* not a multiple of headdim 64"):
        families.of(TransformerConfig(depth=2, embed_dim=48, num_heads=4, family="m_var"))
    params = _random_params(param_shapes(config), 0, 0.1)
    model = Transformer(config)
    with pytest.raises(ValueError, match="must start at scale 0"):
        model.apply(params, jnp.zeros(1, jnp.int32), jnp.zeros((1, 4, 8)), first_scale=1, last_scale=2)
    x, cond = model.apply(params, jnp.zeros(1, jnp.int32), method=Transformer.start_input)
    with pytest.raises(ValueError, match="M-VAR inference needs the state of Family.init_state"):
        model.apply(params, x, cond, 0, None, method=Transformer.scale_logits)


def test_init_params_follow_the_official_recipe():
    # models/mvar.py init_weights over mamba_ssm's own init: Linear weights normal(init_std)
    # (in_proj, out_proj: no 1/sqrt(2 depth)), Conv1d normal(0.02) with zero bias; ada_lin's
    # first 2C of 9C columns (gamma1, gamma2) times alng; A in [1, 16], dt in [1e-3, 0.1],
    # D and the norm weight ones.
    config = TransformerConfig(depth=1, embed_dim=64, num_heads=2, patch_nums=(1, 2), family="m_var")
    params = init_params(config, jax.random.PRNGKey(0))["params"]["blocks_0"]
    std, C = (1 / (3 * 64)) ** 0.5, 64
    mamba = jax.tree.map(np.asarray, params["mamba"])
    for name in ("in_proj", "out_proj"):
        assert 0.9 * std < mamba[name]["kernel"].std() < 1.1 * std
        assert "bias" not in mamba[name]
    assert 0.018 < mamba["conv1d"]["kernel"].std() < 0.022
    assert not mamba["conv1d"]["bias"].any()
    A, dt = np.exp(mamba["A_log"]), np.log1p(np.exp(mamba["dt_bias"]))
    assert A.shape == dt.shape == (2,) and np.all((1 <= A) & (A <= 16))
    assert np.all((1e-3 * 0.999 <= dt) & (dt <= 0.1 * 1.001))
    assert np.all(mamba["D"] == 1) and np.all(mamba["norm"]["scale"] == 1)
    ada = np.asarray(params["ada_lin"]["kernel"])
    assert ada.shape == (C, 9 * C)
    assert np.abs(ada[:, : 2 * C]).max() < 1e-4  # gamma1, gamma2 start closed
    assert 0.4 * std < ada[:, 2 * C :].std() < 0.6 * std  # gamma3 and the modulations: x 0.5
