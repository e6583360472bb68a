"""512 px: the official VAR with shared AdaLN (VAR-d36-s's layout) on the 512 pyramid, against the
fixtures the official code made (README in tests/fixtures/var_512), and the 512 px configs."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import VAR_512, convert_tiny, load_arrays, rel_err

from mvar_jax import checkpoint, convert, sampling
from mvar_jax.configs import mvar_512, var_d36
from mvar_jax.models import transformer
from mvar_jax.models.config import PATCH_NUMS_512
from mvar_jax.models.vqvae import VQVAEConfig
from mvar_jax.sampling.options import SamplingOptions
from mvar_jax.training import generator
from mvar_jax.weights import transformer as transformer_weights
from mvar_jax.weights.state_dict import load_state_dict

WEIGHTS = VAR_512 / "tiny_var512_saln.pth"


@pytest.fixture(scope="module")
def io() -> dict[str, np.ndarray]:
    return load_arrays(VAR_512 / "tiny_var512_io.npz")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, fixture_dir):
    """The tiny 512 px VAR and the fixtures' VQVAE, converted by the CLI with no pyramid given."""
    out = tmp_path_factory.mktemp("var_512") / "model"
    convert_tiny(fixture_dir, "--var", WEIGHTS, out)
    return out


def test_teacher_forcing_matches_official(io):
    config, params = transformer_weights.load_transformer(WEIGHTS, family="var")
    assert config.patch_nums == PATCH_NUMS_512 and config.seq_len == 2240 and config.shared_aln
    logits = jax.jit(transformer.Transformer(config).apply, static_argnames=("first_scale", "last_scale"))(
        params, io["label"], io["x_BLCv_wo_first_l"], first_scale=0, last_scale=10
    )
    assert rel_err(logits, io["var512_logits"]) < 1e-5


def test_greedy_sampling_matches_official(model_dir, io):
    bundle = checkpoint.load_model(model_dir)
    assert bundle.vqvae_config.patch_nums == PATCH_NUMS_512 and bundle.vqvae_config.image_size == 512
    out = sampling.sample(
        bundle, io["label"], jax.random.PRNGKey(0), SamplingOptions(cfg=1.5, top_k=1, top_p=0.0, decode=False)
    )
    assert out.tokens.shape == (2, 2240)
    # Equal f_hat: the same token chosen at every position of every scale.
    assert rel_err(out.f_hat, io["var512_greedy_fhat"].transpose(0, 2, 3, 1)) < 1e-5


def test_the_way_back_gives_the_file_again(model_dir, tmp_path):
    out = tmp_path / "var512.pth"
    convert.main(["--to_official_var", str(out), "--model", str(model_dir)])
    exported, original = load_state_dict(out), load_state_dict(WEIGHTS)
    assert set(exported) - set(original) == {"attn_bias_for_masking"}  # the fixture leaves it out
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # With its mask buffer the file tells its family and pyramid by itself.
    assert transformer_weights.config_from_state_dict(exported).family == "var"


@pytest.mark.parametrize(
    "get_config,family,depth,shared_aln",
    [(var_d36.get_config, "var", 36, True), (lambda: mvar_512.get_config("d16"), "mvar", 16, False)],
)
def test_512_configs_build_their_models(get_config, family, depth, shared_aln):
    """The configs at the release tokenizer's 512 px pyramid (an official .pth records none)."""
    c = get_config()
    tokenizer = VQVAEConfig(patch_nums=tuple(c.model.patch_nums))  # the release's, at 512 px
    model = generator.transformer_config(c, tokenizer)
    assert (model.family, model.depth, model.shared_aln, model.patch_nums) == (
        family,
        depth,
        shared_aln,
        PATCH_NUMS_512,
    )
    assert c.data.image_size == tokenizer.image_size == 512
    if family == "mvar":  # the two largest maps, 24x24 and 32x32, attend in 7x7 neighbourhoods
        assert (model.refine_step, model.kernel_size) == (8, 7)
    if depth == 36:  # the release's layout: every key and shape of var_d36.pth
        shapes = transformer_weights.official_shapes(model)
        assert shapes["shared_ada_lin.1.weight"] == (6 * 2304, 2304) and shapes["pos_1LC"] == (1, 2240, 2304)
