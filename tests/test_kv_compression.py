"""VAR's compressed KV cache (models.kv_compression) and HACK's head kinds (sampling.head_kinds).

The cache's attention and its choice of tokens are checked against a plain NumPy replay
of each method (lists of kept token ids, float64 attention); the sampler at ratio 0 against
the plain sampler; the head statistic against analytic attention patterns.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_transformer, tiny_vqvae

from mvar_jax import checkpoint, sampling
from mvar_jax.errors import CheckpointError
from mvar_jax.models import kv_compression as kvc, transformer
from mvar_jax.models.config import PATCH_NUMS_256
from mvar_jax.models.vqvae import abstract_variables
from mvar_jax.sampling import head_kinds

ROWS = 2  # conditional and unconditional
IMAGES = 2
SCALE = 0.7
# Block 0's heads 0 and 2 contextual; every block alike.
CONTEXTUAL = (True, False, True, False)


def _config():
    return tiny_transformer(family="var", dtype="float32")


def _compression(method: str, ratio: float, config) -> kvc.KVCompression:
    contextual = (CONTEXTUAL,) * config.depth if method in kvc.HEAD_AWARE else None
    return kvc.KVCompression(ratio, method, contextual, observers=3)


def _reference_priority(method, kind, probs, acc, cand_ids, n, keep, ends, observers):
    """One (row, head): ``probs`` (n, candidates) float64; the score each candidate is kept by."""
    num = probs.shape[1]
    position = np.arange(num)
    if method == "h2o":
        return np.where(position >= num - keep // 2, np.inf, acc)
    if method == "snapkv":
        window = min(observers, n)
        votes = probs[n - window :].mean(axis=0)
        padded = np.pad(votes, kvc.SNAPKV_POOL // 2, constant_values=-np.inf)
        pooled = np.array([padded[i : i + kvc.SNAPKV_POOL].max() for i in range(num)])
        return pooled + 2.0 * (position >= num - window)
    if kind == kvc.CONTEXTUAL:
        rows = np.unique(np.round(np.linspace(0, n - 1, min(observers, n))).astype(int))
        return probs[rows].mean(axis=0)
    attention = probs.mean(axis=0)
    by_attention = list(np.argsort(-attention[num - n :], kind="stable"))
    newest = np.zeros(num, bool)
    newest[[num - n + i for i in by_attention[: keep // 2]]] = (
        True  # the newest scale's best, half the budget
    )
    return attention + 2.0 * newest + 4.0 * (np.asarray(cand_ids) < ends[1])


def _replay(method, ratio, config, qkv_per_scale):
    """What the cache should give: per scale, the outputs (R, n, heads, d) and the kept ids."""
    compression = _compression(method, ratio, config)
    budgets = kvc.history_budgets(config, compression)
    kinds = compression.head_kinds(config)[0]
    ends = [config.token_range(0, si + 1)[1] for si in range(config.num_scales)]
    R, heads = IMAGES * ROWS, config.num_heads
    kept = [[[] for _ in range(heads)] for _ in range(R)]
    acc = [[{} for _ in range(heads)] for _ in range(R)]
    keys, values = {}, {}  # token id -> (R, heads, d)
    outputs, kept_ids = [], []
    for si, (q, k, v) in enumerate(qkv_per_scale):
        q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
        n = q.shape[1]
        begin = ends[si] - n
        for j in range(n):
            keys[begin + j], values[begin + j] = k[:, j], v[:, j]
        out = np.zeros_like(q)
        priorities = {}
        for r in range(R):
            for h in range(heads):
                cand = kept[r][h] + list(range(begin, begin + n))
                K = np.stack([keys[i][r, h] for i in cand])
                V = np.stack([values[i][r, h] for i in cand])
                logits = q[r, :, h] @ K.T * SCALE
                probs = np.exp(logits - logits.max(axis=1, keepdims=True))
                probs /= probs.sum(axis=1, keepdims=True)
                out[r, :, h] = probs @ V
                for token, mass in zip(cand, probs.sum(axis=0)):
                    acc[r][h][token] = acc[r][h].get(token, 0.0) + mass
                if si + 1 < config.num_scales:
                    keep = budgets[kinds[h]][si + 1]
                    a = np.array([acc[r][h][i] for i in cand])
                    priorities[r, h] = (
                        cand,
                        keep,
                        _reference_priority(method, kinds[h], probs, a, cand, n, keep, ends, 3),
                    )
        outputs.append(out)
        if si + 1 < config.num_scales:
            for r in range(R):
                for h in range(heads):
                    cand, keep, _ = priorities[r, h]
                    if keep >= len(cand):
                        kept[r][h] = cand
                        continue
                    image = r - r % ROWS  # both rows of an image choose together
                    total = sum(priorities[image + i, h][2] for i in range(ROWS))
                    order = sorted(range(len(cand)), key=lambda i: (-total[i], i))[:keep]
                    kept[r][h] = [cand[i] for i in sorted(order)]
            kept_ids.append([[list(ids) for ids in row] for row in kept])
    return outputs, kept_ids


@pytest.mark.parametrize("method", kvc.METHODS)
def test_each_method_attends_and_keeps_what_a_numpy_replay_does(method):
    config = _config()
    ratio = 0.5
    rng = np.random.default_rng(3)
    qkv = [
        [
            rng.standard_normal((IMAGES * ROWS, pn * pn, config.num_heads, config.head_dim), np.float32)
            for _ in "qkv"
        ]
        for pn in config.patch_nums
    ]
    want_out, want_ids = _replay(method, ratio, config, qkv)
    cache = kvc.init_cache(config, IMAGES * ROWS, _compression(method, ratio, config), ROWS)[0]
    for si, (q, k, v) in enumerate(qkv):
        out, cache = jax.jit(lambda c, q, k, v, si=si: c.attend(q, k, v, si, SCALE))(cache, q, k, v)
        np.testing.assert_allclose(np.asarray(out), want_out[si], rtol=1e-4, atol=1e-5)
        if si + 1 < config.num_scales:
            # Group g holds the heads of cache.groups[g].heads, each its own list of ids.
            got = [[None] * config.num_heads for _ in range(IMAGES * ROWS)]
            for group in cache.groups:
                for slot, h in enumerate(np.asarray(group.heads)):
                    for r in range(IMAGES * ROWS):
                        got[r][h] = np.asarray(group.ids)[r, slot].tolist()
            assert got == want_ids[si], f"scale {si}"
    # Something was dropped, and the two rows of an image kept the same tokens.
    assert (
        sum(len(ids) for ids in got[0]) < config.num_heads * config.token_range(0, config.num_scales - 1)[1]
    )
    assert got[0] == got[1] and got[2] == got[3]


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9])
def test_budgets_keep_the_mean_history_under_the_ratio(ratio):
    config = tiny_transformer(family="var", patch_nums=PATCH_NUMS_256)  # 424 tokens before the last scale
    hack = kvc.history_budgets(config, _compression("hack", ratio, config))
    uniform = kvc.history_budgets(config, _compression("h2o", ratio, config))
    for si in range(config.num_scales):
        history = config.token_range(0, si)[1] if si else 0
        cap = np.floor((1 - ratio) * history)
        assert uniform[kvc.UNIFORM][si] == cap
        mean = (hack[kvc.CONTEXTUAL][si] + hack[kvc.STRUCTURAL][si]) / 2  # half the heads each
        assert mean <= cap and hack[kvc.STRUCTURAL][si] <= history
        assert hack[kvc.CONTEXTUAL][si] <= hack[kvc.STRUCTURAL][si]
    last = config.num_scales - 1
    assert hack[kvc.CONTEXTUAL][last] < hack[kvc.STRUCTURAL][last]  # asymmetric


@pytest.fixture(scope="module")
def var_model():
    """The toy VAR with random weights (the tokenizer's drawn on the host: nothing to compile),
    blocks stacked as load_model returns them."""
    config = _config()
    vqvae_config = tiny_vqvae()
    rng = np.random.default_rng(1)
    vqvae_params = jax.tree.map(
        lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype),
        abstract_variables(vqvae_config),
    )
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    return checkpoint.ModelBundle(
        vqvae_config, vqvae_params, config, transformer.stack_blocks(params, config.depth)
    )


def test_ratio_zero_is_the_plain_sampler_and_full_budgets_the_same_tokens(var_model, monkeypatch):
    labels, key = [0, 3, 5], jax.random.PRNGKey(4)
    plain = sampling.SamplingOptions(decode=False)
    base = sampling.sample(var_model, labels, key, plain)
    for method in ("hack", "snapkv"):
        zero = dataclasses.replace(
            plain, kv_compression=_compression(method, 0.0, var_model.transformer_config)
        )
        out = sampling.sample(var_model, labels, key, zero)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))
        np.testing.assert_array_equal(np.asarray(out.f_hat), np.asarray(base.f_hat))

    # The compressed path with budgets that drop nothing: the plain sampler's greedy tokens.
    greedy = dataclasses.replace(plain, top_k=1)
    base = sampling.sample(var_model, labels, key, greedy)
    init = kvc.init_cache

    def full(config, rows_total, compression, rows):
        caches = init(config, rows_total, compression, rows)
        history = tuple(config.token_range(0, si)[1] if si else 0 for si in range(config.num_scales))
        plan = dataclasses.replace(caches[0].plan, budgets=(history,) * len(caches[0].plan.kinds))
        return tuple(dataclasses.replace(c, plan=plan) for c in caches)

    monkeypatch.setattr(kvc, "init_cache", full)
    options = dataclasses.replace(
        greedy, kv_compression=_compression("hack", 0.5, var_model.transformer_config)
    )
    out = sampling.sample(var_model, labels, key, options)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(base.tokens))


def test_scanned_and_per_block_params_compress_alike(var_model):
    """The sampler scans stacked blocks over one plan; per-block params run the blocks one by one."""
    options = sampling.SamplingOptions(
        decode=False,
        top_k=0,
        top_p=0,
        kv_compression=_compression("hack_random", 0.9, var_model.transformer_config),
    )
    labels, key = [1, 2], jax.random.PRNGKey(0)
    scanned = sampling.sample(var_model, labels, key, options)
    per_block = var_model._replace(
        transformer_params=transformer.unstack_blocks(var_model.transformer_params)
    )
    unrolled = sampling.sample(per_block, labels, key, options)
    np.testing.assert_array_equal(np.asarray(scanned.tokens), np.asarray(unrolled.tokens))
    assert (
        0 <= int(scanned.tokens.min()) and int(scanned.tokens.max()) < var_model.transformer_config.vocab_size
    )


def test_bad_settings_are_clear_errors(var_model):
    config = _config()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        kvc.KVCompression(1.0, "h2o")
    with pytest.raises(ValueError, match="must be one of"):
        kvc.KVCompression(0.5, "lru")
    with pytest.raises(ValueError, match="needs the head kinds"):
        kvc.KVCompression(0.5, "hack")
    with pytest.raises(ValueError, match="calibrate this model"):
        kvc.KVCompression(0.5, "hack", ((True, False),)).head_kinds(config)
    with pytest.raises(ValueError, match="as many contextual heads"):
        kvc.KVCompression(0.5, "hack", ((True,) * 4, (False,) * 4)).head_kinds(config)
    mvar = var_model._replace(transformer_config=dataclasses.replace(config, family="mvar"))
    with pytest.raises(ValueError, match="KV-cache compression is for VAR"):
        sampling.sample(
            mvar,
            [0],
            jax.random.PRNGKey(0),
            sampling.SamplingOptions(kv_compression=kvc.KVCompression(0.5, "h2o")),
        )


def test_column_variance_is_zero_for_a_vertical_pattern_and_one_for_a_diagonal():
    config = tiny_transformer(family="var", patch_nums=(1, 2, 3), num_heads=2, embed_dim=4)
    L = config.seq_len  # 14; scale 2 (9 queries) attends the 5 earlier tokens
    big = 60.0
    q = np.zeros((1, L, 2, 2), np.float32)
    k = np.zeros((1, L, 2, 2), np.float32)
    # Head 0: every query attends token 0 alone (vertical). Head 1: query j of scale 2 attends
    # token j % 5 alone (each query one token, several of them: diagonals).
    q[0, 5:, 0, 0] = big
    k[0, 0, 0, 0] = 1.0
    angles = 2 * np.pi * np.arange(5) / 5
    k[0, :5, 1] = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    q[0, 5:, 1] = big * k[0, np.arange(9) % 5, 1]
    stat = np.asarray(head_kinds.column_variance(jnp.asarray(q), jnp.asarray(k), config))[0]
    assert stat[0] == pytest.approx(0.0, abs=1e-6)
    # Queries split 2/2/2/2/1 over the five tokens: each column's variance is m (1 - m) exactly.
    assert stat[1] == pytest.approx(1.0, abs=1e-4)


def test_classify_splits_each_block_and_the_file_round_trips(tmp_path):
    stats = np.array([[0.3, 0.1, 0.2, 0.9], [0.5, 0.6, 0.05, 0.07]])
    contextual = head_kinds.classify(stats, 0.5)
    assert contextual.tolist() == [[False, True, True, False], [False, False, True, True]]
    config = tiny_transformer(family="var")
    with pytest.raises(CheckpointError, match="python -m mvar_jax.hack --checkpoint .* --calibrate"):
        head_kinds.load(tmp_path, config)
    head_kinds.save(tmp_path, stats, contextual, {"num_samples": 2})
    got_stats, got = head_kinds.load(tmp_path, config)
    np.testing.assert_array_equal(got, contextual)
    np.testing.assert_allclose(got_stats, stats)
    record = json.loads((tmp_path / head_kinds.FILE_NAME).read_text())
    record["contextual"] = [[True]]
    (tmp_path / head_kinds.FILE_NAME).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="2 blocks of 4 heads"):
        head_kinds.load(tmp_path, config)


def test_calibrate_then_sample_from_the_command_line(tiny_checkpoints, tmp_path, capsys):
    import sample
    from mvar_jax import hack

    model_dir = tmp_path / "var"
    shutil.copytree(tiny_checkpoints["var"], model_dir)
    out = str(tmp_path / "s.npz")
    argv = ["--checkpoint", str(model_dir), "--labels", "1,2", "--top_k", "1", "--out", out]
    with pytest.raises(SystemExit) as exit_info:  # HACK before calibration
        sample.main([*argv, "--kv_compression", "0.5"])
    assert exit_info.value.code == 2
    assert "--calibrate" in capsys.readouterr().err

    assert (
        hack.main(["--checkpoint", str(model_dir), "--calibrate", "--num_samples", "2", "--batch_size", "2"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "block  0:" in printed and "4 of 8 heads contextual" in printed
    assert sample.main([*argv, "--kv_compression", "0.7", "--kv_method", "hack"]) == 0
    assert np.load(out)["tokens"].shape == (2, 680)  # the fixtures' 256 px pyramid

    for bad, message in (
        (["--kv_compression", "1"], "must be in [0, 1)"),
        (["--checkpoint", str(tiny_checkpoints["mvar"]), "--kv_compression", "0.5"], "keeps no KV cache"),
    ):
        with pytest.raises(SystemExit):
            sample.main([*argv, *bad])
        assert message in capsys.readouterr().err
