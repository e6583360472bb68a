"""The train loop: set-up from a config, exact resume, the segment cycle, logging, export.

``train_and_evaluate(config, workdir)`` is everything ``train.py`` does. The
work directory holds::

    checkpoints/<step>/   Orbax train state + data position (keep-last-N)
    tensorboard/          event files
    samples/              sample grids every ``sample_every`` steps
    model/                the final model (mvar_jax.checkpoint), for sample.py;
                          model/exported_step.json says which train step it holds
    transformer_config.json  the architecture, checked when resuming
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from mvar_jax import checkpoint, data, parallel, sampling, transformer_weights
from mvar_jax.data import config as data_config
from mvar_jax.training import checkpointing, optimizer, schedule
from mvar_jax.training import state as state_lib
from mvar_jax.training import step as step_lib
from mvar_jax.transformer import Transformer, TransformerConfig
from mvar_jax.vqvae import VQVAE, VQVAEConfig, split_scales

MODEL_NAMES = ("mvar", "var")


# Execution choices that leave the params unchanged, so a run may resume with others
# (e.g. neighborhood_impl='reference' when the Pallas kernel fails on a GPU).
EXECUTION_FIELDS = ("neighborhood_impl", "dtype")
_EXPORTED_STEP = "exported_step.json"


def total_steps(config: ml_collections.ConfigDict, num_examples: int | None = None) -> int:
    """``num_train_steps``, else epochs of ``ceil(examples / batch)`` steps (the official
    sampler's ``iters_train``, which fills the last batch).

    ``num_examples``: the train split's size as the data source reports it; it wins
    over ``config.num_train_examples`` (ImageNet's count by default).
    """
    if config.num_train_steps > 0:
        return config.num_train_steps
    examples = config.num_train_examples if num_examples is None else num_examples
    return config.num_epochs * math.ceil(examples / config.batch_size)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the field, on settings that cannot train.

    Architecture checks that need the tokenizer (vocabulary, kernel size vs map
    size) happen in ``transformer_config``.
    """
    m = config.model
    if m.name not in MODEL_NAMES:
        raise ValueError(f"config.model.name={m.name!r} is unknown; expected one of {MODEL_NAMES}")
    schedule.make_schedule(m.name, len(m.patch_nums), refine_step=m.refine_step,
                           ratio_k=config.ratio_k)  # raises on refine_step / ratio_k
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size={config.batch_size} must be positive")
    if total_steps(config) <= 0:
        raise ValueError("nothing to train: set config.num_epochs (with num_train_examples) or "
                         "config.num_train_steps to a positive value")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if config[name] <= 0:
            raise ValueError(f"config.{name}={config[name]} must be positive")
    if config.sample_every < 0:
        raise ValueError(f"config.sample_every={config.sample_every} must be >= 0 (0: never)")
    if config.sample_every:
        _check_sampling(config)
    if config.init.std != -1:
        raise ValueError(f"config.init.std={config.init.std}: only the official automatic init "
                         "(-1, std = sqrt(1 / (3 * embed_dim))) is implemented")
    o = config.optim
    if o.base_lr <= 0 or not math.isfinite(o.base_lr):
        raise ValueError(f"config.optim.base_lr={o.base_lr} must be positive and finite")
    if o.schedule not in optimizer.SCHEDULES:
        raise ValueError(f"config.optim.schedule={o.schedule!r}; expected one of "
                         f"{optimizer.SCHEDULES}")
    if not 0 <= o.warmup_fraction < 1:
        raise ValueError(f"config.optim.warmup_fraction={o.warmup_fraction} must be in [0, 1)")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
    if not os.path.exists(config.vqvae_checkpoint):
        raise ValueError(f"config.vqvae_checkpoint: not found: {config.vqvae_checkpoint!r} "
                         "(download vae_ch160v4096z32.pth from the VAR release)")
    if config.finetune_from and not os.path.exists(config.finetune_from):
        raise ValueError(f"config.finetune_from: not found: {config.finetune_from!r}")
    data_config.check_config(config.data)


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    """The sample-grid settings, checked up front rather than at the first grid hours in."""
    classes, num_classes = tuple(config.sample_classes), config.data.num_classes
    if not classes:
        raise ValueError("config.sample_classes is empty; set classes or config.sample_every=0")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"config.sample_classes {bad} outside [0, config.data.num_classes="
                         f"{num_classes})")
    if config.sample_top_k < 0:
        raise ValueError(f"config.sample_top_k={config.sample_top_k} must be >= 0 (0: off)")
    if not 0 <= config.sample_top_p <= 1:
        raise ValueError(f"config.sample_top_p={config.sample_top_p} must be in [0, 1]")


def load_tokenizer(path: str | os.PathLike, patch_nums: tuple[int, ...]
                   ) -> tuple[VQVAEConfig, Any]:
    """The frozen VQVAE: an official ``.pth``, a tokenizer directory or a model's VQVAE.

    The token pyramid (``patch_nums``) is the run's; it does not change the weights.
    """
    return checkpoint.load_vqvae_checkpoint(path, patch_nums)


def transformer_config(config: ml_collections.ConfigDict, vqvae_config: VQVAEConfig
                       ) -> TransformerConfig:
    """The architecture: the config's model section plus the tokenizer's vocabulary.

    Raises ValueError when the images do not fit the token pyramid, or (from
    TransformerConfig) on an invalid architecture such as a kernel larger than a map.
    """
    m = config.model
    if config.data.image_size != vqvae_config.image_size:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} does not fit the token pyramid: "
            f"patch_nums {tuple(m.patch_nums)} at the VQVAE's {vqvae_config.downsample}x "
            f"downsampling need {vqvae_config.image_size} px images")
    return TransformerConfig(
        vocab_size=vqvae_config.vocab_size, cvae=vqvae_config.z_channels,
        num_classes=config.data.num_classes, depth=m.depth, embed_dim=m.embed_dim,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, norm_eps=m.norm_eps,
        shared_aln=m.shared_aln, attn_l2_norm=m.attn_l2_norm, patch_nums=tuple(m.patch_nums),
        attention=m.name, kernel_size=m.kernel_size, refine_step=m.refine_step,
        drop_path_rate=0.1 * m.depth / 24 if m.drop_path_rate is None else m.drop_path_rate,
        cond_drop_rate=m.cond_drop_rate, dtype=m.dtype,
        neighborhood_impl=m.neighborhood_impl)


def finetune_params(path: str | os.PathLike, model_config: TransformerConfig) -> Any:
    """Transformer params (the tree under 'params') to start from, checked against the model.

    ``path``: an official VAR/MVAR ``.pth`` (the official ``--finetune_from_var``
    loads ``var_d*.pth`` into MVAR: same keys) or a model directory written by
    ``mvar_jax.convert`` or a previous training run.
    """
    if os.path.isdir(path):
        bundle = checkpoint.load_model(path)
        source_config, params = bundle.transformer_config, bundle.transformer_params
    else:
        source_config, params = transformer_weights.load_transformer(
            path, attention=model_config.attention, patch_nums=model_config.patch_nums,
            kernel_size=model_config.kernel_size, refine_step=model_config.refine_step)
    fields = ("vocab_size", "cvae", "num_classes", "depth", "embed_dim", "num_heads",
              "mlp_ratio", "shared_aln", "attn_l2_norm", "patch_nums")
    differ = [f"{f}: checkpoint {getattr(source_config, f)} vs config {getattr(model_config, f)}"
              for f in fields if getattr(source_config, f) != getattr(model_config, f)]
    if differ:
        raise ValueError(f"config.finetune_from={path!r} does not fit the model: "
                         + "; ".join(differ))
    return params["params"]


def _write_json_atomically(path: pathlib.Path, value: Any) -> None:
    """A crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _check_workdir_model(workdir: pathlib.Path, model_config: TransformerConfig) -> None:
    """Records the architecture on the first start; refuses to resume a different one.

    ``EXECUTION_FIELDS`` may differ between starts.
    """
    path = workdir / "transformer_config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        current = model_config.to_dict()
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in EXECUTION_FIELDS and saved.get(k) != current.get(k))
        if differ:
            raise ValueError(f"{workdir} holds a run of a different model (fields {differ}); "
                             "use a new --workdir")
    elif jax.process_index() == 0:
        _write_json_atomically(path, model_config.to_dict())


def _needs_export(model_dir: pathlib.Path, step: int) -> bool:
    """Whether ``model_dir`` lacks the params of train step ``step``, decided once for all hosts.

    An export that crashed before recording its step, or one from before an
    extended run, counts as missing. Every host must agree: saving is collective.
    """
    needed = True
    if jax.process_index() == 0:
        record = model_dir / _EXPORTED_STEP
        needed = not (record.exists() and (model_dir / checkpoint.PARAMS_DIR).exists()
                      and json.loads(record.read_text()).get("step") == step)
    return bool(multihost_utils.broadcast_one_to_all(np.int32(needed)))


def _export(model_dir: pathlib.Path, step: int, bundle: checkpoint.ModelBundle) -> None:
    """Writes (or replaces) the model directory, then records its step."""
    if jax.process_index() == 0:
        (model_dir / _EXPORTED_STEP).unlink(missing_ok=True)
    checkpoint.save_model(model_dir, vqvae_config=bundle.vqvae_config,
                          vqvae_params=bundle.vqvae_params,
                          transformer_config=bundle.transformer_config,
                          transformer_params=bundle.transformer_params, overwrite=True)
    if jax.process_index() == 0:
        _write_json_atomically(model_dir / _EXPORTED_STEP, {"step": step})


def _announce(message: str) -> None:
    """A line for the console (above the progress bar) and the log, from host 0."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)
    logging.info(message)


class _Logger:
    """Averaged step metrics to TensorBoard, the console and the log, from host 0."""

    def __init__(self, workdir: pathlib.Path, *, start: int, total: int, global_batch: int,
                 segment_names: list[str]):
        self._main = jax.process_index() == 0
        self._global_batch, self._segment_names = global_batch, segment_names
        self._writer = None
        if self._main:
            from tensorboardX import SummaryWriter  # Only host 0 writes events.
            self._writer = SummaryWriter(str(workdir / "tensorboard"))
        self._bar = tqdm.tqdm(total=total, initial=start, disable=not self._main,
                              desc="train", dynamic_ncols=True)
        self._since = time.perf_counter()

    def write(self, step: int, history: list[tuple[int, dict[str, np.ndarray]]]) -> None:
        """Averages each metric over the steps of ``history`` that report it.

        Per-scale metrics exist only on steps whose segment holds that scale.
        """
        sums, counts = defaultdict(float), defaultdict(int)
        for _, metrics in history:
            for k, v in metrics.items():
                sums[k] += float(v)
                counts[k] += 1
        now = time.perf_counter()
        scalars = {k: sums[k] / counts[k] for k in sums}
        scalars["images_per_sec"] = len(history) * self._global_batch / (now - self._since)
        self._since = now
        self._bar.update(len(history))
        self._bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                              seg=self._segment_names[history[-1][0]])
        if self._writer is not None:
            for k, v in scalars.items():
                self._writer.add_scalar(k, v, step)
            self._writer.flush()
        _announce(f"step {step}: loss {scalars['loss']:.4f}, lr {scalars['learning_rate']:.3g}, "
                  f"grad_norm {scalars['grad_norm']:.3g}, {scalars['images_per_sec']:.1f} img/s")
        logging.info("step %d: %s", step,
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))

    def image(self, tag: str, grid_HW3: np.ndarray, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, grid_HW3, step, dataformats="HWC")

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()


def _check_finite(history: list[tuple[int, dict[str, np.ndarray]]], first_step: int,
                  last_saved: int | None) -> None:
    """Raises on the first step of ``history`` whose loss, gradients or params overflowed."""
    for offset, (_, metrics) in enumerate(history):
        values = {k: float(metrics[k]) for k in ("loss", "grad_norm", "param_norm")}
        if not all(math.isfinite(v) for v in values.values()):
            kept = f"step {last_saved}" if last_saved is not None else "none saved yet"
            raise FloatingPointError(
                f"non-finite training values at step {first_step + offset + 1} ({values}); "
                f"stopped without saving this state. Last good checkpoint: {kept}")


def _make_tokenizer(vqvae: VQVAE, patch_nums: tuple[int, ...]):
    """Images (or cached token ids) -> the step's inputs: ids, teacher-forcing input, label."""
    def tokenize(vqvae_params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if "tokens" in batch:
            ids = split_scales(batch["tokens"], patch_nums)
        else:
            ids = vqvae.apply(vqvae_params, data.to_pm1(batch["image"]), method=VQVAE.img_to_idx)
        x_BLCv = vqvae.apply(vqvae_params, ids, method=VQVAE.idx_to_var_input)
        return {"label": batch["label"], "tokens": jnp.concatenate(ids, axis=1),
                "x_BLCv": x_BLCv}

    return tokenize


def _build_source(config: ml_collections.ConfigDict) -> Iterator:
    return data.build_train_source(
        config.data, global_batch_size=config.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       source: Iterator | None = None) -> state_lib.TrainState:
    """Trains to ``total_steps``, resuming from ``workdir`` if it holds a checkpoint.

    Args:
      source: iterator of per-host numpy batches (default: ``data.build_train_source``
        from ``config.data``) with ``get_state`` / ``set_state`` for exact resumption;
        its ``num_examples``, if it has one, sizes the epochs.
    Returns:
      The final train state (also exported to ``workdir/model``).
    """
    check_config(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)

    vqvae_config, vqvae_params = load_tokenizer(config.vqvae_checkpoint,
                                                tuple(config.model.patch_nums))
    model_config = transformer_config(config, vqvae_config)
    _check_workdir_model(workdir, model_config)
    model, vqvae = Transformer(model_config), VQVAE(vqvae_config)
    source = _build_source(config) if source is None else source
    try:
        state = _run(config, workdir, source, mesh=mesh, model=model, vqvae=vqvae,
                     vqvae_params=vqvae_params)
    finally:
        if hasattr(source, "close"):
            source.close()
    return state


def _steps_for(config: ml_collections.ConfigDict, source: Iterator) -> int:
    """``total_steps`` with the source's own split size when it reports one."""
    num_examples = getattr(source, "num_examples", None)
    if (num_examples is not None and config.num_train_steps <= 0
            and num_examples != config.num_train_examples):
        _announce(f"the data source holds {num_examples} train examples, not "
                  f"config.num_train_examples={config.num_train_examples}; epochs use "
                  f"{num_examples}")
    num_steps = total_steps(config, num_examples)
    if num_steps <= 0:
        raise ValueError(f"nothing to train: the data source holds {num_examples} examples")
    return num_steps


def _run(config, workdir, source, *, mesh, model, vqvae, vqvae_params) -> state_lib.TrainState:
    """Restores or initialises the state, trains what is left, exports the model."""
    model_config = model.config
    num_steps = _steps_for(config, source)
    tx, learning_rate = optimizer.make_optimizer(
        config.optim, global_batch_size=config.batch_size, total_steps=num_steps,
        warmup_steps=round(config.optim.warmup_fraction * num_steps))
    cycle = schedule.make_schedule(model_config.attention, model_config.num_scales,
                                   refine_step=model_config.refine_step, ratio_k=config.ratio_k)

    rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(
        lambda: state_lib.create_train_state(
            state_lib.init_params(model_config, config.init, rng), tx, rng))
    shardings = parallel.state_shardings(abstract_state, mesh, fsdp=config.parallel.fsdp,
                                         min_size=config.parallel.fsdp_min_size)
    # On the mesh, so that every host can take part in saving them with the export.
    vqvae_params = jax.device_put(vqvae_params, parallel.replicated(mesh))
    checkpointer = checkpointing.Checkpointer(
        workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpointing)
    try:
        start = checkpointer.latest_step()
        if start is not None:
            _announce(f"resuming {workdir} from step {start} of {num_steps}")
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                abstract_state, shardings)
            state, data_state = checkpointer.restore(start, abstract)
        else:
            start, data_state = 0, None
            state = _initial_state(config, model_config, tx, rng, shardings)
        if start < num_steps:
            state = _train(config, workdir, state, start, num_steps, data_state, mesh=mesh,
                           shardings=shardings, model=model, vqvae=vqvae,
                           vqvae_params=vqvae_params, tx=tx, learning_rate=learning_rate,
                           cycle=cycle, checkpointer=checkpointer, source=source)
        else:
            _announce(f"{workdir} is already trained ({start} of {num_steps} steps)")
        checkpointer.wait()
    finally:
        checkpointer.close()
    final_step = max(start, num_steps)  # the state's step, known on every host
    if _needs_export(workdir / "model", final_step):
        _export(workdir / "model", final_step,
                checkpoint.ModelBundle(vqvae.config, vqvae_params, model_config,
                                       {"params": state.params}))
        _announce(f"exported the model at step {final_step} to {workdir / 'model'}")
    return state


def _initial_state(config, model_config, tx, rng, shardings) -> state_lib.TrainState:
    """Fresh (official init) or fine-tuned params, born with their shardings."""
    if config.finetune_from:
        params = jax.device_put(finetune_params(config.finetune_from, model_config),
                                shardings.params)
        create = jax.jit(lambda p: state_lib.create_train_state(p, tx, rng),
                         out_shardings=shardings)
        return create(params)
    create = jax.jit(lambda: state_lib.create_train_state(
        state_lib.init_params(model_config, config.init, rng), tx, rng), out_shardings=shardings)
    return create()


def _train(config, workdir, state, start, num_steps, data_state, *, mesh, shardings, model,
           vqvae, vqvae_params, tx, learning_rate, cycle, checkpointer, source):
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    # Global batches assembled from every host's slice, two in flight; its state is
    # that of the last batch handed out, which is what a checkpoint must record.
    batches = data.DevicePrefetch(source, batch_sharding, size=2)
    if data_state is not None:
        batches.set_state(data_state)
    tokenize = jax.jit(_make_tokenizer(vqvae, model.config.patch_nums),
                       in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
    train_steps = [
        jax.jit(step_lib.make_train_step(model, tx, learning_rate, segment,
                                         label_smoothing=config.label_smoothing),
                in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                donate_argnums=0)
        for segment in cycle.segments]
    logger = _Logger(workdir, start=start, total=num_steps, global_batch=config.batch_size,
                     segment_names=[s.name(model.config.patch_nums) for s in cycle.segments])
    history: list[tuple[int, Any]] = []  # (segment index, device metrics) since the last log
    last_saved = checkpointer.latest_step()
    try:
        for step in range(start, num_steps):
            batch = tokenize(vqvae_params, next(batches))
            segment = cycle.index_at(step)
            state, metrics = train_steps[segment](state, batch)
            history.append((segment, metrics))
            done = step + 1
            save = done % config.checkpoint_every == 0 or done == num_steps
            if save or done % config.log_every == 0:
                history = jax.device_get(history)
                _check_finite(history, done - len(history), last_saved)
                logger.write(done, history)
                history = []
            if save:
                checkpointer.save(state, batches.get_state())
                last_saved = done
            if config.sample_every and done % config.sample_every == 0:
                bundle = checkpoint.ModelBundle(vqvae.config, vqvae_params, model.config,
                                                {"params": state.params})
                _sample_grid(config, workdir, logger, bundle, done)
    finally:
        logger.close()
    return state


def image_grid(images_BHW3: np.ndarray, columns: int) -> np.ndarray:
    """Images in [0, 1] tiled row-major into one uint8 ``(rows * H, columns * W, 3)`` image."""
    B, H, W, _ = images_BHW3.shape
    rows = -(-B // columns)
    padded = np.zeros((rows * columns, H, W, 3), np.float32)
    padded[:B] = images_BHW3
    grid = padded.reshape(rows, columns, H, W, 3).transpose(0, 2, 1, 3, 4)
    return np.round(np.clip(grid.reshape(rows * H, columns * W, 3), 0, 1) * 255).astype(np.uint8)


def _sample_grid(config, workdir, logger, bundle: checkpoint.ModelBundle, step: int) -> None:
    """Samples ``config.sample_classes`` with the current params; PNG + TensorBoard image."""
    samples = sampling.sample(bundle, np.asarray(config.sample_classes),
                              jax.random.fold_in(jax.random.PRNGKey(config.seed), step),
                              cfg=config.sample_cfg, top_k=config.sample_top_k,
                              top_p=config.sample_top_p)
    images = multihost_utils.process_allgather(samples.images, tiled=True)
    grid = image_grid(np.asarray(images), columns=min(8, len(config.sample_classes)))
    logger.image("samples", grid, step)
    if jax.process_index() == 0:
        (workdir / "samples").mkdir(exist_ok=True)
        PIL.Image.fromarray(grid).save(workdir / "samples" / f"step_{step:08d}.png")
