"""Sampling: logit filtering against numpy, and generation against the official fixtures."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MINI_VQVAE, mini_transformer, rel_err, trace_generate

from mvar_jax import checkpoint, sampling
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.layers import SelfAttention
from mvar_jax.models.transformer import Transformer, blocks_are_stacked, param_shapes, stack_blocks
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.sampling import SamplingOptions


def _official_filter_numpy(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The official helper's rule, written directly: mask, sort, cumulate, scatter back."""
    out = logits.astype(np.float32).copy()
    if top_k > 0:
        kth_largest = -np.sort(-out, axis=-1)[..., top_k - 1 : top_k]
        out[out < kth_largest] = -np.inf
    if top_p > 0:
        order = np.argsort(out, axis=-1, kind="stable")
        ascending = np.take_along_axis(out, order, axis=-1)
        e = np.exp(ascending - ascending[..., -1:])
        mass = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1, dtype=np.float32)
        drop_sorted = mass <= np.float32(1 - top_p)
        drop_sorted[..., -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        out[drop] = -np.inf
    return out


@pytest.mark.parametrize(
    "top_k,top_p",
    [(0, 0.0), (1, 0.0), (5, 0.0), (64, 0.0), (0, 0.5), (0, 0.96), (0, 1e-6), (10, 0.8), (7, 0.3)],
)
def test_filter_logits_matches_official_rule(top_k, top_p):
    logits = (
        np.random.default_rng(top_k * 1000 + int(top_p * 100)).normal(size=(3, 17, 64)).astype(np.float32) * 3
    )
    got = np.asarray(sampling.filter_logits(logits, top_k, top_p))
    want = _official_filter_numpy(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(want)])


def test_tokens_from_uniform_is_the_inverse_cdf():
    probs = np.array([0.0, 0.1, 0.2, 0.0, 0.7])  # Zero-probability entries: filtered out.
    n = 1000
    u = (np.arange(n) + 0.5) / n  # Evenly spread quantiles: counts follow the probabilities.
    with np.errstate(divide="ignore"):
        logits = np.broadcast_to(np.log(probs), (n, 5))[None]
    drawn = np.asarray(sampling.tokens_from_uniform(jnp.asarray(logits), jnp.asarray(u)[None]))
    np.testing.assert_array_equal(np.bincount(drawn[0], minlength=5), [0, 100, 200, 0, 700])
    # The ends of (0, 1] land on the first and last entries that carry mass.
    ends = sampling.tokens_from_uniform(jnp.asarray(logits[:, :2]), jnp.array([[1e-9, 1.0]]))
    np.testing.assert_array_equal(ends, [[1, 4]])


def test_chunks_split_the_batch_evenly_and_keep_every_row():
    assert sampling.images_per_chunk(64, 2 * 256, 8192) == 16
    assert sampling.images_per_chunk(64, 2 * 169, 8192) == 16  # 24 fit; 16 divides 64
    assert sampling.images_per_chunk(67, 2 * 256, 8192) == 16  # prime: 4 x 16 + 3
    assert sampling.images_per_chunk(2, 2 * 256, 8192) == 2
    x = np.arange(21, dtype=np.float32).reshape(7, 3)

    def fn(a, b):
        return a * 2, b.sum(-1)

    for chunk in (1, 3, 7, 9):
        for got, want in zip(sampling.map_chunks(fn, chunk, x, x), fn(x, x)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("top_k,top_p", [(5, 0.5), (12, 0.9), (3, 0.99), (1, 0.5), (30, 0.3)])
def test_joint_top_k_top_p_equals_the_two_filters_in_turn(top_k, top_p):
    """filter_logits finds the nucleus among the k largest alone; with integer logits,
    which tie often (at the k-th largest and at the nucleus threshold too), it must
    still equal top-k then top-p over the whole vocabulary."""
    logits = np.random.default_rng(top_k).integers(-4, 4, size=(4, 9, 32)).astype(np.float32)
    want = sampling.top_p_filter(sampling.top_k_filter(logits, top_k), top_p)
    np.testing.assert_array_equal(sampling.filter_logits(logits, top_k, top_p), want)


def test_filters_keep_the_largest_and_drop_something():
    logits = np.random.default_rng(1).normal(size=(4, 9, 64)).astype(np.float32)
    kept_k = np.isfinite(np.asarray(sampling.filter_logits(logits, 3, 0.0)))
    np.testing.assert_array_equal(kept_k.sum(-1), 3)
    kept_p = np.isfinite(np.asarray(sampling.filter_logits(logits, 0, 1e-6)))
    np.testing.assert_array_equal(kept_p.sum(-1), 1)
    np.testing.assert_array_equal(np.argmax(np.where(kept_p, logits, -np.inf), -1), np.argmax(logits, -1))


def test_options_are_checked_under_their_field_names():
    assert SamplingOptions() == SamplingOptions(cfg=4.0)  # cfg is an input, not a compilation's shape
    assert (SamplingOptions().top_k, SamplingOptions().top_p) == (900, 0.96)
    SamplingOptions(cfg=0.0, top_k=0, top_p=1.0)
    for fields, message in [
        (dict(top_k=-1), r"^top_k=-1 must be an int >= 0"),
        (dict(top_p=1.5), r"^top_p=1.5 must be in \[0, 1\]"),
        (dict(cfg=-1.0), r"^cfg=-1.0 must be a finite number >= 0"),
        (dict(cfg=float("nan")), r"^cfg=nan"),
        (dict(chunk_tokens=0), r"^chunk_tokens=0 must be an int >= 1"),
        (dict(decode_batch_size=0), r"^decode_batch_size=0 must be an int >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingOptions(**fields)


# ----------------------------------------------------------------------------
# Generation.


def test_guidance_schedule_ramps_and_mvar_skips_cfg_one():
    mvar = TransformerConfig(depth=2, embed_dim=64, num_heads=4)
    np.testing.assert_allclose(
        sampling.guidance_schedule(1.5, mvar), [[1 + 1.5 * s / 9, 1.5 * s / 9] for s in range(10)], rtol=1e-7
    )
    assert sampling.guidance_schedule(1.0, mvar) is None
    # The official VAR sampler always guides, so cfg=1 still ramps t = si / 9.
    var = dataclasses.replace(mvar, family="var")
    np.testing.assert_allclose(sampling.guidance_schedule(1.0, var)[:, 1], np.arange(10) / 9, rtol=1e-7)


def _nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoints):
    return {name: checkpoint.load_model(path) for name, path in tiny_checkpoints.items()}


@pytest.mark.parametrize(
    "name,cfg,fhat_ref,img_ref",
    [
        ("mvar", 1.5, "mvar_greedy_fhat", "mvar_greedy_img"),
        ("mvar", 1.0, "mvar_greedy_fhat_nocfg", None),
        ("var", 1.5, None, "var_greedy_img"),
    ],
)
def test_greedy_sampling_matches_official(tiny_models, tiny_io, name, cfg, fhat_ref, img_ref):
    out = sampling.sample(
        tiny_models[name],
        tiny_io["label"],
        jax.random.PRNGKey(0),
        SamplingOptions(cfg=cfg, top_k=1, top_p=0.0, decode=img_ref is not None),
    )
    assert out.tokens.shape == (2, 680) and out.tokens.dtype == jnp.int32
    if fhat_ref is not None:  # Equal f_hat means the same token chosen at every position.
        assert rel_err(out.f_hat, _nchw_to_nhwc(tiny_io[fhat_ref])) < 1e-5
    if img_ref is not None:
        assert out.images.shape == (2, 256, 256, 3) and out.images.dtype == jnp.float32
        np.testing.assert_allclose(out.images, _nchw_to_nhwc(tiny_io[img_ref]), atol=1e-4, rtol=0)


def _record_transformer_inputs(model, label_B):
    """Traces generate (no compile) and records what each transformer call receives."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Transformer) and context.method_name == "scale_logits":
            x_BlC, _, si, cache = args
            calls.append(("scale_logits", si, x_BlC.shape, cache))
        elif isinstance(context.module, SelfAttention):
            calls.append(("attention", args[0].shape))
        elif isinstance(context.module, Transformer) and context.method_name == "__call__":
            calls.append(("teacher_forcing",))
        return next_fun(*args, **kwargs)

    trace_generate(model, record, label_B)
    return calls


def test_mvar_runs_one_scale_at_a_time_without_cache(tiny_models):
    model = tiny_models["mvar"]
    config = model.transformer_config
    calls = _record_transformer_inputs(model, jnp.array([1, 2, 3]))
    steps = [c for c in calls if c[0] == "scale_logits"]
    assert [c[1] for c in steps] == list(range(config.num_scales))
    for (_, _, shape, cache), pn in zip(steps, config.patch_nums):
        assert shape == (6, pn * pn, config.embed_dim)  # Conditional + unconditional halves.
        assert cache is None
    # Every block's attention (traced once per scale: the loaded blocks are stacked and
    # scanned) sees exactly the current scale's tokens, nothing earlier.
    attn_lengths = [c[1][1] for c in calls if c[0] == "attention"]
    assert attn_lengths == [pn * pn for pn in config.patch_nums]
    assert ("teacher_forcing",) not in calls


def test_var_contrast_uses_a_full_length_cache(tiny_models):
    model = tiny_models["var"]
    config = model.transformer_config
    steps = [c for c in _record_transformer_inputs(model, jnp.array([1])) if c[0] == "scale_logits"]
    assert len(steps) == config.num_scales
    for _, _, _, cache in steps:  # (k, v), every block's stacked
        assert [c.shape for c in cache] == [
            (config.depth, 2, config.seq_len, config.num_heads, config.head_dim)
        ] * 2


def _random_params(abstract, seed: int, std: float):
    """Normal values of the given shapes: every weight matters, nothing to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32), abstract)


# A small random model (3 scales, 8 px) for what needs no parity: it compiles fast.
@pytest.fixture(scope="module")
def mini_model() -> checkpoint.ModelBundle:
    patch_nums = (1, 2, 4)
    vqvae_config = VQVAEConfig(**{**MINI_VQVAE, "ch_mult": (1, 2)}, patch_nums=patch_nums)
    transformer_config = mini_transformer(
        num_classes=5, depth=1, embed_dim=32, num_heads=2, patch_nums=patch_nums, refine_step=2
    )
    return checkpoint.ModelBundle(
        vqvae_config,
        _random_params(abstract_variables(vqvae_config), 1, 0.2),
        transformer_config,
        _random_params(param_shapes(transformer_config), 2, 0.3),
    )


# Shared by the tests below, so that they share one compilation.
_LABELS, _OPTIONS = [0, 4, 2, 2], SamplingOptions(cfg=2.0, top_k=3, top_p=0.9)


def test_same_seed_same_images_other_seed_differs(mini_model):
    def draw(seed):
        return sampling.sample(mini_model, _LABELS, jax.random.PRNGKey(seed), _OPTIONS)

    first, again, other = draw(0), draw(0), draw(1)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other.tokens)
    assert not np.allclose(first.images, other.images)
    assert first.images.shape == (4, 8, 8, 3)
    assert 0.0 <= float(first.images.min()) and float(first.images.max()) <= 1.0


def test_more_smooth_and_bfloat16(mini_model):
    key = jax.random.PRNGKey(0)
    hard = sampling.sample(mini_model, _LABELS, key, _OPTIONS)
    smooth = sampling.sample(mini_model, _LABELS, key, dataclasses.replace(_OPTIONS, more_smooth=True))
    # Scale 0 draws the same ids; later scales see f_hat built from a soft codebook mix.
    first_l = mini_model.transformer_config.first_l
    np.testing.assert_array_equal(hard.tokens[:, :first_l], smooth.tokens[:, :first_l])
    assert not np.allclose(hard.f_hat, smooth.f_hat, atol=1e-3)
    assert np.all(np.isfinite(smooth.images))
    # The soft mix is taken over the filtered logits: with top_k=1 it is one-hot.
    greedy = dataclasses.replace(_OPTIONS, top_k=1, decode=False)
    np.testing.assert_allclose(
        sampling.sample(mini_model, _LABELS, key, dataclasses.replace(greedy, more_smooth=True)).f_hat,
        sampling.sample(mini_model, _LABELS, key, greedy).f_hat,
        atol=1e-6,
    )

    bf16 = mini_model._replace(
        transformer_config=dataclasses.replace(mini_model.transformer_config, dtype="bfloat16")
    )
    out = sampling.sample(bf16, _LABELS, key, dataclasses.replace(_OPTIONS, decode=False))
    assert out.images is None and out.tokens.dtype == jnp.int32
    assert out.tokens.shape == (4, mini_model.transformer_config.seq_len)
    assert out.f_hat.dtype == jnp.float32


def test_stacked_chunked_and_micro_batched_sampling_draw_the_same(mini_model):
    """Stacked blocks, one image per chunk and 3-image decode batches change no token."""
    key = jax.random.PRNGKey(3)
    whole = sampling.sample(mini_model, _LABELS, key, _OPTIONS)
    stacked = mini_model._replace(
        transformer_params=stack_blocks(mini_model.transformer_params, mini_model.transformer_config.depth)
    )
    assert blocks_are_stacked(stacked.transformer_params)
    chunked = sampling.sample(
        stacked, _LABELS, key, dataclasses.replace(_OPTIONS, chunk_tokens=1, decode_batch_size=3)
    )
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.images, whole.images, atol=1e-5, rtol=0)


def test_bad_labels_and_mismatched_configs_raise(mini_model):
    key = jax.random.PRNGKey(0)
    with pytest.raises(
        ValueError, match=r"labels \[6\] are outside the model's 5 classes \[0, 4\] and its null"
    ):
        sampling.sample(mini_model, [1, 5, 6], key)  # 5: the null class, unconditional
    with pytest.raises(ValueError, match=r"labels \[-1\] are outside"):
        sampling.sample(mini_model, [-1], key)
    # A bundle put together in memory is not checked by load_model; the sampler still
    # refuses a transformer that does not speak the VQVAE's tokens.
    wider = mini_model._replace(
        transformer_config=dataclasses.replace(mini_model.transformer_config, vocab_size=32)
    )
    with pytest.raises(ValueError, match="do not fit together"):
        sampling.sample(wider, [1], key)
