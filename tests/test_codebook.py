"""Codebook health: usage, perplexity and the official EMA rule against numpy; dead-code restart.

The 8-device check needs ``--xla_force_host_platform_device_count=8`` before JAX
starts, so it runs this file as a script in a subprocess (``_worker``).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_eight_devices

from mvar_jax.training import codebook

PATCH_NUMS = (1, 2, 4)
V = 16


def _random_ids(rng: np.random.Generator, steps: int, batch: int) -> list[list[np.ndarray]]:
    """Per step, ids per scale; scale s draws from the first 4 * (s + 1) codes only."""
    return [
        [rng.integers(0, 4 * (si + 1), (batch, pn * pn)).astype(np.int32) for si, pn in enumerate(PATCH_NUMS)]
        for _ in range(steps)
    ]


def _reference_metrics(steps_ids, window: int, batch: int) -> dict[str, float]:
    """Straight numpy from the definitions: histories kept whole, no running state."""
    S = len(PATCH_NUMS)
    hist_TSV = np.array(
        [[np.bincount(ids.reshape(-1), minlength=V) for ids in step] for step in steps_ids], np.float64
    )
    T = len(hist_TSV)
    out = {}
    last = hist_TSV[max(T - window, 0) :]
    weights_T = (1 - 1 / window) ** np.arange(T - 1, -1, -1)
    # The official loop: one record per scale per step, in scale order.
    ema_SV, record = np.zeros((S, V)), 0
    for t in range(T):
        for si in range(S):
            h = hist_TSV[t, si]
            if record == 0:
                ema_SV[si] = h
            elif record < 100:
                ema_SV[si] = ema_SV[si] * 0.9 + h * 0.1
            else:
                ema_SV[si] = ema_SV[si] * 0.99 + h * 0.01
            record += 1
    margin = batch * PATCH_NUMS[-1] ** 2 / V * 0.08
    for si, pn in enumerate(PATCH_NUMS):
        out[f"usage/{pn}x{pn}"] = 100 * np.mean(last[:, si].sum(0) > 0)
        counts = (weights_T[:, None] * hist_TSV[:, si]).sum(0)
        p = counts[counts > 0] / counts.sum()
        out[f"perplexity/{pn}x{pn}"] = np.exp(-(p * np.log(p)).sum())
        out[f"usage_official/{pn}x{pn}"] = 100 * np.mean(ema_SV[si] >= margin)
    out["usage/all"] = 100 * np.mean(last.sum((0, 1)) > 0)
    return out


@pytest.mark.parametrize("steps", [3, 45])  # 45 steps = 135 records: both EMA decays
def test_metrics_match_numpy_reference(steps):
    window, batch = 6, 2
    steps_ids = _random_ids(np.random.default_rng(steps), steps, batch)
    # A code that scale 2 chose once, long ago, must leave its window.
    steps_ids[0][2][0, 0] = V - 1
    record = jax.jit(lambda st, ids: codebook.record(st, ids, window=window))
    state = codebook.init_state(len(PATCH_NUMS), V)
    for ids in steps_ids:
        state = record(state, ids)
    got = codebook.metrics(state, PATCH_NUMS, window=window, global_batch_size=batch)
    want = _reference_metrics(steps_ids, window, batch)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=name)
    if steps > window:
        assert float(got["usage/4x4"]) == 100 * 12 / V  # code V - 1 has left the window


def test_bad_arguments_are_named():
    state = codebook.init_state(3, V)
    with pytest.raises(ValueError, match="token ids of 3 scales"):
        codebook.record(state, [jnp.zeros((1, 1), jnp.int32)], window=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        codebook.metrics(state, PATCH_NUMS, window=0, global_batch_size=1)
    with pytest.raises(ValueError, match="dead_after"):
        codebook.restart_dead_codes(jnp.zeros((V, 2)), state, [], jax.random.PRNGKey(0), dead_after=0)


def _restart_case(seed: int = 0):
    """A table, a state where codes 3, 7 and 11 idled 5 steps and 12 idled 9, and residuals."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, 3)).astype(np.float32)
    idle = np.zeros(V, np.int32)
    idle[[3, 7, 11]], idle[12] = 5, 9
    state = codebook.init_state(len(PATCH_NUMS), V).replace(idle_V=jnp.asarray(idle))
    z = [rng.standard_normal((8, pn * pn, 3)).astype(np.float32) for pn in PATCH_NUMS]
    return table, state, z


def test_restart_reseeds_only_dead_rows_from_residuals_deterministically():
    table, state, z = _restart_case()
    restart = jax.jit(lambda t, s, z, k: codebook.restart_dead_codes(t, s, z, k, dead_after=5))
    out = restart(table, state, z, jax.random.PRNGKey(7))
    dead = np.zeros(V, bool)
    dead[[3, 7, 11, 12]] = True
    np.testing.assert_array_equal(out.restarted_V, dead)
    assert int(out.num_restarted) == 4
    new = np.asarray(out.embedding_VC)
    np.testing.assert_array_equal(new[~dead], table[~dead])  # live rows bit-for-bit
    pool = np.concatenate([zs.reshape(-1, 3) for zs in z])
    for v in np.flatnonzero(dead):
        assert (pool == new[v]).all(axis=1).any(), f"row {v} is not one of the residuals"
    np.testing.assert_array_equal(out.state.idle_V, np.where(dead, 0, state.idle_V))
    np.testing.assert_array_equal(out.state.idle_SV, state.idle_SV)
    again = restart(table, state, z, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(again.embedding_VC, new)
    other = restart(table, state, z, jax.random.PRNGKey(8))
    assert not np.array_equal(other.embedding_VC, new)


def test_restart_draws_every_scale():
    """Over many dead codes, each scale seeds a share near 1/S, not in proportion to its size."""
    rng = np.random.default_rng(1)
    n = 3000
    state = codebook.init_state(len(PATCH_NUMS), n).replace(idle_V=jnp.full((n,), 9, jnp.int32))
    z = [
        np.full((4, pn * pn, 1), si, np.float32) + rng.uniform(0, 0.5, (4, pn * pn, 1)).astype(np.float32)
        for si, pn in enumerate(PATCH_NUMS)
    ]
    out = codebook.restart_dead_codes(jnp.zeros((n, 1)), state, z, jax.random.PRNGKey(0), dead_after=1)
    share = np.bincount(np.floor(np.asarray(out.embedding_VC)[:, 0]).astype(int)) / n
    np.testing.assert_allclose(share, 1 / 3, atol=0.04)


def test_restart_raises_usage_on_the_builtin_shapes():
    """A tiny VQVAE whose codebook starts in one tight cluster away from the features
    (so one code wins everywhere and the rest never get a gradient) trains 30 steps
    on built-in images, with and without restarting codes idle for 5 steps."""
    import optax

    from mvar_jax.data import builtin_shapes
    from mvar_jax.models.vqvae import VQVAE, VQVAEConfig

    n_img, batch, steps, window = 64, 8, 30, 10
    imgs = np.stack(
        [
            builtin_shapes.draw_example(i % 10, builtin_shapes.example_seed(0, "train", i), 32)
            for i in range(n_img)
        ]
    )
    imgs = imgs.astype(np.float32) / 127.5 - 1
    config = VQVAEConfig(
        vocab_size=64,
        z_channels=8,
        ch=32,
        ch_mult=(1, 1, 1),
        num_res_blocks=1,
        using_sa=False,
        using_mid_sa=False,
        patch_nums=(1, 2, 4, 8),
    )
    model = VQVAE(config)
    params = model.init(jax.random.PRNGKey(0), imgs[:1])["params"]
    params["quantize"]["embedding"]["embedding"] = 3.0 + 0.01 * jax.random.normal(
        jax.random.PRNGKey(1), (64, 8)
    )
    tx = optax.adam(2e-3)

    @jax.jit
    def train_step(params, opt_state, state, img, key, restart_on):
        def loss_fn(params):
            rec, q = model.apply({"params": params}, img, method=VQVAE.train_forward)
            return jnp.mean(jnp.square(rec - img)) + q.vq_loss, q

        grads, q = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state = codebook.record(state, q.ids, window=window)
        table = params["quantize"]["embedding"]["embedding"]
        out = codebook.restart_dead_codes(table, state, q.z, key, dead_after=5)
        table, state = jax.tree.map(
            lambda new, old: jnp.where(restart_on, new, old), (out.embedding_VC, out.state), (table, state)
        )
        params["quantize"]["embedding"]["embedding"] = table
        return params, opt_state, state

    usage = {}
    for restart_on in (False, True):
        p, opt_state = params, tx.init(params)
        state = codebook.init_state(len(config.patch_nums), config.vocab_size)
        for t in range(steps):
            img = imgs[(t * batch) % n_img :][:batch]
            p, opt_state, state = train_step(p, opt_state, state, img, jax.random.PRNGKey(t), restart_on)
        m = codebook.metrics(state, config.patch_nums, window=window, global_batch_size=batch)
        usage[restart_on] = {k: float(v) for k, v in m.items() if k.startswith("usage/")}
    print(usage)
    assert usage[False]["usage/all"] < 10  # collapsed: a code or two serve every scale
    assert usage[True]["usage/all"] > 50
    for name, value in usage[False].items():
        assert usage[True][name] > value, name


def test_eight_devices_match_one(tmp_path):
    report = run_on_eight_devices(__file__, tmp_path)
    assert report == {"device_count": 8, "z_sharded": True, "identical": True, "restarted": 4}


def _worker() -> None:
    """record + restart jitted on a mesh of 8 (batch-sharded inputs) and of 1 device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    table, state, z = _restart_case()
    ids = [np.asarray(jnp.argmax(zs, axis=-1), np.int32) for zs in z]

    def step(table, state, ids, z, key):
        state = codebook.record(state, ids, window=4)
        state = state.replace(idle_V=state.idle_V + 4)  # four more idle steps: 3, 7, 11, 12 dead
        return codebook.restart_dead_codes(table, state, z, key, dead_after=9)

    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = Mesh(np.asarray(devices), ("data",))
        rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        args = (
            jax.device_put(table, rep),
            jax.device_put(state, rep),
            jax.device_put(ids, batch),
            jax.device_put(z, batch),
            jax.device_put(jax.random.PRNGKey(3), rep),
        )
        out = jax.jit(step, out_shardings=rep)(*args)
        results.append((args[3][0].sharding, jax.tree.map(np.asarray, out)))
    (sharding8, out8), (_, out1) = results
    same = jax.tree.leaves(jax.tree.map(np.array_equal, out8, out1))
    print(
        json.dumps(
            {
                "device_count": jax.device_count(),
                "z_sharded": len(sharding8.device_set) == 8,
                "identical": all(same),
                "restarted": int(out8.num_restarted),
            }
        )
    )


if __name__ == "__main__":
    _worker()
