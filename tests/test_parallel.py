"""Sharding rules, and one train step on 8 simulated devices against 1 device.

The 8-device part needs ``--xla_force_host_platform_device_count=8`` before JAX
starts, so the test runs this file as a script in a subprocess (``_worker``).
"""

from __future__ import annotations

import json

from conftest import run_on_eight_devices


def test_fsdp_spec_splits_the_largest_divisible_axis():
    from jax.sharding import PartitionSpec as P

    from mvar_jax.parallel import fsdp_spec

    assert fsdp_spec((1024, 3072), 8, min_size=1) == P(None, "data")
    assert fsdp_spec((4096, 1024), 8, min_size=1) == P("data")
    assert fsdp_spec((1024, 1024), 8, min_size=1) == P("data")  # ties: first axis
    assert fsdp_spec((6, 1024), 4, min_size=1) == P(None, "data")
    assert fsdp_spec((10, 6), 4, min_size=1) == P()  # nothing divisible: replicated
    assert fsdp_spec((1024,), 8, min_size=2048) == P()  # small: replicated
    assert fsdp_spec((1024, 1024), 1, min_size=1) == P()


def test_host_batch_to_global_takes_a_mesh_or_a_sharding():
    import jax
    import numpy as np

    from mvar_jax import parallel

    mesh = parallel.make_mesh()
    batch = {"tokens": np.arange(12, dtype=np.int32).reshape(4, 3)}
    for target, sharding in (
        (mesh, parallel.batch_sharding(mesh)),
        (parallel.replicated(mesh), parallel.replicated(mesh)),
    ):
        out = parallel.host_batch_to_global(batch, target)["tokens"]
        assert out.sharding == sharding
        np.testing.assert_array_equal(jax.device_get(out), batch["tokens"])


def test_eight_devices_match_one(tmp_path):
    report = run_on_eight_devices(__file__, tmp_path)
    assert report["device_count"] == 8
    for name, err in report["max_rel_err"].items():
        # Only the batch reduction is split across devices: float32 rounding.
        assert err < 1e-5, (name, err)
    assert report["loss_rel_err"] < 1e-6
    assert report["fsdp_sharded_leaves"] > 0
    assert "not divisible by the number of devices (8)" in report["batch_error"]
    assert report["global_batch_shape"] == [8, 30]


def _worker() -> None:
    """Two train steps (block-diagonal then spatial-Markov segment) three ways."""
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from mvar_jax import parallel
    from mvar_jax.configs import tiny_cpu
    from mvar_jax.models import families
    from mvar_jax.models.config import InitScales
    from mvar_jax.models.transformer import Transformer
    from mvar_jax.models.vqvae import VQVAEConfig
    from mvar_jax.training import generator, optimizer, state as state_lib, step as step_lib
    from mvar_jax.training.synthetic import SyntheticTokenSource

    toy = tiny_cpu.get_config("fixture")  # the toy model, on the fixture tokenizer's vocabulary
    toy.model.drop_path_rate = 0.1  # drawn per example: must not depend on the devices
    toy.optim.base_lr = 0.1
    config = generator.transformer_config(
        toy, VQVAEConfig(vocab_size=64, z_channels=8, patch_nums=toy.model.patch_nums)
    )
    model = Transformer(config)
    tx, lr = optimizer.make_optimizer(
        optimizer.OptimizerConfig(**{**toy.optim, "warmup_fraction": 0.1}),
        global_batch_size=8,
        total_steps=10,
        decay_mask=optimizer.official_decay_mask,
    )
    rng = jax.random.PRNGKey(0)
    params = state_lib.init_params(config, InitScales(**toy.init), rng)
    source = SyntheticTokenSource(batch_size=8, seq_len=config.seq_len, vocab_size=64, num_classes=10)
    batches = [source.batch(i) for i in range(2)]
    for b in batches:
        b["x_BLCv"] = np.random.default_rng(0).normal(size=(8, config.seq_len - 1, 8)).astype(np.float32)
    segments = families.of(config).schedule(config, 1).segments

    def run(devices, fsdp):
        mesh = parallel.make_mesh(devices)
        state = state_lib.create_train_state(params, tx, rng)
        shardings = parallel.state_shardings(state, mesh, fsdp=fsdp, min_size=1)
        state = jax.device_put(state, shardings)
        losses = []
        for batch, segment in zip(batches, segments):
            train_step = jax.jit(
                step_lib.make_train_step(model, tx, lr, segment, label_smoothing=0.1),
                in_shardings=(shardings, parallel.batch_sharding(mesh)),
                out_shardings=(shardings, parallel.replicated(mesh)),
            )
            state, metrics = train_step(state, parallel.host_batch_to_global(batch, mesh))
            losses.append(float(metrics["loss"]))
        sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
        return jax.device_get(state.params), np.array(losses), sharded

    one, loss_one, _ = run(jax.devices()[:1], fsdp=False)
    report = {"device_count": jax.device_count(), "max_rel_err": {}, "loss_rel_err": 0.0}
    for name, fsdp in (("data_parallel", False), ("fsdp", True)):
        params8, loss8, sharded = run(jax.devices(), fsdp)
        errs = jax.tree.map(
            lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), params8, one
        )
        report["max_rel_err"][name] = max(jax.tree.leaves(errs))
        report["loss_rel_err"] = max(
            report["loss_rel_err"], float(np.max(np.abs(loss8 - loss_one) / loss_one))
        )
        if fsdp:
            report["fsdp_sharded_leaves"] = sharded

    mesh = parallel.make_mesh()
    try:
        parallel.check_batch_size(12, mesh)
    except ValueError as e:
        report["batch_error"] = str(e)
    report["global_batch_shape"] = list(parallel.host_batch_to_global(batches[0], mesh)["tokens"].shape)
    print(json.dumps(report))


if __name__ == "__main__":
    _worker()
