"""VQVAE tokenizer: parity with the official PyTorch outputs, and the quantizer's parts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from mvar_jax.models import vqvae
from mvar_jax.models.quantizer import MultiScaleQuantizer, num_phis, phi_index
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig, split_scales
from mvar_jax.weights.vqvae import load_official_vqvae, official_key, official_shape


def _nhwc(x_NCHW: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_NCHW.transpose(0, 2, 3, 1))


def _jit_apply(module, method):
    """``module.apply(variables, *args, method=method)``, jitted: one compile, not one per op."""
    return jax.jit(lambda variables, *args: module.apply(variables, *args, method=method))


def _split_scales(idx_BL: np.ndarray, patch_nums) -> list[jax.Array]:
    bounds = np.cumsum([0] + [pn * pn for pn in patch_nums])
    return [jnp.asarray(idx_BL[:, a:b], jnp.int32) for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def tiny_vae(fixture_dir):
    return load_official_vqvae(fixture_dir / "tiny_vae.pth")


@pytest.fixture(scope="module", params=[None, 1 << 40], ids=["cpu_strips", "whole_maps"])
def outputs(request, tiny_vae, tiny_io):
    """Every parity output, from two jitted calls (encode side, decode side); with the 3x3
    convolutions of the 256 px maps in strips of rows, as a CPU runs them, and whole."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param is not None:
            patch.setattr(vqvae, "CPU_STRIP_PIXELS", request.param)
        return _outputs(tiny_vae, tiny_io)


def _outputs(tiny_vae, tiny_io):
    config, variables = tiny_vae
    model = VQVAE(config)
    gt_ids = _split_scales(tiny_io["gt_BL"], config.patch_nums)

    def encode_side(m: VQVAE, img):
        f = m.encode(img)
        return {
            "enc_out": m.encoder(img),
            "quant_conv_out": f,
            "ids": m.img_to_idx(img),
            "fhat_last": m.fhat_per_scale(f)[-1],
        }

    def decode_side(m: VQVAE, fhat_ref, ids):
        return {
            "recon_img": m.fhat_to_img(fhat_ref),
            "idx_to_img": m.idx_to_img(ids),
            "x_BLCv_wo_first_l": m.idx_to_var_input(ids),
        }

    out = _jit_apply(model, encode_side)(variables, _nhwc(tiny_io["img"]))
    out.update(_jit_apply(model, decode_side)(variables, _nhwc(tiny_io["fhat_last"]), gt_ids))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize(
    "name", ["enc_out", "quant_conv_out", "fhat_last", "recon_img", "idx_to_img", "x_BLCv_wo_first_l"]
)
def test_matches_official(outputs, tiny_io, name):
    got, ref = outputs[name], tiny_io[name]
    if got.ndim == 4:
        got = got.transpose(0, 3, 1, 2)
    err = rel_err(got, ref)
    print(f"{name}: rel err {err:.2e}, max abs {np.max(np.abs(got - ref)):.2e}")
    assert err < 1e-5
    if name.endswith("img"):
        assert np.max(np.abs(got - ref)) < 1e-4


def test_token_ids_identical_at_every_scale(outputs, tiny_io, tiny_vae):
    config, _ = tiny_vae
    for si, (got, ref) in enumerate(zip(outputs["ids"], _split_scales(tiny_io["gt_BL"], config.patch_nums))):
        assert got.dtype == np.int32 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref, err_msg=f"scale {si}")


def test_autoregressive_steps_rebuild_fhat_and_inputs(tiny_vae, tiny_io):
    """The sampler's per-scale path reaches the official f_hat and teacher-forcing input."""
    config, variables = tiny_vae
    model = VQVAE(config)
    ids = _split_scales(tiny_io["gt_BL"], config.patch_nums)

    def run(m: VQVAE, ids):
        f_hat = jnp.zeros((2, 16, 16, config.z_channels))
        inputs = []
        for si, (pn, idx) in enumerate(zip(config.patch_nums, ids)):
            h = m.embed_tokens(idx).reshape(2, pn, pn, config.z_channels)
            f_hat, nxt = m.next_autoregressive_input(si, f_hat, h)
            inputs.append(nxt.reshape(2, -1, config.z_channels))
        return f_hat, jnp.concatenate(inputs[:-1], axis=1)

    f_hat, var_input = _jit_apply(model, run)(variables, ids)
    assert rel_err(np.asarray(f_hat).transpose(0, 3, 1, 2), tiny_io["fhat_last"]) < 1e-5
    assert rel_err(var_input, tiny_io["x_BLCv_wo_first_l"]) < 1e-5


def test_embed_tokens_reads_the_codebook(tiny_vae, fixture_dir):
    config, variables = tiny_vae
    codebook = torch.load(fixture_dir / "tiny_vae.pth", weights_only=True)["quantize.embedding.weight"]
    idx = jnp.array([[0, 5, config.vocab_size - 1]])
    got = VQVAE(config).apply(variables, idx, method=VQVAE.embed_tokens)
    np.testing.assert_array_equal(np.asarray(got)[0], codebook.numpy()[[0, 5, config.vocab_size - 1]])


# ------------------------------------------------------- training forward


@pytest.fixture(scope="module")
def train_io(fixture_dir):
    with np.load(fixture_dir / "tiny_vqvae_train.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def train_outputs(tiny_vae, train_io):
    """Training forward, losses and gradients of ``mse(rec, img) + vq_loss`` (one jit).

    The fixture's input gradient is the gradient w.r.t. the network's input with
    the reconstruction target held fixed (it lacks the direct ``2 (img - rec) / N``
    of the target), so the target enters as a separate, undifferentiated argument.
    """
    config, variables = tiny_vae
    model = VQVAE(config)

    def loss_fn(params, img, target):
        rec, q = model.apply({"params": params}, img, method=VQVAE.train_forward)
        rec_loss = jnp.mean(jnp.square(rec - target))
        return rec_loss + q.vq_loss, {"rec": rec, "vq_loss": q.vq_loss, "rec_loss": rec_loss, "ids": q.ids}

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    img = _nhwc(train_io["img"])
    (loss, aux), (g_params, g_img) = grad_fn(variables["params"], img, img)
    flat = jax.tree_util.tree_flatten_with_path(g_params)[0]
    grads = {}
    for keypath, leaf in flat:
        path = tuple(k.key for k in keypath)
        name = official_key(path, config)
        g = np.asarray(leaf)
        if path[-1] == "kernel" and g.ndim == 4:
            g = g.transpose(3, 2, 0, 1)  # Flax (kh, kw, in, out) -> official (out, in, kh, kw)
        elif path[-1] == "kernel":
            g = g.T[:, :, None, None]  # 1x1 conv, a Dense here: (in, out) -> (out, in, 1, 1)
        assert g.shape == official_shape(path, leaf.shape), name
        grads[name] = g
    out = {k: np.asarray(v) for k, v in aux.items() if k != "ids"}
    out.update(
        loss=np.asarray(loss),
        grad_img=np.asarray(g_img).transpose(0, 3, 1, 2),
        rec=out["rec"].transpose(0, 3, 1, 2),
        grads=grads,
        gt_BL=np.concatenate([np.asarray(i) for i in aux["ids"]], axis=1),
    )
    return out


@pytest.mark.parametrize("name", ["rec", "vq_loss", "rec_loss", "loss"])
def test_training_forward_matches_official(train_outputs, train_io, name):
    err = rel_err(train_outputs[name], train_io[name])
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-5


def test_training_forward_picks_the_official_tokens(train_outputs, train_io):
    np.testing.assert_array_equal(train_outputs["gt_BL"], train_io["gt_BL"])


def test_training_gradients_match_official(train_outputs, train_io):
    names = [k.removeprefix("grad/") for k in train_io if k.startswith("grad/")]
    assert len(names) == 12
    errs = {"img": rel_err(train_outputs["grad_img"], train_io["grad_img"])}
    errs.update({n: rel_err(train_outputs["grads"][n], train_io[f"grad/{n}"]) for n in names})
    for n, err in errs.items():
        print(f"grad {n}: rel err {err:.2e}")
    assert max(errs.values()) < 1e-4, errs


# --------------------------------------------------------------- quantizer


def test_phi_index_per_sharing_mode():
    for sn in range(2, 13):  # Non-shared: scale si uses Phi si.
        assert [phi_index(si, sn, sn) for si in range(sn)] == list(range(sn))
    assert {phi_index(si, 10, 1) for si in range(10)} == {0}  # Fully shared.
    # Partially shared, 4 Phis over 10 scales: ends use the end Phis, order kept, all used.
    picks = [phi_index(si, 10, 4) for si in range(10)]
    assert picks[0] == 0 and picks[-1] == 3 and picks == sorted(picks) and set(picks) == {0, 1, 2, 3}
    assert num_phis(0.0, 4, 10) == 0 and num_phis(0.5, 0, 10) == 10 and num_phis(-0.5, 1, 10) == 1


def _torch_embed_to_fhat(h_list, params, patch_nums, ratio, n_phis):
    """Independent reference of embed_to_fhat with torch ops (NCHW)."""
    H = patch_nums[-1]
    f_hat = 0
    for si, h in enumerate(h_list):
        x = torch.from_numpy(np.asarray(h)).permute(0, 3, 1, 2)
        if si < len(patch_nums) - 1:
            x = F.interpolate(x, size=(H, H), mode="bicubic", align_corners=False)
        if n_phis:
            p = params[f"phi_{phi_index(si, len(patch_nums), n_phis)}"]
            w = torch.tensor(np.asarray(p["kernel"])).permute(3, 2, 0, 1)
            conv = F.conv2d(x, w, torch.tensor(np.asarray(p["bias"])), padding=1)
            x = x * (1 - abs(ratio)) + conv * abs(ratio)
        f_hat = f_hat + x
    return f_hat.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("share, ratio", [(0, 0.5), (1, 0.5), (4, -0.3), (4, 0.0)])
def test_embed_to_fhat_matches_torch_reference(share, ratio):
    patch_nums, C = (1, 2, 3, 5), 4
    q = MultiScaleQuantizer(
        vocab_size=16, Cvae=C, patch_nums=patch_nums, quant_resi=ratio, share_quant_resi=share
    )
    rng = np.random.default_rng(share)
    f = rng.standard_normal((2, 5, 5, C)).astype(np.float32)
    variables = q.init(jax.random.PRNGKey(0), f, method=MultiScaleQuantizer.quantize)
    phis = [k for k in variables["params"] if k.startswith("phi_")]
    assert len(phis) == num_phis(ratio, share, len(patch_nums))
    h_list = [rng.standard_normal((2, pn, pn, C)).astype(np.float32) for pn in patch_nums]
    steps = q.apply(variables, h_list, method=MultiScaleQuantizer.embed_to_fhat)
    assert len(steps) == len(patch_nums)
    want = _torch_embed_to_fhat(h_list, variables["params"], patch_nums, ratio, len(phis))
    np.testing.assert_allclose(steps[-1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("using_znorm", [False, True])
def test_nearest_code_matches_brute_force(using_znorm):
    q = MultiScaleQuantizer(vocab_size=32, Cvae=6, patch_nums=(1, 2), using_znorm=using_znorm)
    rng = np.random.default_rng(1)
    codes = rng.standard_normal((32, 6)).astype(np.float32)
    z = rng.standard_normal((50, 6)).astype(np.float32) * 2
    variables = {"params": {"embedding": {"embedding": codes}}}
    got = np.asarray(q.apply(variables, z, method=MultiScaleQuantizer.nearest_code))
    if using_znorm:
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        want = np.argmax(unit(z) @ unit(codes).T, axis=1)
    else:
        want = np.argmin(((z[:, None, :] - codes[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(got, want)


def test_quantizer_is_batch_independent_and_checks_shapes():
    q = MultiScaleQuantizer(vocab_size=16, Cvae=4, patch_nums=(1, 2, 4))
    f = np.random.default_rng(2).standard_normal((3, 4, 4, 4)).astype(np.float32)
    variables = q.init(jax.random.PRNGKey(1), f, method=MultiScaleQuantizer.quantize)
    ids, f_hats = q.apply(variables, f, method=MultiScaleQuantizer.quantize)
    ids1, f_hats1 = q.apply(variables, f[1:2], method=MultiScaleQuantizer.quantize)
    for a, b in zip(ids, ids1):
        np.testing.assert_array_equal(a[1:2], b)
    np.testing.assert_allclose(f_hats[-1][1:2], f_hats1[-1], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 4\)"):
        q.apply(variables, f[:, :2], method=MultiScaleQuantizer.quantize)
    with pytest.raises(ValueError, match=r"scale 1 needs token ids of shape \(B, 4\)"):
        q.apply(variables, [ids[0], ids[2]], method=MultiScaleQuantizer.idx_to_fhat)
    with pytest.raises(ValueError, match="token ids of 2 or 3 scales"):
        q.apply(variables, ids[:1], method=MultiScaleQuantizer.idx_to_var_input)


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_quantize_train_loss_tokens_and_straight_through(beta):
    """Same tokens and f_hats as ``quantize``; loss value (1 + beta) mean_s mse(f_hat_s, f);
    the encoder's gradient is the identity (straight-through) plus beta's commitment pull."""
    q = MultiScaleQuantizer(vocab_size=16, Cvae=4, patch_nums=(1, 2, 4), beta=beta)
    f = np.random.default_rng(3).standard_normal((2, 4, 4, 4)).astype(np.float32)
    variables = q.init(jax.random.PRNGKey(2), f, method=MultiScaleQuantizer.quantize)
    ids, f_hats = q.apply(variables, f, method=MultiScaleQuantizer.quantize)
    out = q.apply(variables, f, method=MultiScaleQuantizer.quantize_train)
    for a, b in zip(out.ids, ids):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(out.f_hat_BHWC, f_hats[-1], atol=1e-6)
    mses = [np.mean((np.asarray(h) - f) ** 2) for h in f_hats]
    np.testing.assert_allclose(out.vq_loss, (1 + beta) * np.mean(mses), rtol=1e-6)
    assert [z.shape for z in out.z] == [(2, 1, 4), (2, 4, 4), (2, 16, 4)]

    def probe(f):  # d/df of <w, f_hat_st> + vq_loss
        o = q.apply(variables, f, method=MultiScaleQuantizer.quantize_train)
        return jnp.sum(o.f_hat_BHWC * w) + o.vq_loss

    w = np.random.default_rng(4).standard_normal(f.shape).astype(np.float32)
    commit = sum(2 * beta * (f - np.asarray(h)) / f.size for h in f_hats) / len(f_hats)
    np.testing.assert_allclose(jax.grad(probe)(f), w + commit, atol=1e-6)


# ------------------------------------------------------------------ config


def test_config_round_trips_through_json():
    config = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 4), share_quant_resi=0)
    again = VQVAEConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)
    assert VQVAEConfig().image_size == 256 and VQVAEConfig().num_tokens == 680


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ch": 48}, "not divisible by the 32 GroupNorm groups"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"patch_nums": (1, 3, 2)}, "strictly increasing"),
        ({"patch_nums": (16,)}, "patch_nums"),
        ({"quant_conv_ks": 2}, "odd"),
        ({"share_quant_resi": -1}, "share_quant_resi"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VQVAEConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"VQVAEConfig: unknown fields \['depth'\]"):
        VQVAEConfig.from_dict({"depth": 16})


def test_encode_rejects_nchw_images(tiny_vae):
    config, variables = tiny_vae
    with pytest.raises(ValueError, match="NHWC"):
        VQVAE(config).apply(variables, jnp.zeros((1, 3, 32, 32)), method=VQVAE.encode)


def test_split_scales_undoes_concatenation():
    patch_nums = (1, 2, 3)
    ids = [np.arange(2 * pn * pn).reshape(2, pn * pn) + 100 * pn for pn in patch_nums]
    parts = split_scales(jnp.concatenate(ids, axis=1), patch_nums)
    assert len(parts) == 3
    for part, want in zip(parts, ids):
        np.testing.assert_array_equal(part, want)
    with pytest.raises(ValueError, match="expected 14 tokens"):
        split_scales(jnp.zeros((2, 13), jnp.int32), patch_nums)
