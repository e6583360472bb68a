"""The VAR / MVAR / M-VAR generator as a trainer task (``config.task = 'generator'``).

The transformer learns the token pyramid of a frozen VQVAE: the batch is
tokenized on the device (or read from the token cache), each step trains one
segment of the schedule (MVAR's ``ratio_k``:1:...:1 cycle, VAR's and M-VAR's
whole pyramid; in progressive training cut to the stage's scales), the evaluation
is a grid of class-conditional samples and, every ``val_every`` steps, each scale's
loss and accuracy on the validation split (the official ``eval_ep``), and the export
is a model directory (VQVAE + transformer) for ``sample.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mvar_jax import checkpoint, data, parallel, sampling
from mvar_jax.images import image_grid
from mvar_jax.models import families
from mvar_jax.models.config import InitScales, TransformerConfig
from mvar_jax.models.transformer import Transformer, unstack_blocks
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig, split_scales
from mvar_jax.training import optimizer, progressive, state as state_lib, step as step_lib
from mvar_jax.training.metrics_writer import MetricsWriter, announce
from mvar_jax.training.task import Batch, StepFn, from_config, open_eval_source
from mvar_jax.training.workdir import Architecture
from mvar_jax.weights import transformer as transformer_weights

# Execution choices that leave the params unchanged, so a run may resume with others
# (e.g. neighborhood_impl='reference' when the Pallas kernel fails on a GPU).
EXECUTION_FIELDS = ("neighborhood_impl", "dtype", "mamba_inference_chunk_size", "remat")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on generator settings that cannot train.

    Architecture checks that need the tokenizer (vocabulary, token pyramid, kernel
    size vs map size) happen in ``transformer_config``.
    """
    try:
        families.get(config.model.family)
    except ValueError as e:
        raise ValueError(f"config.model.family: {e}") from e
    sections = (
        ("init", InitScales),
        ("optim", optimizer.OptimizerConfig),
        ("progressive", progressive.ProgressiveConfig),
    )
    for section, cls in sections:
        from_config(section, cls, config[section])
    if config.ratio_k < 1:
        raise ValueError(f"config.ratio_k={config.ratio_k} must be >= 1")
    if config.sample_every < 0:
        raise ValueError(f"config.sample_every={config.sample_every} must be >= 0 (0: never)")
    if config.sample_every:
        _check_sampling(config)
    for name in ("val_every", "val_images"):
        if config[name] < 0:
            raise ValueError(f"config.{name}={config[name]} must be >= 0 (0: {_ZERO_MEANS[name]})")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
    k = config.grad_accum_steps
    if not isinstance(k, int) or k < 1 or config.batch_size % k:
        raise ValueError(
            f"config.grad_accum_steps={k!r} must be a whole number >= 1 that divides "
            f"config.batch_size={config.batch_size} (the batch of one update)"
        )
    if not os.path.exists(config.vqvae_checkpoint):
        raise ValueError(
            f"config.vqvae_checkpoint: not found: {config.vqvae_checkpoint} ({_tokenizer_advice(config)})"
        )
    if config.finetune_from and not os.path.exists(config.finetune_from):
        raise ValueError(f"config.finetune_from: not found: {config.finetune_from!r}")


def _tokenizer_advice(config: ml_collections.ConfigDict) -> str:
    """What to do about a missing ``vqvae_checkpoint``, for the kind of file it names."""
    if str(config.vqvae_checkpoint).endswith(".pth"):
        return (
            "download the release's vae_ch160v4096z32.pth from huggingface.co/FoundationVision/var, "
            "or point config.vqvae_checkpoint at a tokenizer directory"
        )
    return (
        "a tokenizer or model directory: `make demo` trains the demo's into demo_out/tokenizer/model; "
        "`python train.py --config configs/vqvae_tiny_cpu.py --workdir DIR` trains one into DIR/model"
    )


_ZERO_MEANS = {"val_every": "never", "val_images": "the whole split"}


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    """The sample-grid settings, checked up front rather than at the first grid hours in."""
    classes, num_classes = tuple(config.sample_classes), config.data.num_classes
    if not classes:
        raise ValueError("config.sample_classes is empty; set classes or config.sample_every=0")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"config.sample_classes {bad} outside [0, config.data.num_classes={num_classes})")
    from_config("sampling", sampling.SamplingOptions, config.sampling)


def load_tokenizer(path: str | os.PathLike, patch_nums: tuple[int, ...] | None) -> tuple[VQVAEConfig, Any]:
    """The frozen VQVAE: an official ``.pth``, a tokenizer directory or a generator model's VQVAE.

    ``patch_nums``: the run's token pyramid; None takes the one the tokenizer
    directory records (an official ``.pth`` records none: the release's 256 px
    pyramid). It does not change the weights.
    """
    return checkpoint.load_vqvae_checkpoint(path, None if patch_nums is None else tuple(patch_nums))


def transformer_config(config: ml_collections.ConfigDict, vqvae_config: VQVAEConfig) -> TransformerConfig:
    """``config.model`` as a ``TransformerConfig``, with what the tokenizer and data decide.

    The vocabulary and latent width come from the tokenizer, the number of
    classes from the data, the pyramid from the tokenizer unless the config sets
    one. Raises ValueError when the images do not fit the pyramid, or on an
    architecture the family cannot run (such as a kernel larger than a map).
    """
    fields = {**config.model, "patch_nums": vqvae_config.patch_nums}
    if config.data.image_size != vqvae_config.image_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} does not fit the token pyramid: "
            f"patch_nums {vqvae_config.patch_nums} at the VQVAE's {vqvae_config.downsample}x "
            f"downsampling need {vqvae_config.image_size} px images"
        )
    model = from_config(
        "model",
        TransformerConfig,
        {
            **fields,
            "vocab_size": vqvae_config.vocab_size,
            "cvae": vqvae_config.z_channels,
            "num_classes": config.data.num_classes,
        },
    )
    try:
        families.of(model)
        families.get(model.family).schedule(model, config.ratio_k)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from e
    return model


def finetune_params(path: str | os.PathLike, model_config: TransformerConfig) -> Any:
    """Transformer params (the tree under 'params') to start from, checked against the model.

    ``path``: an official VAR/MVAR ``.pth`` (the official ``--finetune_from_var``
    loads ``var_d*.pth`` into MVAR: same keys) or a model directory written by
    ``mvar_jax.convert`` or a previous training run.
    """
    if os.path.isdir(path):
        bundle = checkpoint.load_model(path)
        source_config, params = bundle.transformer_config, unstack_blocks(bundle.transformer_params)
    else:
        source_config, params = transformer_weights.load_transformer(
            path,
            family=model_config.family,
            patch_nums=model_config.patch_nums,
            kernel_size=model_config.kernel_size,
            refine_step=model_config.refine_step,
        )
    fields = (
        "vocab_size",
        "cvae",
        "num_classes",
        "depth",
        "embed_dim",
        "num_heads",
        "mlp_ratio",
        "shared_aln",
        "attn_l2_norm",
        "patch_nums",
    )
    differ = [
        f"{f}: checkpoint {getattr(source_config, f)} vs config {getattr(model_config, f)}"
        for f in fields
        if getattr(source_config, f) != getattr(model_config, f)
    ]
    if differ:
        raise ValueError(f"config.finetune_from={path!r} does not fit the model: " + "; ".join(differ))
    return params["params"]


def _tokenizer(vqvae: VQVAE, patch_nums: tuple[int, ...]):
    """Images (or cached token ids) -> the step's inputs: ids, teacher-forcing input, label."""

    def tokenize(vqvae_params: Any, batch: Batch) -> Batch:
        if "tokens" in batch:
            ids = split_scales(batch["tokens"], patch_nums)
        else:
            ids = vqvae.apply(vqvae_params, data.to_pm1(batch["image"]), method=VQVAE.img_to_idx)
        x_BLCv = vqvae.apply(vqvae_params, ids, method=VQVAE.idx_to_var_input)
        return {"label": batch["label"], "tokens": jnp.concatenate(ids, axis=1), "x_BLCv": x_BLCv}

    return tokenize


class GeneratorTask:
    """The transformer's part of training (``task.Task``); the VQVAE stays frozen."""

    finite_metrics = ("loss", "grad_norm", "param_norm")
    check_config = staticmethod(check_config)

    def __init__(self, config: ml_collections.ConfigDict, *, mesh: Mesh, num_steps: int):
        self._config = config
        micro = config.batch_size // config.grad_accum_steps
        if micro % mesh.size:  # each device must hold its share of every micro-batch
            raise ValueError(
                f"config.batch_size={config.batch_size} in config.grad_accum_steps={config.grad_accum_steps} "
                f"micro-batches of {micro} does not split over {mesh.size} devices"
            )
        vqvae_config, vqvae_params = load_tokenizer(config.vqvae_checkpoint, config.model.patch_nums)
        self._model = Transformer(transformer_config(config, vqvae_config))
        self.architecture = Architecture(
            "transformer_config.json", self._model.config.to_dict(), EXECUTION_FIELDS
        )
        self.eval_every = math.gcd(config.sample_every, config.val_every)  # each is a multiple
        self._mesh = mesh
        self._vqvae = VQVAE(vqvae_config)
        # On the mesh, so that every host can take part in saving them with the export.
        self._vqvae_params = jax.device_put(vqvae_params, parallel.replicated(mesh))
        self._tokenize = jax.jit(
            _tokenizer(self._vqvae, self._model.config.patch_nums),
            in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
            out_shardings=parallel.batch_sharding(mesh),
        )
        optim = optimizer.OptimizerConfig(**config.optim)
        progression = progressive.ProgressiveConfig(**config.progressive)
        if progression.enabled:  # as the official arg_util.py does
            optim = dataclasses.replace(optim, schedule=progression.lr_schedule)
        self._tx, self._learning_rate = optimizer.make_optimizer(
            optim,
            global_batch_size=config.batch_size,
            total_steps=num_steps,
            decay_mask=optimizer.official_decay_mask,
        )
        self._schedule = families.get(self._model.config.family).schedule(self._model.config, config.ratio_k)
        try:
            self._curriculum = progressive.Curriculum(
                self._schedule,
                num_scales=self._model.config.num_scales,
                total_steps=num_steps,
                lr_warmup_steps=optim.warmup_fraction * num_steps,
                progressive=progression,
            )
        except ValueError as e:
            raise ValueError(f"config.progressive: {e}") from e
        self._rng = jax.random.PRNGKey(config.seed)
        self._val_source = None
        if config.val_every:
            self._val_source = open_eval_source(config.data, config.val_batch_size, mesh)
            self._val_sums = jax.jit(
                functools.partial(step_lib.validation_sums, self._model, self._schedule.segments)
            )

    def _fresh_state(self) -> state_lib.TrainState:
        """Official init (traced: jit it to place the params)."""
        params = state_lib.init_params(self._model.config, InitScales(**self._config.init), self._rng)
        return state_lib.create_train_state(params, self._tx, self._rng)

    def abstract_state(self) -> state_lib.TrainState:
        return jax.eval_shape(self._fresh_state)

    def init_state(self, shardings: Any) -> state_lib.TrainState:
        """Fresh (official init) or fine-tuned params, born with their shardings."""
        if not self._config.finetune_from:
            return jax.jit(self._fresh_state, out_shardings=shardings)()
        params = jax.device_put(
            finetune_params(self._config.finetune_from, self._model.config), shardings.params
        )
        create = jax.jit(
            lambda p: state_lib.create_train_state(p, self._tx, self._rng), out_shardings=shardings
        )
        return create(params)

    def train_steps(self) -> list[StepFn]:
        """One step per segment (per segment and stage in progressive training): each has
        its own static shapes."""
        return [
            step_lib.make_train_step(
                self._model,
                self._tx,
                self._learning_rate,
                plan.segment,
                label_smoothing=self._config.label_smoothing,
                grad_accum_steps=self._config.grad_accum_steps,
                ramp=plan.ramp,
            )
            for plan in self._curriculum.plans
        ]

    def step_index(self, step: int) -> int:
        return self._curriculum.index_at(step)

    def prepare_batch(self, batch: Batch) -> Batch:
        return self._tokenize(self._vqvae_params, batch)

    def summarize(self, step: int, scalars: Mapping[str, float]) -> tuple[str, dict[str, str]]:
        segment = self._curriculum.plan_at(step - 1).segment  # the last step's
        line = (
            f"loss {scalars['loss']:.4f}, lr {scalars['learning_rate']:.3g}, "
            f"grad_norm {scalars['grad_norm']:.3g}"
        )
        return line, {"loss": f"{scalars['loss']:.4f}", "seg": segment.name(self._model.config.patch_nums)}

    def _bundle(self, state: state_lib.TrainState) -> checkpoint.ModelBundle:
        return checkpoint.ModelBundle(
            self._vqvae.config, self._vqvae_params, self._model.config, {"params": state.params}
        )

    def evaluate(self, state: state_lib.TrainState, step: int, writer: MetricsWriter) -> None:
        """The sample grid every ``sample_every`` steps, validation every ``val_every``."""
        c = self._config
        if c.sample_every and step % c.sample_every == 0:
            self._sample_grid(state, step, writer)
        if c.val_every and step % c.val_every == 0:
            self._validate(state, step, writer)

    def _validate(self, state: state_lib.TrainState, step: int, writer: MetricsWriter) -> None:
        """Each scale's teacher-forced cross-entropy and accuracy over the first ``val_images``
        validation images (0: all); ``val/loss`` weighs every token 1 / L, as the training loss."""
        c, cfg = self._config, self._model.config
        totals, source = None, self._val_source
        source.reset()
        try:
            for host_batch in source:
                batch = parallel.host_batch_to_global(host_batch, self._mesh)
                mask = batch.pop("mask")
                sums = self._val_sums(state.params, self._tokenize(self._vqvae_params, batch), mask)
                sums = jax.device_get(sums)
                totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
                if c.val_images and totals["count"] >= c.val_images:
                    break
        finally:
            source.close()
        count = float(totals["count"])
        ce_S, acc_S = totals["ce_S"] / count, totals["acc_S"] / count
        tokens_S = np.array([pn * pn for pn in cfg.patch_nums])
        scalars = {"val/loss": float(ce_S @ tokens_S / tokens_S.sum()), "val/images": count}
        for pn, ce, acc in zip(cfg.patch_nums, ce_S, acc_S):
            scalars[f"val/ce/{pn}x{pn}"], scalars[f"val/acc/{pn}x{pn}"] = float(ce), float(acc)
        writer.write_scalars(step, scalars)
        announce(
            f"validation at step {step}: loss {scalars['val/loss']:.4f}, accuracy per scale "
            + " ".join(f"{a:.1f}%" for a in acc_S)
            + f" ({count:.0f} images)"
        )

    def _sample_grid(self, state: state_lib.TrainState, step: int, writer: MetricsWriter) -> None:
        """Samples ``config.sample_classes`` with the current params: a ``samples`` grid."""
        c = self._config
        samples = sampling.sample(
            self._bundle(state),
            np.asarray(c.sample_classes),
            jax.random.fold_in(jax.random.PRNGKey(c.seed), step),
            sampling.SamplingOptions(**c.sampling),
        )
        images = multihost_utils.process_allgather(samples.images, tiled=True)
        grid = image_grid(np.asarray(images), columns=min(8, len(c.sample_classes)))
        writer.write_image("samples", grid, step)

    def export(self, state: state_lib.TrainState, model_dir: pathlib.Path) -> None:
        bundle = self._bundle(state)
        checkpoint.save_model(
            model_dir,
            vqvae_config=bundle.vqvae_config,
            vqvae_params=bundle.vqvae_params,
            transformer_config=bundle.transformer_config,
            transformer_params=bundle.transformer_params,
            overwrite=True,
        )
