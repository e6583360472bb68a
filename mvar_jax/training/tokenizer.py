"""The multi-scale VQVAE tokenizer as a trainer task (``config.task = 'tokenizer'``).

The VQVAE learns to reconstruct images through its token pyramid with the
official training forward (``VQVAE.train_forward``): a reconstruction loss (L1
and/or L2, optionally LPIPS), the VQ loss, and from ``config.gan.start`` on a
PatchGAN's generator loss with VQGAN's adaptive weight, while the discriminator
trains beside it with its own optimizer. Each step also records the codebook's
usage (``mvar_jax.training.codebook``) and, optionally, re-seeds the codes that no scale
chose for ``config.codebook.dead_after`` steps, zeroing their Adam moments so
that the stale statistics of the old vector do not push the new one. The
evaluation reconstructs validation images (PSNR, SSIM, per-scale usage, an
input|reconstruction grid); the export is a tokenizer directory
(``checkpoint.save_tokenizer``) that generator configs accept as
``vqvae_checkpoint``.

Two train steps: the first ``gan.start`` steps never touch the discriminator
(no forward, no update); the GAN step from then on (``step_index``).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from mvar_jax import checkpoint, data, parallel
from mvar_jax.eval import image_metrics
from mvar_jax.images import image_grid
from mvar_jax.models import discriminator, lpips
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig
from mvar_jax.training import codebook, optimizer
from mvar_jax.training.metrics_writer import MetricsWriter, announce
from mvar_jax.training.task import Batch, Metrics, StepFn, from_config, open_eval_source
from mvar_jax.training.workdir import Architecture
from mvar_jax.weights import lpips as weights_lpips

# The codebook's path in the VQVAE params (and so in the Adam moments).
CODEBOOK_PATH = ("quantize", "embedding", "embedding")


@flax.struct.dataclass
class TokenizerState:
    step: jax.Array  # int32 (): optimizer steps taken so far
    params: Any  # VQVAE params (the tree under 'params')
    opt_state: optax.OptState
    codebook: codebook.CodebookState
    rng: jax.Array  # base key; step t draws from fold_in(rng, t) (dead-code re-seeding)
    disc_params: Any = None  # PatchDiscriminator params; None without a GAN
    disc_opt_state: optax.OptState = None


def vqvae_config(config: ml_collections.ConfigDict) -> VQVAEConfig:
    """The architecture from ``config.model``, checked against ``config.data.image_size``."""
    vc = from_config("model", VQVAEConfig, config.model)
    size = config.data.image_size
    if vc.image_size != size:
        raise ValueError(
            f"config.model.patch_nums={vc.patch_nums} do not fit config.data.image_size={size}: "
            f"ch_mult {vc.ch_mult} downsamples {vc.downsample}x, so the last patch_num must be "
            f"image_size / {vc.downsample} = {size / vc.downsample:g}"
        )
    return vc


def _check_weight(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"config.{name}={value} must be finite and >= 0")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on tokenizer settings that cannot train.

    The discriminator's start is checked against the run's length in the
    constructor, where the number of steps is known.
    """
    vc = vqvae_config(config)
    if vc.vocab_size < 2:
        raise ValueError(f"config.model.vocab_size={vc.vocab_size}: a codebook needs >= 2 codes")
    if config.data.token_cache_dir:
        raise ValueError(
            "config.data.token_cache_dir is set: the tokenizer trains on images, not on cached tokens"
        )
    size = config.data.image_size
    loss = config.loss
    for name in ("l1", "l2", "vq", "lpips"):
        _check_weight(f"loss.{name}", loss[name])
    if loss.l1 + loss.l2 + loss.lpips == 0:
        raise ValueError("no reconstruction loss: set config.loss.l1, loss.l2 or loss.lpips > 0")
    if loss.lpips:
        if size < 16:
            raise ValueError(f"config.loss.lpips needs images of >= 16 px, got {size}")
        weights_lpips.check_lpips_files(loss.lpips_vgg, loss.lpips_lin)
    from_config("optim", optimizer.OptimizerConfig, config.optim)
    gan = config.gan
    _check_weight("gan.weight", gan.weight)
    if gan.weight:
        if gan.loss not in discriminator.D_LOSSES:
            raise ValueError(
                f"config.gan.loss={gan.loss!r}; expected one of {sorted(discriminator.D_LOSSES)}"
            )
        if gan.start < 0:
            raise ValueError(f"config.gan.start={gan.start} must be >= 0")
        if gan.n_layers < 1 or gan.ndf < 1 or discriminator.patch_grid_size(size, gan.n_layers) < 1:
            raise ValueError(
                f"config.gan: a {gan.n_layers}-layer discriminator (ndf {gan.ndf}) "
                f"does not fit {size} px images"
            )
        from_config("gan.optim", optimizer.OptimizerConfig, gan.optim)
    from_config("codebook", codebook.CodebookConfig, config.codebook)
    if config.eval_every < 0:
        raise ValueError(f"config.eval_every={config.eval_every} must be >= 0 (0: never)")
    if config.eval_every:
        if config.eval_images < 1 or config.eval_batch_size < 1:
            raise ValueError(
                f"config.eval_images={config.eval_images} and "
                f"config.eval_batch_size={config.eval_batch_size} must be positive"
            )
        if not 0 <= config.grid_images <= config.eval_batch_size:
            raise ValueError(
                f"config.grid_images={config.grid_images} must be in [0, "
                f"eval_batch_size={config.eval_batch_size}]"
            )
        if size < image_metrics.SSIM_WINDOW:
            raise ValueError(
                f"the evaluation's SSIM needs images of >= {image_metrics.SSIM_WINDOW} px, got {size}"
            )


def make_optimizer(
    o: ml_collections.ConfigDict, config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One of the task's optimizers (the VQVAE's or the discriminator's): weight decay, if any,
    on kernels and the codebook (arrays of >= 2 dims)."""
    return optimizer.make_optimizer(
        optimizer.OptimizerConfig(**o),
        global_batch_size=config.batch_size,
        total_steps=total_steps,
        decay_mask=optimizer.matrix_decay_mask,
    )


_MOMENT_STATES = (optax.ScaleByAdamState, optax.ScaleByLionState)


def reset_code_moments(opt_state: optax.OptState, rows_V: jax.Array) -> optax.OptState:
    """Zeroes the optimizer's moments (Adam's mu and nu, Lion's mu) of the codebook rows
    ``rows_V`` (bool ``(V,)``).

    A re-seeded code starts like a fresh parameter: without this its first
    updates would follow the momentum of the dead vector it replaced.
    """

    def reset(path, x):
        keys = tuple(getattr(k, "key", None) for k in path)
        return jnp.where(rows_V[:, None], 0, x) if keys == CODEBOOK_PATH else x

    def per_state(s):
        if isinstance(s, _MOMENT_STATES):
            moments = [f for f in ("mu", "nu") if f in s._fields]
            return s._replace(**{f: jax.tree_util.tree_map_with_path(reset, getattr(s, f)) for f in moments})
        return s

    return jax.tree.map(per_state, opt_state, is_leaf=lambda s: isinstance(s, _MOMENT_STATES))


def _decoder_norm_out(module: nn.Module, method_name: str) -> bool:
    """capture_intermediates filter: the decoder's last norm (its output, after silu, is
    the input of ``conv_out``, the layer the adaptive GAN weight is measured at)."""
    del method_name
    return module.name == "norm_out" and module.parent is not None and module.parent.name == "decoder"


def _value_and_cotangent(fn, x: jax.Array) -> tuple[tuple[jax.Array, Any], jax.Array]:
    """``fn(x) -> (loss, aux)``: ``((loss, aux), dloss/dx)``, the cotangent a constant."""
    loss, pullback, aux = jax.vjp(fn, x, has_aux=True)
    return (loss, aux), jax.lax.stop_gradient(pullback(jnp.ones_like(loss))[0])


def _conv_out(h_BHWC: jax.Array, bias: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """The decoder's ``conv_out`` (3x3, padding 1) as a function of its kernel."""

    def apply(kernel):
        y = jax.lax.conv_general_dilated(
            h_BHWC, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + bias

    return apply


class TokenizerTask:
    """The VQVAE's part of training (``task.Task``), with an optional discriminator."""

    check_config = staticmethod(check_config)

    def __init__(self, config: ml_collections.ConfigDict, *, mesh: Mesh, num_steps: int):
        self._config, self._mesh = config, mesh
        self._vqvae_config = vqvae_config(config)
        self._model = VQVAE(self._vqvae_config)
        self.architecture = Architecture("vqvae_config.json", self._vqvae_config.to_dict())
        gan = config.gan
        self._gan = bool(gan.weight)
        if self._gan and gan.start >= num_steps:
            raise ValueError(
                f"config.gan.start={gan.start} is past the run's end ({num_steps} "
                "steps): the discriminator would never train; lower it or set "
                "config.gan.weight=0"
            )
        self._disc = discriminator.PatchDiscriminator(ndf=gan.ndf, n_layers=gan.n_layers)
        self._tx, self._learning_rate = make_optimizer(config.optim, config, num_steps)
        self._disc_tx = make_optimizer(gan.optim, config, num_steps)[0] if self._gan else None
        self._lpips_params = None
        if config.loss.lpips:
            self._lpips_params = jax.device_put(
                weights_lpips.load_lpips(config.loss.lpips_vgg, config.loss.lpips_lin),
                parallel.replicated(mesh),
            )
        self.finite_metrics = ("loss", "grad_norm") + (("gan/d_loss",) if self._gan else ())
        self.eval_every = config.eval_every
        self._eval_source = None
        if self.eval_every:
            self._eval_source = open_eval_source(config.data, config.eval_batch_size, mesh)
            self._eval_step = jax.jit(
                self._reconstruct,
                in_shardings=(
                    parallel.replicated(mesh),
                    parallel.batch_sharding(mesh),
                    parallel.batch_sharding(mesh),
                ),
                out_shardings=parallel.replicated(mesh),
            )

    # ------------------------------------------------------------------ state

    def _fresh_state(self) -> TokenizerState:
        """Flax default init of both networks (traced: jit it to place the params)."""
        size = self._vqvae_config.image_size
        img = jnp.zeros((1, size, size, 3), jnp.float32)
        k_model, k_disc, k_state = jax.random.split(jax.random.PRNGKey(self._config.seed), 3)
        params = self._model.init(k_model, img)["params"]
        state = TokenizerState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self._tx.init(params),
            codebook=codebook.init_state(len(self._vqvae_config.patch_nums), self._vqvae_config.vocab_size),
            rng=k_state,
        )
        if not self._gan:
            return state
        disc_params = self._disc.init(k_disc, img)["params"]
        return state.replace(disc_params=disc_params, disc_opt_state=self._disc_tx.init(disc_params))

    def abstract_state(self) -> TokenizerState:
        return jax.eval_shape(self._fresh_state)

    def init_state(self, shardings: Any) -> TokenizerState:
        return jax.jit(self._fresh_state, out_shardings=shardings)()

    # ------------------------------------------------------------------ steps

    def _reconstruction_loss(self, rec_BHW3: jax.Array, img_BHW3: jax.Array) -> tuple[jax.Array, Metrics]:
        """The weighted pixel (+ perceptual) loss on the unclamped reconstruction, and its terms."""
        loss = self._config.loss
        terms = {
            "rec/l1": image_metrics.l1_loss(rec_BHW3, img_BHW3),
            "rec/l2": image_metrics.l2_loss(rec_BHW3, img_BHW3),
        }
        total = loss.l1 * terms["rec/l1"] + loss.l2 * terms["rec/l2"]
        if loss.lpips:
            terms["rec/lpips"] = (
                lpips.LPIPS().apply({"params": self._lpips_params}, rec_BHW3, img_BHW3).mean()
            )
            total = total + loss.lpips * terms["rec/lpips"]
        return total, terms

    def _generator_loss(self, params: Any, disc_params: Any, img_BHW3: jax.Array, gan: bool):
        """VQVAE loss ``rec + vq * vq_loss (+ d_weight * g_loss)``; aux: (rec, quantizer, metrics)."""
        c = self._config
        if not gan:
            rec, q = self._model.apply({"params": params}, img_BHW3, method=VQVAE.train_forward)
            rec_loss, metrics = self._reconstruction_loss(rec, img_BHW3)
            return rec_loss + c.loss.vq * q.vq_loss, (rec, q, metrics)
        (rec, q), captured = self._model.apply(
            {"params": params},
            img_BHW3,
            method=VQVAE.train_forward,
            mutable=["intermediates"],
            capture_intermediates=_decoder_norm_out,
        )
        # The two losses' cotangents at the decoder output give their gradients at the
        # last kernel through that layer alone (discriminator.last_layer_grads).
        (rec_loss, metrics), rec_pull = _value_and_cotangent(
            lambda r: self._reconstruction_loss(r, img_BHW3), rec
        )
        (g_loss, _), g_pull = _value_and_cotangent(
            lambda r: (discriminator.generator_loss(self._disc.apply({"params": disc_params}, r)), None), rec
        )
        h = nn.silu(captured["intermediates"]["decoder"]["norm_out"]["__call__"][0])
        conv_out = params["decoder"]["conv_out"]
        g_rec, g_gan = discriminator.last_layer_grads(
            _conv_out(h, conv_out["bias"]), conv_out["kernel"], rec_pull, g_pull
        )
        if c.gan.adaptive:
            d_weight = discriminator.adaptive_weight(g_rec, g_gan, c.gan.weight)
        else:
            d_weight = jnp.float32(c.gan.weight)
        metrics = {**metrics, "gan/g_loss": g_loss, "gan/d_weight": d_weight}
        return rec_loss + c.loss.vq * q.vq_loss + d_weight * g_loss, (rec, q, metrics)

    def _codebook_update(
        self, state: TokenizerState, params: Any, opt_state: optax.OptState, q: Any
    ) -> tuple[TokenizerState, Metrics]:
        """Records the step's tokens; re-seeds dead codes (same rows on every device)."""
        c, vc = self._config, self._vqvae_config
        book = codebook.record(state.codebook, q.ids, window=c.codebook.window)
        metrics = codebook.metrics(
            book, vc.patch_nums, window=c.codebook.window, global_batch_size=c.batch_size
        )
        if c.codebook.dead_after:
            table = params["quantize"]["embedding"]["embedding"]
            restart = codebook.restart_dead_codes(
                table, book, q.z, jax.random.fold_in(state.rng, state.step), dead_after=c.codebook.dead_after
            )
            params = _with_codebook(params, restart.embedding_VC)
            opt_state = reset_code_moments(opt_state, restart.restarted_V)
            book = restart.state
            metrics["codebook/restarted"] = restart.num_restarted
        return state.replace(params=params, opt_state=opt_state, codebook=book), metrics

    def _make_train_step(self, gan: bool) -> StepFn:
        c = self._config

        def train_step(state: TokenizerState, batch: Batch) -> tuple[TokenizerState, Metrics]:
            img = data.to_pm1(batch["image"])
            grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
            (loss, (rec, q, metrics)), grads = grad_fn(state.params, state.disc_params, img, gan)
            updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {
                **metrics,
                "loss": loss,
                "vq_loss": q.vq_loss,
                "grad_norm": optax.global_norm(grads),
                "learning_rate": self._learning_rate(state.step),
                "psnr": image_metrics.psnr(jnp.clip(rec, -1, 1), img).mean(),
            }
            if gan:  # The discriminator learns from the same reconstructions, before the update.
                fake = jax.lax.stop_gradient(rec)

                def disc_loss(dp):
                    # Separate calls: its batch-statistics norm must not mix real and fake.
                    real_logits = self._disc.apply({"params": dp}, img)
                    fake_logits = self._disc.apply({"params": dp}, fake)
                    return (
                        discriminator.discriminator_loss(real_logits, fake_logits, c.gan.loss),
                        (real_logits.mean(), fake_logits.mean()),
                    )

                (d_loss, (real, fake_mean)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(
                    state.disc_params
                )
                d_updates, d_opt = self._disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
                state = state.replace(
                    disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt
                )
                metrics.update({"gan/d_loss": d_loss, "gan/logits_real": real, "gan/logits_fake": fake_mean})
            state, book_metrics = self._codebook_update(state, params, opt_state, q)
            return state.replace(step=state.step + 1), {**metrics, **book_metrics}

        return train_step

    def train_steps(self) -> list[StepFn]:
        """Before ``gan.start``: the VQVAE alone; from it on (with a GAN): both networks."""
        return [self._make_train_step(False)] + ([self._make_train_step(True)] if self._gan else [])

    def step_index(self, step: int) -> int:
        return int(self._gan and step >= self._config.gan.start)

    def prepare_batch(self, batch: Batch) -> Batch:
        return {"image": batch["image"]}  # uint8; the step maps it to [-1, 1]

    def summarize(self, step: int, scalars: Mapping[str, float]) -> tuple[str, dict[str, str]]:
        usage = np.mean([scalars[f"usage/{pn}x{pn}"] for pn in self._vqvae_config.patch_nums])
        line = (
            f"loss {scalars['loss']:.4f}, psnr {scalars['psnr']:.2f} dB, usage {usage:.1f}%, "
            f"lr {scalars['learning_rate']:.3g}"
        )
        if "gan/d_loss" in scalars:
            line += f", d_loss {scalars['gan/d_loss']:.3f}, d_weight {scalars['gan/d_weight']:.3g}"
        return line, {
            "loss": f"{scalars['loss']:.4f}",
            "psnr": f"{scalars['psnr']:.2f}",
            "usage": f"{usage:.0f}%",
        }

    # ------------------------------------------------------------- evaluation

    def _reconstruct(self, params: Any, image_u8: jax.Array, mask_B: jax.Array):
        """Inference reconstruction of an eval batch: PSNR, SSIM, mask ``(B,)``, the per-scale
        code hits ``(S, V)`` of the unmasked images, and ``grid_images`` (input,
        reconstruction) pairs ``(n, 2, H, W, 3)`` in [0, 1]."""
        img = data.to_pm1(image_u8)

        def run(model: VQVAE, x):
            ids, f_hats = model.quantize.quantize(model.encode(x))
            return ids, model.fhat_to_img(f_hats[-1])

        ids, rec = self._model.apply({"params": params}, img, method=run)
        V = self._vqvae_config.vocab_size
        hits_SV = jnp.stack(
            [
                jnp.bincount(
                    idx.reshape(-1), length=V, weights=jnp.repeat(mask_B, idx.shape[1]).astype(jnp.int32)
                )
                for idx in ids
            ]
        )
        n = self._config.grid_images
        return {
            "psnr": image_metrics.psnr(rec, img),
            "ssim": image_metrics.ssim(rec, img),
            "mask": mask_B,
            "hits": hits_SV,
            "pairs": jnp.stack([img[:n], rec[:n]], axis=1) * 0.5 + 0.5,
        }

    def evaluate(self, state: TokenizerState, step: int, writer: MetricsWriter) -> None:
        """PSNR/SSIM over the first ``eval_images`` validation images, the share of the
        codebook each scale uses on them, and an input|reconstruction grid."""
        c, vc = self._config, self._vqvae_config
        source = self._eval_source
        source.reset()
        psnr, ssim, hits_SV, grid = [], [], 0, None
        try:
            for host_batch in source:
                batch = parallel.host_batch_to_global(host_batch, self._mesh)
                out = jax.device_get(self._eval_step(state.params, batch["image"], batch["mask"]))
                psnr.append(out["psnr"][out["mask"]])
                ssim.append(out["ssim"][out["mask"]])
                hits_SV = hits_SV + out["hits"]
                if grid is None and c.grid_images:
                    pairs = out["pairs"]
                    grid = image_grid(pairs.reshape(-1, *pairs.shape[2:]), columns=8)
                if sum(len(p) for p in psnr) >= c.eval_images:
                    break
        finally:
            source.close()
        psnr, ssim = np.concatenate(psnr)[: c.eval_images], np.concatenate(ssim)[: c.eval_images]
        usage_S = 100 * (np.asarray(hits_SV) > 0).mean(axis=1)
        scalars = {
            "eval/psnr": float(psnr.mean()),
            "eval/ssim": float(ssim.mean()),
            "eval/images": float(len(psnr)),
            "eval/unreadable_images": float(source.num_bad_records),
            "eval/usage/all": float(100 * (np.asarray(hits_SV) > 0).any(0).mean()),
        }
        scalars.update({f"eval/usage/{pn}x{pn}": float(u) for pn, u in zip(vc.patch_nums, usage_S)})
        writer.write_scalars(step, scalars)
        if grid is not None:
            writer.write_image("reconstructions", grid, step)
        announce(
            f"eval at step {step}: psnr {scalars['eval/psnr']:.2f} dB, ssim "
            f"{scalars['eval/ssim']:.4f}, usage per scale "
            + " ".join(f"{u:.0f}%" for u in usage_S)
            + f" ({len(psnr)} images)"
        )

    def export(self, state: TokenizerState, model_dir: pathlib.Path) -> None:
        checkpoint.save_tokenizer(
            model_dir, vqvae_config=self._vqvae_config, vqvae_params={"params": state.params}, overwrite=True
        )


def _with_codebook(params: Any, table_VC: jax.Array) -> Any:
    """``params`` with the codebook replaced (a new dict along the path; leaves shared)."""
    quantize = {**params["quantize"], "embedding": {"embedding": table_VC}}
    return {**params, "quantize": quantize}
