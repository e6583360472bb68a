"""The class-conditional transformer over a token pyramid, for every family.

One model serves VAR, MVAR and M-VAR; what differs (the blocks' attention
pattern, the block itself, the inference state) comes from the config's family
(``models.families``).

Teacher forcing (training, parity tests)::

    logits = model.apply(params, label_B, x_BlCv, first_scale=0, last_scale=8)

Inference, one scale at a time (the sampler owns the loop, CFG and the VQVAE)::

    x, cond = model.apply(params, label_B, method=Transformer.start_input)
    state = families.of(config).init_state(config, batch)   # None for MVAR
    for si in range(config.num_scales):
      if si: x = model.apply(params, h_BlCv, si, method=Transformer.scale_input)
      logits, state = model.apply(params, x, cond, si, state,
                                  method=Transformer.scale_logits)

Scale indices (``first_scale``, ``last_scale``, ``si``) are static Python ints:
jit with ``static_argnames`` and each scale compiles once.

Params keep one subtree per block (``blocks_0`` ... ``blocks_{depth-1}``), the
layout of checkpoints and converters. ``stack_blocks`` turns them into one
``blocks`` subtree with a leading depth axis, which ``Transformer(config,
scan_blocks=True)`` runs with ``jax.lax.scan``: one compiled block per scale
instead of ``depth`` (the sampler's compile time), and the per-block weight
casts stay inside the loop. ``unstack_blocks`` is the inverse.

``config.remat`` trades a training step's memory for FLOPs (``config.REMATS``):
'attention' recomputes the attention probabilities in the backward pass
(``attention.dense_attention``'s lean backward), 'block' each whole block when its
gradient arrives (``recompute.recomputed``): one block's activations in memory
instead of every block's, for a third more FLOPs. Same params, same numbers up to
float rounding; under 'block' the drop-path masks come from another key stream.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mvar_jax.models import attention, families, recompute
from mvar_jax.models.config import InitScales, TransformerConfig
from mvar_jax.models.kv_compression import CompressedKV
from mvar_jax.models.layers import AdaLNBeforeHead, init_std, normal_init


class Transformer(nn.Module):
    """Class start token, the family's blocks, logits over the VQ vocabulary.

    ``init_scales`` matters to ``init`` alone; ``Transformer(config)`` applies any params.
    """

    config: TransformerConfig
    init_scales: InitScales = InitScales()
    scan_blocks: bool = False  # params from stack_blocks, blocks run by lax.scan (inference)

    def setup(self):
        cfg = self.config
        self.family = families.of(cfg)
        C, std = cfg.embed_dim, init_std(cfg)
        # Embeddings and head stay float32 (the official code runs them outside autocast).
        self.word_embed = nn.Dense(C, kernel_init=normal_init(std))
        self.class_emb = nn.Embed(cfg.num_classes + 1, C, embedding_init=normal_init(std))
        self.lvl_embed = nn.Embed(cfg.num_scales, C, embedding_init=normal_init(std))
        self.pos_start = self.param("pos_start", normal_init(std), (cfg.first_l, C))
        self.pos_embed = self.param("pos_embed", normal_init(std), (cfg.seq_len, C))
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Dense(6 * C, dtype=cfg.compute_dtype, kernel_init=normal_init(std))
        if self.scan_blocks:
            self.stacked_blocks = self.param("blocks", stacked_blocks_init(cfg, self.init_scales))
        else:
            self.blocks = [
                self.family.block(cfg, self.family.attend, rate, init_scales=self.init_scales)
                for rate in self._drop_path_rates()
            ]
        self.head_nm = AdaLNBeforeHead(cfg, init_scales=self.init_scales)
        self.head = nn.Dense(cfg.vocab_size, kernel_init=normal_init(std * self.init_scales.head))

    def __call__(
        self,
        label_B: jax.Array,
        x_BlCv: jax.Array | None,
        *,
        first_scale: int,
        last_scale: int,
        train: bool = False,
    ) -> jax.Array:
        """Teacher-forcing logits ``(B, l, V)`` (float32) for scales ``[first_scale, last_scale)``.

        Args:
          label_B: int class labels; ``num_classes`` is the null (unconditional) class.
          x_BlCv: the VQVAE's teacher-forcing input. With ``first_scale == 0`` it
            excludes the ``first_l`` start tokens (the official
            ``x_BLCv_wo_first_l[:, :l - first_l]``; may be None when l == first_l),
            otherwise it is the input of exactly these scales.
          first_scale, last_scale: static ints. A family whose scales read every
            earlier one (VAR, M-VAR) needs ``first_scale == 0``; MVAR accepts any
            range, each scale attending as it does at inference (its training
            schedule uses ``[0, refine_step)``, then one scale at a time).
          train: enables class dropout and drop path (rng stream 'dropout').
        """
        cfg = self.config
        if not self.family.any_first_scale and first_scale != 0:
            raise ValueError(
                f"{self.family.title} teacher forcing reads every earlier scale, so it must "
                f"start at scale 0; got first_scale={first_scale} (use scale_logits with "
                f"its inference state)"
            )
        begin, end = cfg.token_range(first_scale, last_scale)
        B = label_B.shape[0]
        n_start = cfg.first_l if first_scale == 0 else 0
        n_in = end - begin - n_start
        if x_BlCv is None and n_in == 0:
            x_BlCv = jnp.zeros((B, 0, cfg.cvae), jnp.float32)
        if x_BlCv is None or x_BlCv.shape != (B, n_in, cfg.cvae):
            raise ValueError(
                f"x_BlCv for scales [{first_scale}, {last_scale}) must have shape "
                f"{(B, n_in, cfg.cvae)}, got {None if x_BlCv is None else x_BlCv.shape}"
            )

        if train and cfg.cond_drop_rate > 0:
            dropped = jax.random.uniform(self.make_rng("dropout"), (B,)) < cfg.cond_drop_rate
            label_B = jnp.where(dropped, cfg.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        x_BlC = self.word_embed(x_BlCv.astype(jnp.float32))
        if first_scale == 0:
            x_BlC = jnp.concatenate([self._start_tokens(cond_BD), x_BlC], axis=1)
        x_BlC = x_BlC + self._level_and_position(first_scale, last_scale)
        h_BlC, _ = self._blocks(x_BlC, cond_BD, first_scale, last_scale, deterministic=not train, cache=None)
        return self._logits(h_BlC, cond_BD)

    def start_input(self, label_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scale-0 input ``(B, first_l, C)`` and the condition ``cond_BD`` for ``label_B``.

        For classifier-free guidance, call it on the labels concatenated with
        ``num_classes`` (the null class) and keep the doubled batch throughout.
        """
        cond_BD = self.class_emb(label_B)
        return self._start_tokens(cond_BD) + self._level_and_position(0, 1), cond_BD

    def scale_input(self, h_BlCv: jax.Array, si: int) -> jax.Array:
        """Input tokens ``(B, pn*pn, C)`` of scale ``si`` >= 1.

        ``h_BlCv``: ``(B, pn*pn, Cvae)``, the VQVAE's next autoregressive input
        (f_hat so far, resized to scale si), row-major over (h, w).
        """
        if not 1 <= si < self.config.num_scales:
            raise ValueError(
                f"scale_input is for scales 1..{self.config.num_scales - 1}, "
                f"got si={si} (scale 0 comes from start_input)"
            )
        n = self.config.patch_nums[si] ** 2
        if h_BlCv.ndim != 3 or h_BlCv.shape[1:] != (n, self.config.cvae):
            raise ValueError(
                f"h_BlCv for scale {si} must be (B, {n}, {self.config.cvae}), got {h_BlCv.shape}"
            )
        return self.word_embed(h_BlCv.astype(jnp.float32)) + self._level_and_position(si, si + 1)

    def scale_logits(
        self, x_BlC: jax.Array, cond_BD: jax.Array, si: int, cache: Any = None
    ) -> tuple[jax.Array, Any]:
        """Logits ``(B, pn*pn, V)`` of scale ``si`` from its input tokens.

        ``cache``: the family's inference state (``Family.init_state``, then what
        the previous scale returned), None for MVAR, whose scales are
        self-contained. VAR's KV cache gets this scale's keys and values at its
        offsets; M-VAR's Mamba states are advanced by this scale's tokens. The
        state has a fixed size, so each ``si`` compiles once.
        """
        cfg = self.config
        if not 0 <= si < cfg.num_scales:
            raise ValueError(f"si must be in [0, {cfg.num_scales}), got {si}")
        if (cache is None) == self.family.carries_state:
            needs = "needs the state of Family.init_state" if cache is None else "carries no state"
            raise ValueError(f"{self.family.title} inference {needs} between scales")
        n = cfg.patch_nums[si] ** 2
        if x_BlC.ndim != 3 or x_BlC.shape[1:] != (n, cfg.embed_dim):
            raise ValueError(f"x_BlC for scale {si} must be (B, {n}, {cfg.embed_dim}), got {x_BlC.shape}")
        if cache is not None and not self.scan_blocks and len(cache) != cfg.depth:
            raise ValueError(f"cache has {len(cache)} blocks, the model {cfg.depth}")
        h_BlC, cache = self._blocks(x_BlC, cond_BD, si, si + 1, deterministic=True, cache=cache)
        return self._logits(h_BlC, cond_BD), cache

    def _start_tokens(self, cond_BD: jax.Array) -> jax.Array:
        return cond_BD[:, None, :] + self.pos_start[None]

    def _level_and_position(self, first_scale: int, last_scale: int) -> jax.Array:
        """``(1, l, C)`` level embedding plus absolute position of the scales' tokens."""
        begin, end = self.config.token_range(first_scale, last_scale)
        levels = attention.scale_ids(self.config.patch_nums, first_scale, last_scale)
        return (self.lvl_embed(jnp.asarray(levels)) + self.pos_embed[begin:end])[None]

    def _blocks(self, x_BlC, cond_BD, first_scale, last_scale, *, deterministic, cache):
        cfg = self.config
        if cfg.shared_aln:
            cond = self.shared_ada_lin(nn.silu(cond_BD)).reshape(-1, 6, cfg.embed_dim)
        else:
            cond = cond_BD
        if self.scan_blocks:
            if not deterministic:
                raise ValueError(
                    "scanned blocks are for inference: train with the per-block params (scan_blocks=False)"
                )
            return self._scanned_blocks(x_BlC, cond, first_scale, last_scale, cache)
        if self.config.remat == "block" and not deterministic and not self.is_initializing():
            return self._recomputed_blocks(x_BlC, cond, first_scale, last_scale), None
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_BlC, block_cache = block(
                x_BlC, cond, first_scale, last_scale, deterministic, None if cache is None else cache[i]
            )
            new_cache.append(block_cache)
        return x_BlC, None if cache is None else tuple(new_cache)

    def _drop_path_rates(self) -> list[float]:
        """Stochastic depth of each block, rising linearly from 0 (the official ``dpr``)."""
        return [float(r) for r in np.linspace(0.0, self.config.drop_path_rate, self.config.depth)]

    def _recomputed_blocks(self, x_BlC, cond, first_scale, last_scale):
        """Training blocks whose backward pass keeps only their inputs (``config.remat``)."""
        cfg, params = self.config, self.variables["params"]
        key = self.make_rng("dropout")
        for i, rate in enumerate(self._drop_path_rates()):
            block = self.family.block(
                cfg, self.family.attend, rate, init_scales=self.init_scales, parent=None
            )
            run = functools.partial(
                self._apply_block, block, jax.random.fold_in(key, i), first_scale, last_scale
            )
            x_BlC = recompute.recomputed(run, tie=(1, 2))(params[f"blocks_{i}"], x_BlC, cond)
        return x_BlC

    @staticmethod
    def _apply_block(block, key, first_scale, last_scale, params, x_BlC, cond):
        """One training block, applied to its params alone (no cache)."""
        rngs = {"dropout": key}
        return block.apply({"params": params}, x_BlC, cond, first_scale, last_scale, False, rngs=rngs)[0]

    def _scanned_blocks(self, x_BlC, cond, first_scale, last_scale, cache):
        """The blocks as one ``lax.scan`` over the stacked params and cache (``stack_cache``).

        A state kept in place (VAR's KV cache) is carried whole and this scale's
        keys and values written into it; a per-block state (M-VAR's) goes in and
        comes out as the scan's inputs and outputs.
        """
        cfg = self.config
        block = self.family.block(cfg, self.family.attend, parent=None)  # Applied to each layer's params.
        begin, end = cfg.token_range(first_scale, last_scale)
        # A compressed KV cache changes size from scale to scale: it goes in and out per block.
        in_place = self.family.state_in_place and not isinstance(cache, CompressedKV)
        carried, scanned = (cache, None) if in_place else (None, cache)

        def step(carry, layer):
            x_BlC, kv = carry
            params, i, block_cache = layer
            if kv is not None:
                block_cache = tuple(full[i] for full in kv)
            x_BlC, block_cache = block.apply(
                {"params": params},
                x_BlC,
                cond,
                first_scale=first_scale,
                last_scale=last_scale,
                cache=block_cache,
            )
            if kv is not None:  # Only this scale's keys and values are new.
                kv = tuple(
                    jax.lax.dynamic_update_slice(full, new[None, :, begin:end], (i, 0, begin, 0, 0))
                    for full, new in zip(kv, block_cache)
                )
                block_cache = None
            return (x_BlC, kv), block_cache

        (x_BlC, carried), scanned = jax.lax.scan(
            step, (x_BlC, carried), (self.stacked_blocks, jnp.arange(cfg.depth), scanned)
        )
        return x_BlC, carried if in_place else scanned

    def _logits(self, h_BlC: jax.Array, cond_BD: jax.Array) -> jax.Array:
        return self.head(self.head_nm(h_BlC.astype(jnp.float32), cond_BD)).astype(jnp.float32)


def stack_cache(cache: tuple[Any, ...] | None) -> Any:
    """A per-block inference state (``Family.init_state``, ``m_var.init_rerun_cache``) with its
    blocks' leaves stacked on a leading depth axis, the form ``scan_blocks`` carries."""
    return None if cache is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *cache)


@functools.cache
def stacked_blocks_init(config: TransformerConfig, scales: InitScales) -> Any:
    """``rng -> params`` of every block, stacked on a leading depth axis.

    Jitted and cached per config: Flax checks a param's shape by tracing its
    initialiser on every ``apply``, which the sampler calls twice per scale.
    """
    family = families.of(config)
    block = family.block(config, family.attend, init_scales=scales, parent=None)
    cond_shape = (1, 6, config.embed_dim) if config.shared_aln else (1, config.embed_dim)

    def init(rng: jax.Array) -> Any:
        x_BlC, cond = jnp.zeros((1, config.first_l, config.embed_dim)), jnp.zeros(cond_shape)
        return jax.vmap(lambda key: block.init(key, x_BlC, cond, first_scale=0, last_scale=1)["params"])(
            jax.random.split(rng, config.depth)
        )

    return jax.jit(init)


def _block_names(depth: int) -> list[str]:
    return [f"blocks_{i}" for i in range(depth)]


def blocks_are_stacked(variables: Mapping[str, Any]) -> bool:
    """Whether ``{'params': ...}`` holds the blocks stacked (``stack_blocks``) or one per block."""
    return "blocks" in variables["params"]


def stack_blocks(variables: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """``{'params': ...}`` with ``blocks_0`` ... ``blocks_{depth-1}`` replaced by one
    ``blocks`` subtree whose leaves carry a leading depth axis (for ``scan_blocks``).

    A new copy of the block weights: drop the per-block tree to free its memory.
    """
    params = dict(variables["params"])
    missing = [name for name in _block_names(depth) if name not in params]
    if missing:
        raise ValueError(f"stack_blocks: per-block params {missing} not found")
    blocks = [params.pop(name) for name in _block_names(depth)]
    params["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    return {**variables, "params": params}


def unstack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``stack_blocks``: one ``blocks_<i>`` subtree per block again."""
    params = dict(variables["params"])
    stacked = params.pop("blocks")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i, name in enumerate(_block_names(depth)):
        params[name] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return {**variables, "params": params}


def _init_fn(config: TransformerConfig, scales: InitScales = InitScales()):
    """``rng -> variables``: teacher forcing on the start token alone touches every param."""
    model = Transformer(config, init_scales=scales)
    label_B = jnp.zeros((1,), jnp.int32)
    return lambda rng: model.init(rng, label_B, None, first_scale=0, last_scale=1)


def init_params(
    config: TransformerConfig, rng: jax.Array, scales: InitScales = InitScales()
) -> dict[str, Any]:
    """Fresh ``{'params': ...}``: the official initialisation recipe with ``scales``."""
    return jax.jit(_init_fn(config, scales))(rng)


def param_shapes(config: TransformerConfig, *, stacked: bool = False) -> dict[str, Any]:
    """``{'params': ...}`` of ``jax.ShapeDtypeStruct`` (no allocation), per block or ``stacked``."""
    shapes = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))
    return jax.eval_shape(lambda p: stack_blocks(p, config.depth), shapes) if stacked else shapes
