"""PatchGAN discriminator and the adversarial loss terms: shapes, a PyTorch reference,
init statistics, analytic losses, and the adaptive weight against a full jax.grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import MINI_VQVAE, rel_err

from mvar_jax.models.discriminator import (
    PatchDiscriminator,
    adaptive_weight,
    disc_factor,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    last_layer_grads,
    patch_grid_size,
    vanilla_d_loss,
)
from mvar_jax.models.vqvae import Decoder, VQVAEConfig


def _images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
    """Default discriminator (ndf 64, 3 layers); the parameters do not depend on the image size."""
    return jax.jit(PatchDiscriminator().init)(jax.random.PRNGKey(0), _images(1, 32))["params"]


def test_logit_grid_at_64_and_256_px(params):
    disc = PatchDiscriminator()
    assert disc.apply({"params": params}, _images(2, 64)).shape == (2, 6, 6, 1)
    big = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    assert jax.eval_shape(lambda x: disc.apply({"params": params}, x), big).shape == (2, 30, 30, 1)
    assert (patch_grid_size(64), patch_grid_size(256), patch_grid_size(24)) == (6, 30, 1)


def test_rejects_images_too_small():
    with pytest.raises(ValueError, match="at least 24 pixels"):
        PatchDiscriminator().init(jax.random.PRNGKey(0), _images(1, 16))


def _torch_patch_discriminator(ndf: int, n_layers: int) -> torch.nn.Sequential:
    """The taming/pix2pix layout written out in PyTorch: BatchNorm2d, used in training mode."""
    layers = [torch.nn.Conv2d(3, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    width = ndf
    for n in range(1, n_layers + 1):
        out = ndf * min(2**n, 8)
        layers += [
            torch.nn.Conv2d(width, out, 4, 2 if n < n_layers else 1, 1, bias=False),
            torch.nn.BatchNorm2d(out),
            torch.nn.LeakyReLU(0.2),
        ]
        width = out
    layers.append(torch.nn.Conv2d(width, 1, 4, 1, 1))
    return torch.nn.Sequential(*layers).train()


def test_matches_pytorch_batchnorm_discriminator_in_training_mode(params):
    ndf, n_layers = 64, 3
    disc = PatchDiscriminator(ndf=ndf, n_layers=n_layers)
    ref = _torch_patch_discriminator(ndf, n_layers)
    convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in ref if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for name, conv in zip([f"conv{n}" for n in range(n_layers + 1)] + ["conv_out"], convs):
            kernel_OIHW = np.array(params[name]["kernel"]).transpose(3, 2, 0, 1)
            conv.weight.copy_(torch.from_numpy(kernel_OIHW))
            if conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        for n, norm in enumerate(norms, start=1):
            norm.weight.copy_(torch.from_numpy(np.array(params[f"norm{n}"]["scale"])))
            norm.bias.copy_(torch.from_numpy(np.array(params[f"norm{n}"]["bias"])))
        x = _images(3, 32, seed=2)
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = disc.apply({"params": params}, x)
    assert got.shape == want.shape == (3, 2, 2, 1)
    assert rel_err(got, want) <= 1e-5


def test_init_statistics_follow_taming_weights_init(params):
    assert set(params) == {"conv0", "conv1", "conv2", "conv3", "conv_out", "norm1", "norm2", "norm3"}
    assert [params[f"conv{n}"]["kernel"].shape[-1] for n in range(4)] == [64, 128, 256, 512]
    for n in (1, 2, 3):
        assert set(params[f"conv{n}"]) == {"kernel"}  # The norm's bias replaces the conv's.
    big = np.asarray(params["conv3"]["kernel"])  # 2M samples of N(0, 0.02).
    assert abs(big.mean()) < 1e-4 and abs(big.std() - 0.02) < 2e-4
    scales = np.concatenate([np.asarray(params[f"norm{n}"]["scale"]) for n in (1, 2, 3)])
    assert abs(scales.mean() - 1.0) < 3e-3 and abs(scales.std() - 0.02) < 3e-3
    for n in (1, 2, 3):
        np.testing.assert_array_equal(params[f"norm{n}"]["bias"], 0.0)
    for name, fan_in in (("conv0", 3 * 16), ("conv_out", 512 * 16)):
        bias = np.asarray(params[name]["bias"])
        assert np.all(np.abs(bias) <= fan_in**-0.5) and np.any(bias != 0)


def test_hinge_and_vanilla_losses_analytic():
    real = jnp.array([2.0, 0.5, -1.0])
    fake = jnp.array([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, .5, 2], relu(1 + fake) = [0, 1, 2.5]: 0.5 * (2.5/3 + 3.5/3) = 1.
    np.testing.assert_allclose(hinge_d_loss(real, fake), 1.0, rtol=1e-6)
    assert float(discriminator_loss(jnp.array([1.0, 3.0]), jnp.array([-1.0, -4.0]))) == 0.0
    np.testing.assert_allclose(vanilla_d_loss(jnp.zeros(4), jnp.zeros(4)), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(
        discriminator_loss(real, fake, "vanilla"),
        0.5 * (np.mean(np.log1p(np.exp(-np.asarray(real)))) + np.mean(np.log1p(np.exp(np.asarray(fake))))),
        rtol=1e-6,
    )
    np.testing.assert_allclose(generator_loss(fake), -(-2.0 + 0.0 + 1.5) / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown discriminator loss 'wgan'"):
        discriminator_loss(real, fake, "wgan")


def test_disc_factor_switches_on_at_start():
    assert [float(disc_factor(s, 3)) for s in range(6)] == [0, 0, 0, 1, 1, 1]
    traced = jax.jit(disc_factor, static_argnums=1)
    assert float(traced(jnp.int32(2), 3)) == 0.0 and float(traced(jnp.int32(3), 3)) == 1.0


def test_adaptive_weight_analytic():
    rec, gan = jnp.full((2, 2), 3.0), jnp.full((2, 2), 0.5)  # Norms 6 and 1.
    np.testing.assert_allclose(adaptive_weight(rec, gan, 0.5), 0.5 * 6 / (1 + 1e-4), rtol=1e-6)
    assert float(adaptive_weight(rec, jnp.zeros((2, 2)), 1.0)) == 1e4  # Clamped.
    assert float(adaptive_weight(jnp.zeros((2, 2)), gan, 1.0)) == 0.0
    grads = jax.grad(lambda r, g: adaptive_weight(r, g, 1.0), argnums=(0, 1))(rec, gan)
    assert all(np.all(g == 0) for g in grads)  # A constant for the optimiser.


# A tiny VQVAE decoder: 32 px out of 16x16 latents.
_DEC_CONFIG = VQVAEConfig(**MINI_VQVAE, patch_nums=(1, 2, 4, 16))


def _random_params(abstract, seed: int):
    """Values for an abstract param tree: kernels N(0, 1/fan_in), scales near 1, biases small."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).astype(np.float32)
        return ((name == "scale") + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def test_adaptive_weight_from_last_layer_matches_full_backward(params):
    decoder, disc = Decoder(_DEC_CONFIG), PatchDiscriminator()
    z = np.random.default_rng(3).standard_normal((2, 16, 16, 4)).astype(np.float32)
    img = _images(2, 32, seed=4)
    dec_params = _random_params(jax.eval_shape(decoder.init, jax.random.PRNGKey(0), z)["params"], 5)

    def rec_loss(out):  # Functions of the decoder output; the clip belongs to them.
        rec = jnp.clip(out, -1, 1)
        return jnp.mean(jnp.abs(rec - img)) + jnp.mean(jnp.square(rec - img))

    def gan_loss(out):
        return generator_loss(disc.apply({"params": params}, jnp.clip(out, -1, 1)))

    def decode(p):
        """Decoder output and conv_out's input h = silu(norm_out(...)), from one forward."""
        out, state = decoder.apply(
            {"params": p},
            z,
            mutable=["intermediates"],
            capture_intermediates=lambda m, _: m.name == "norm_out",
        )
        return out, jax.nn.silu(state["intermediates"]["norm_out"]["__call__"][0])

    def weight_and_grads(p, out, h):
        """The cheap path: the two output cotangents through one vjp of conv_out."""

        def conv_out(w):
            y = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y + p["conv_out"]["bias"]

        g_rec, g_gan = last_layer_grads(
            conv_out, p["conv_out"]["kernel"], jax.grad(rec_loss)(out), jax.grad(gan_loss)(out)
        )
        return adaptive_weight(g_rec, g_gan, 0.8), g_rec, g_gan, conv_out(p["conv_out"]["kernel"])

    def total(p):
        """A training loss: the weight enters as a constant."""
        out, h = decode(p)
        return rec_loss(out) + weight_and_grads(p, out, h)[0] * gan_loss(out)

    @jax.jit
    def run(p):
        # Reference: gradients through the whole decoder, read at conv_out's kernel.
        want = [
            jax.grad(lambda p, loss=loss: loss(decoder.apply({"params": p}, z)))(p)["conv_out"]["kernel"]
            for loss in (rec_loss, gan_loss)
        ]
        out, h = decode(p)
        return want, out, weight_and_grads(p, out, h), jax.grad(total)(p)["conv_out"]["kernel"]

    (want_rec, want_gan), out, (weight, got_rec, got_gan, out_again), got_total = run(dec_params)
    np.testing.assert_allclose(out_again, out, rtol=1e-5, atol=1e-6)  # h is conv_out's input.
    assert rel_err(got_rec, want_rec) <= 1e-5
    assert rel_err(got_gan, want_gan) <= 1e-5
    want_weight = 0.8 * np.linalg.norm(want_rec) / (np.linalg.norm(want_gan) + 1e-4)
    assert rel_err(weight, want_weight) <= 1e-5
    # The total gradient at conv_out is grad(rec) + weight * grad(gan), as in taming.
    assert rel_err(got_total, want_rec + want_weight * want_gan) <= 1e-5
