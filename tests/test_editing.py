"""Zero-shot editing (``sampling.editing``): VAR against the official notebook's function on the
tiny fixture (``tiny_edit_io.npz``), and what must hold for every family."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from conftest import FIXTURES, MINI_VQVAE, load_arrays, mini_transformer

import sample
from mvar_jax import checkpoint, sampling
from mvar_jax.data import preprocess
from mvar_jax.models.transformer import param_shapes, stack_blocks
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig, abstract_variables
from mvar_jax.sampling import editing
from mvar_jax.sampling.sampler import Edit

TASKS = ("inpaint", "outpaint", "classedit")


@pytest.fixture(scope="module")
def edit_io() -> dict[str, np.ndarray]:
    return load_arrays(FIXTURES / "tiny_edit_io.npz")


@pytest.fixture(scope="module")
def tiny_var(tiny_checkpoints) -> checkpoint.ModelBundle:
    return checkpoint.load_model(tiny_checkpoints["var"])


@pytest.mark.parametrize("task", TASKS)
def test_box_masks_are_the_notebooks(edit_io, task):
    box, inpaint = edit_io[f"{task}_box_y0x0y1x1"], bool(edit_io[f"{task}_inpainting"])
    np.testing.assert_array_equal(editing.box_keep_mask(16, box, inpaint=inpaint), edit_io[f"{task}_mask"])


def test_the_given_images_tokens_are_the_officials(edit_io, tiny_var):
    images = edit_io["input_img"].transpose(0, 2, 3, 1)
    tokens = editing.image_tokens(tiny_var, np.clip((images + 1) / 2, 0, 1))
    np.testing.assert_array_equal(tokens, edit_io["input_tokens_BL"])


@pytest.mark.parametrize("task", TASKS)
def test_var_edits_as_the_official_notebook(edit_io, tiny_var, task):
    given = edit_io["input_tokens_BL"]
    edit = editing.make_edit(tiny_var, given, edit_io[f"{task}_mask"])
    options = sampling.SamplingOptions(cfg=float(edit_io[f"{task}_cfg"]), top_k=1, top_p=0.0)
    out = sampling.sample(tiny_var, edit_io[f"{task}_labels"], jax.random.PRNGKey(0), options, edit=edit)
    np.testing.assert_allclose(
        np.asarray(out.images), edit_io[f"{task}_greedy_img"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0
    )
    tokens, keep = np.asarray(out.tokens), np.asarray(edit.keep)
    np.testing.assert_array_equal(tokens[keep], given[keep])
    drawn = ~keep & (edit_io[f"{task}_greedy_margin"] >= 1e-4)  # the official choices, near-ties aside
    assert drawn.sum() > 100
    np.testing.assert_array_equal(tokens[drawn], edit_io[f"{task}_greedy_tokens"][drawn])


def test_keep_masks_follow_the_notebooks_resize():
    # 16 -> 8 samples halfway between two tokens: a half-kept pair is generated (0.5 is not > 0.5).
    keep = np.zeros((1, 16, 16), np.float32)
    keep[0, :, :5] = 1
    per_scale = editing.keep_per_scale(keep, (1, 8, 16)).astype(int)
    assert per_scale[0, 0] == 1  # at most 3 tokens: kept whatever the mask
    np.testing.assert_array_equal(per_scale[0, 1:65].reshape(8, 8)[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(per_scale[0, 65:].reshape(16, 16), keep[0])


def test_bad_edits_are_refused(tiny_var):
    with pytest.raises(ValueError, match="need 0 <= y0 < y1 <= 1"):
        editing.box_keep_mask(16, (0.5, 0.1, 0.4, 0.9), inpaint=True)
    with pytest.raises(ValueError, match="covers no token"):
        editing.box_keep_mask(16, (0.50, 0.1, 0.51, 0.9), inpaint=True)
    with pytest.raises(ValueError, match=r"keep mask must be \(16, 16\) or \(1, 16, 16\)"):
        editing.make_edit(tiny_var, np.zeros((1, 680), np.int32), np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"images must be \(B, 256, 256, 3\)"):
        editing.image_tokens(tiny_var, np.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"edit arrays must be"):
        edit = Edit(np.zeros((1, 680), np.int32), np.zeros((1, 680), bool))
        sampling.sample(tiny_var, [1, 2], jax.random.PRNGKey(0), edit=edit)


# Every family on a small random model (scales 1, 2, 4; 8 px images).


def _mini(family: str) -> checkpoint.ModelBundle:
    patch_nums = (1, 2, 4)
    vqvae_config = VQVAEConfig(**{**MINI_VQVAE, "ch_mult": (1, 2)}, patch_nums=patch_nums)
    tcfg = mini_transformer(
        num_classes=5, depth=1, embed_dim=32, num_heads=2, patch_nums=patch_nums, refine_step=2
    )
    tcfg = dataclasses.replace(tcfg, family=family)
    rng = np.random.default_rng(0)

    def normal(abstract, std):
        return jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, std, leaf.shape), jnp.float32), abstract)

    transformer = stack_blocks(normal(param_shapes(tcfg), 0.3), tcfg.depth)
    return checkpoint.ModelBundle(
        vqvae_config, normal(abstract_variables(vqvae_config), 0.2), tcfg, transformer
    )


@pytest.mark.parametrize("family", ["mvar", "var", "m_var"])
def test_every_family_keeps_what_it_is_told(family):
    model = _mini(family)
    labels, key = np.array([1, 3, 5]), jax.random.PRNGKey(7)  # 5: the null class, unconditional
    options = sampling.SamplingOptions(cfg=2.0, top_k=4, top_p=0.9)
    plain = sampling.sample(model, labels, key, options)
    given = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 21), 0, MINI_VQVAE["vocab_size"]))
    # Nothing kept: the plain samples of the same key, whatever the given tokens.
    none_kept = sampling.sample(model, labels, key, options, edit=Edit(given, np.zeros((3, 21), bool)))
    np.testing.assert_array_equal(none_kept.tokens, plain.tokens)
    np.testing.assert_array_equal(none_kept.images, plain.images)
    # Everything kept: the given image's reconstruction.
    all_kept = sampling.sample(
        model, labels, key, options, edit=editing.make_edit(model, given, np.ones((4, 4)))
    )
    np.testing.assert_array_equal(all_kept.tokens, given)
    ids = [jnp.asarray(given[:, a:b]) for a, b in ((0, 1), (1, 5), (5, 21))]
    reconstruction = VQVAE(model.vqvae_config).apply(model.vqvae_params, ids, method=VQVAE.idx_to_img)
    np.testing.assert_allclose(all_kept.images, (np.asarray(reconstruction) + 1) / 2, atol=1e-6, rtol=0)
    # A box: its kept positions hold the given tokens at every scale; the rest is drawn anew.
    edit = editing.make_edit(model, given, editing.box_keep_mask(4, (0.25, 0.25, 0.75, 0.75), inpaint=True))
    boxed = np.asarray(sampling.sample(model, labels, key, options, edit=edit).tokens)
    keep = np.asarray(edit.keep)
    assert keep[:, 0].all() and not keep[:, 5:].all() and keep[:, 5:].any()
    np.testing.assert_array_equal(boxed[keep], given[keep])
    assert (boxed[~keep] != given[~keep]).any()


# The command line: sample.py --edit_image.


def _edit_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        sample.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error: ") and "\n" not in err, err
    return err


def test_the_command_line_outpaints_as_the_notebook(edit_io, tiny_checkpoints, tmp_path):
    given = tmp_path / "given.npz"
    np.savez(given, images=np.clip((edit_io["input_img"].transpose(0, 2, 3, 1) + 1) / 2, 0, 1))
    out = tmp_path / "edited.npz"
    box = ",".join(str(v) for v in edit_io["outpaint_box_y0x0y1x1"])
    greedy = ["--cfg", "3", "--top_k", "1", "--top_p", "0"]
    sample.main(
        ["--checkpoint", str(tiny_checkpoints["var"]), "--edit_image", str(given), "--edit_box", box]
        + ["--edit_mode", "outpaint", "--unconditional", *greedy, "--out", str(out)]
    )
    with np.load(out) as f:
        np.testing.assert_allclose(
            f["images"], edit_io["outpaint_greedy_img"].transpose(0, 2, 3, 1), atol=1e-4
        )
        np.testing.assert_array_equal(f["labels"], [10, 10])


def test_the_command_line_refuses_bad_edits(capsys, tiny_checkpoints, tmp_path):
    ckpt = ["--checkpoint", str(tiny_checkpoints["mvar"]), "--top_k", "4", "--out", str(tmp_path / "x.npz")]
    image = tmp_path / "photo.png"
    PIL.Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(image)
    edit = [*ckpt, "--edit_image", str(image), "--labels", "3"]
    assert "--edit_box, --edit_mode need --edit_image" in _edit_error(
        capsys, [*ckpt, "--edit_box", "0,0,1,1", "--edit_mode", "outpaint"]
    )
    assert "needs one of --edit_box" in _edit_error(capsys, edit)
    assert "0 <= y0 < y1 <= 1" in _edit_error(capsys, [*edit, "--edit_box", "0.2,0.1,1.2,0.5"])
    assert "0 <= y0 < y1 <= 1" in _edit_error(capsys, [*edit, "--edit_box", "0.2,0.1"])
    assert "covers no token of the 16x16 grid" in _edit_error(
        capsys, [*edit, "--edit_box", "0.5,0.1,0.51,0.9"]
    )
    err = _edit_error(capsys, [*ckpt, "--edit_image", str(image), "--edit_box", "0,0,.5,.5"])
    assert "needs --labels (the class to draw) or --unconditional" in err
    assert "[12]" in _edit_error(
        capsys, [*ckpt, "--edit_image", str(image), "--edit_box", "0,0,.5,.5", "--labels", "12"]
    )
    pair = tmp_path / "pair.npz"
    np.savez(pair, images=np.zeros((2, 256, 256, 3), np.float32))
    err = _edit_error(
        capsys, [*ckpt, "--edit_image", str(pair), "--labels", "3,4,5", "--edit_box", "0,0,.5,.5"]
    )
    assert "3 labels for 2 images" in err
    black, small = tmp_path / "black.png", tmp_path / "small.png"
    PIL.Image.fromarray(np.zeros((256, 256), np.uint8)).save(black)
    PIL.Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    assert "nothing would be generated" in _edit_error(capsys, [*edit, "--edit_mask", str(black)])
    assert "expected the image's 256x256 or the token grid's 16x16" in _edit_error(
        capsys, [*edit, "--edit_mask", str(small)]
    )
    (tmp_path / "broken.png").write_bytes(b"not a png")
    err = _edit_error(
        capsys,
        [*ckpt, "--edit_image", str(tmp_path / "broken.png"), "--labels", "3", "--edit_box", "0,0,.5,.5"],
    )
    assert "not an image" in err
    err = _edit_error(capsys, [*edit, "--edit_box", "0,0,.5,.5", "--fid_npz", str(tmp_path / "f.npz")])
    assert "editing writes --out alone" in err


def test_a_mask_file_edits_a_photo(tiny_var, tiny_checkpoints, tmp_path):
    image, mask = tmp_path / "photo.jpg", tmp_path / "mask.png"
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (300, 400, 3), np.uint8)).save(image)
    white_box = np.zeros((256, 256), np.uint8)
    white_box[64:192, 64:192] = 255  # generate the centre, given at the image's resolution
    PIL.Image.fromarray(white_box).save(mask)
    out = tmp_path / "edited.npz"
    greedy = ["--cfg", "3", "--top_k", "1", "--top_p", "0"]  # the parity tests' compiled program
    sample.main(
        ["--checkpoint", str(tiny_checkpoints["var"]), "--edit_image", str(image), "--edit_mask", str(mask)]
        + ["--labels", "4,7", *greedy, "--out", str(out)]  # one photo, redrawn as each class
    )
    with np.load(out) as f:
        tokens, labels = f["tokens"], f["labels"]
    np.testing.assert_array_equal(labels, [4, 7])
    with PIL.Image.open(image) as decoded:  # the JPEG as stored, then the evaluation crop
        given = preprocess.Preprocess(256)(decoded.convert("RGB"), None)
    keep = editing.keep_per_scale(
        1 - white_box[None, ::16, ::16] / 255, tiny_var.transformer_config.patch_nums
    )[0]
    photo_tokens = editing.image_tokens(tiny_var, given[None] / 255)[0]
    np.testing.assert_array_equal(tokens[:, keep], np.stack([photo_tokens[keep]] * 2))  # kept: the photo's
    assert (tokens[:, ~keep] != photo_tokens[~keep]).any()  # the centre: drawn anew
    assert (tokens[0, ~keep] != tokens[1, ~keep]).any()  # as class 4, and as class 7
