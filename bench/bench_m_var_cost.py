"""M-VAR sampling cost: our carried Mamba state vs the official re-run, in compiled FLOPs.

    python -m bench.bench_m_var_cost --out bench_out/m_var_cost            # M-VAR-d16, batch 64
    python -m bench.bench_m_var_cost --out /tmp/m_var_cost --smoke        # toy model

Nothing is allocated or run: each program is lowered with abstract inputs
(``jax.ShapeDtypeStruct``: no weights), compiled for the CPU, and XLA's
``cost_analysis()`` counts its floating-point operations, plus what it misses:
it counts a rolled loop's body once, so every Mamba2 scan's chunks past the first
(``mamba2.ssd_scan`` loops over the chunk boundaries) are added by hand
(``uncounted_scan_flops``, reported). M-VAR-d16 as released
(attn_l2_norm off), the released tokenizer, bfloat16 transformer, batch 64 with
classifier-free guidance (128 rows through the transformer), top-k 900, top-p
0.96 (the official FID settings).

* ``carried`` (ours): ``sampling.generate``; each scale's Mamba layers advance
  the state carried from the previous scale, so they see that scale's tokens
  only, in scan chunks of ``mamba_inference_chunk_size`` (16);
* ``official re-run``: the same from ``m_var.init_rerun_cache``, the official
  algorithm: at every scale each block's Mamba runs from scratch over all tokens
  so far, in mamba_ssm's chunks of 256, and keeps the outputs of the last scale's;
* ``re-run share``: what the official sampler spends on the re-running itself,
  i.e. on the Mamba branch (LayerNorm, modulation, Mamba2) of earlier scales'
  tokens: ``depth * sum_si [F256(scales <= si, outputs of scale si kept) - F256(scale si)]``
  with F_chunk from compiling that branch alone, as a share of the official sampler;
* ``state hand-on``: what carrying costs in its place: computing each scale's
  final Mamba state for the next (all scales but the last), which a re-run
  never needs: ``depth * sum_si [F16(scale si, final state kept) - F16(scale si)]``;
* ``chunking``: what ours saves on its own tokens by its smaller chunks:
  ``depth * sum_si [F256(scale si) - F16(scale si)]``; so
  ours ~ official - re-run share + state hand-on - chunking;
* per candidate chunk, ours' Mamba branches over all scales (state handed on):
  ``depth * sum_si F_chunk(scale si, final state kept but at the last)``, the
  measurement behind ``mamba_inference_chunk_size``.

Both samplers run without the VQVAE decode; the decoder's FLOPs (the same for
both) are on a row of their own. Target: ours is lower than the
official by at least the re-run's share. Writes ``results.md`` and
``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench import common
from mvar_jax import cli, sampling
from mvar_jax.models import m_var
from mvar_jax.models.config import TransformerConfig
from mvar_jax.models.layers import layer_norm, modulate
from mvar_jax.models.mamba2 import Mamba2
from mvar_jax.models.transformer import param_shapes
from mvar_jax.models.vqvae import VQVAE, VQVAEConfig, abstract_variables

OPTIONS = sampling.SamplingOptions(decode=False)  # the official FID filters: top-k 900, top-p 0.96
BATCH = 64
CHUNK_CANDIDATES = (8, 16, 32, 64, 256)


def model_configs(smoke: bool) -> tuple[VQVAEConfig, TransformerConfig]:
    """The released tokenizer and M-VAR-d16 at 256 px, or a toy for --smoke."""
    if smoke:  # the toy of the other benches, one block, two scales
        vqvae_config, config = common.toy_configs("m_var")
        patch_nums = config.patch_nums[:2]
        return (
            dataclasses.replace(vqvae_config, ch_mult=(1, 2), patch_nums=patch_nums),
            dataclasses.replace(config, depth=1, patch_nums=patch_nums, attn_l2_norm=False),
        )
    # Official README: d16 and d20 are released with attn_l2_norm=False.
    return VQVAEConfig(), TransformerConfig(family="m_var", depth=16, attn_l2_norm=False, dtype="bfloat16")


def flops(lowered: jax.stages.Lowered) -> float:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list):  # Older jax: one dict per computation.
        cost = cost[0]
    return float(cost["flops"])


def uncounted_scan_flops(config: TransformerConfig, rows: int, tokens: int, chunk_size: int) -> float:
    """What ``flops`` misses of one Mamba2 call: XLA counts a rolled loop's body once, and
    ``mamba2.ssd_scan`` loops over its chunk boundaries (``h * decay + input``, 2 FLOPs
    per state entry), so every chunk past the first is uncounted."""
    m = m_var.mamba_config(config)
    chunks = -(-tokens // min(chunk_size, tokens))
    return (chunks - 1) * 2 * rows * m.nheads * m.headdim * m.d_state


def sampler_flops(
    vqvae_config: VQVAEConfig, config: TransformerConfig, batch: int, *, rerun: bool
) -> tuple[float, float]:
    """FLOPs of one compiled ``sampling.generate`` call with guidance, without decode, and
    those of its Mamba scans' chunk boundaries that XLA does not count (included)."""
    sizes = [pn * pn for pn in config.patch_nums]
    if rerun:  # Every Mamba call runs over all scales so far.
        tokens, chunk_size = np.cumsum(sizes).tolist(), m_var.mamba_config(config).chunk_size
    else:
        tokens, chunk_size = sizes, config.mamba_inference_chunk_size
    rows = 2 * batch  # Guidance doubles the rows.
    uncounted = config.depth * sum(uncounted_scan_flops(config, rows, n, chunk_size) for n in tokens)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    counted = flops(
        sampling.generate_jit.lower(
            vqvae_config,
            config,
            abstract_variables(vqvae_config),
            param_shapes(config),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            key,
            jax.ShapeDtypeStruct((config.num_scales, 2), jnp.float32),
            OPTIONS,
            m_var.init_rerun_cache if rerun else None,
        )
    )
    return counted + uncounted, uncounted


def decoder_flops(vqvae_config: VQVAEConfig, batch: int) -> float:
    side = vqvae_config.patch_nums[-1]
    fn = jax.jit(lambda p, f: VQVAE(vqvae_config).apply(p, f, method=VQVAE.fhat_to_img))
    return flops(
        fn.lower(
            abstract_variables(vqvae_config),
            jax.ShapeDtypeStruct((batch, side, side, vqvae_config.z_channels), jnp.float32),
        )
    )


def mamba_branch_flops(
    config: TransformerConfig,
    rows: int,
    tokens: int,
    kept: int,
    *,
    chunk_size: int,
    final_state: bool = False,
) -> float:
    """One block's Mamba branch over ``tokens`` from a zero state in scan chunks of
    ``chunk_size``, keeping the last ``kept`` outputs (the official inference slices off
    the earlier ones) and, if asked, the state."""
    # A chunk beyond the tokens is one chunk of them: the same program, compiled once.
    return _branch_flops(config, rows, tokens, kept, min(chunk_size, tokens), final_state)


@functools.cache
def _branch_flops(
    config: TransformerConfig, rows: int, tokens: int, kept: int, chunk_size: int, final_state: bool
) -> float:
    mamba = Mamba2(
        dataclasses.replace(m_var.mamba_config(config), chunk_size=chunk_size), dtype=config.compute_dtype
    )
    C = config.embed_dim
    params = jax.eval_shape(mamba.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, C)))

    def branch(params, x_BLC, scale_B1C, shift_B1C):
        out, state = mamba.apply(params, modulate(layer_norm(x_BLC, config.norm_eps), scale_B1C, shift_B1C))
        return (out[:, -kept:], state) if final_state else out[:, -kept:]

    mod = jax.ShapeDtypeStruct((rows, 1, C), jnp.float32)
    counted = flops(
        jax.jit(branch).lower(params, jax.ShapeDtypeStruct((rows, tokens, C), jnp.float32), mod, mod)
    )
    return counted + uncounted_scan_flops(config, rows, tokens, chunk_size)


def branch_accounting(config: TransformerConfig, rows: int) -> dict[str, float]:
    """FLOPs the official sampler spends re-running Mamba over earlier scales' tokens (in
    its chunks), those ours spends computing the state it carries to the next scale and
    those ours saves on its own tokens by its chunks (in ours'); ours' Mamba branches over
    all scales per candidate chunk."""
    official_chunk, our_chunk = m_var.mamba_config(config).chunk_size, config.mamba_inference_chunk_size
    rerun = state = chunking = 0.0
    per_chunk = dict.fromkeys(CHUNK_CANDIDATES, 0.0)
    prefix = 0
    for si, pn in enumerate(config.patch_nums):
        n = pn * pn
        prefix += n
        hand_on = si < config.num_scales - 1
        official_own = mamba_branch_flops(config, rows, n, n, chunk_size=official_chunk)
        own = mamba_branch_flops(config, rows, n, n, chunk_size=our_chunk)
        if prefix > n:
            rerun += mamba_branch_flops(config, rows, prefix, n, chunk_size=official_chunk) - official_own
        if hand_on:
            state += mamba_branch_flops(config, rows, n, n, chunk_size=our_chunk, final_state=True) - own
        chunking += official_own - own
        for chunk in CHUNK_CANDIDATES:
            per_chunk[chunk] += mamba_branch_flops(config, rows, n, n, chunk_size=chunk, final_state=hand_on)
    d = config.depth
    return dict(
        rerun_flops=d * rerun,
        state_flops=d * state,
        chunking_flops=d * chunking,
        carried_mamba_flops_per_chunk={c: d * f for c, f in per_chunk.items()},
    )


def measure(smoke: bool, batch: int) -> dict[str, Any]:
    vqvae_config, config = model_configs(smoke)
    ours, ours_uncounted = sampler_flops(vqvae_config, config, batch, rerun=False)
    official, official_uncounted = sampler_flops(vqvae_config, config, batch, rerun=True)
    branches = branch_accounting(config, 2 * batch)  # Guidance doubles the rows.
    return dict(
        model=f"M-VAR-d{config.depth}",
        batch=batch,
        smoke=smoke,
        dtype=config.dtype,
        options=dataclasses.asdict(OPTIONS),
        official_chunk=m_var.mamba_config(config).chunk_size,
        our_chunk=config.mamba_inference_chunk_size,
        carried_flops=ours,
        official_rerun_flops=official,
        carried_uncounted_flops=ours_uncounted,
        official_uncounted_flops=official_uncounted,
        **branches,
        decoder_flops=decoder_flops(vqvae_config, batch),
        saving=1 - ours / official,
        rerun_share=branches["rerun_flops"] / official,
        meets_target=official - ours >= branches["rerun_flops"],
        jax=jax.__version__,
    )


def markdown(r: dict[str, Any]) -> str:
    G = 1e9
    ours_c, official_c = r["our_chunk"], r["official_chunk"]
    sweep = ", ".join(f"{c}: {f / G:,.1f}" for c, f in r["carried_mamba_flops_per_chunk"].items())
    return "\n".join(
        [
            f"{r['model']} sampler, batch {r['batch']} with cfg (2 x {r['batch']} rows), "
            f"top-k {r['options']['top_k']}, top-p {r['options']['top_p']}, {r['dtype']}, "
            f"no decode; XLA CPU cost_analysis, jax {r['jax']}"
            f"{' (smoke: toy model)' if r['smoke'] else ''}.",
            "",
            "| program | GFLOP | vs official |",
            "| --- | ---: | ---: |",
            f"| official re-run (Mamba from scratch over all scales so far, chunks of {official_c}) | "
            f"{r['official_rerun_flops'] / G:,.1f} | 1.000 |",
            f"| ours (Mamba state carried from scale to scale, chunks of {ours_c}) | "
            f"{r['carried_flops'] / G:,.1f} | {r['carried_flops'] / r['official_rerun_flops']:.3f} |",
            f"| re-run share of the official (Mamba branch on earlier scales' tokens, chunks of "
            f"{official_c}) | {r['rerun_flops'] / G:,.1f} | {r['rerun_share']:.3f} |",
            f"| ours: handing each scale's Mamba state on (chunks of {ours_c}; included in ours) | "
            f"{r['state_flops'] / G:,.1f} | {r['state_flops'] / r['official_rerun_flops']:.3f} |",
            f"| ours: own tokens' Mamba branch in chunks of {ours_c}, not {official_c} (saved; "
            f"included in ours) | {r['chunking_flops'] / G:,.1f} | "
            f"{r['chunking_flops'] / r['official_rerun_flops']:.3f} |",
            f"| VQVAE decode (either sampler, not included above) | {r['decoder_flops'] / G:,.1f} | "
            f"{r['decoder_flops'] / r['official_rerun_flops']:.3f} |",
            "",
            f"Included above, not counted by XLA (a rolled loop's body counts once): the Mamba scans' "
            f"chunk boundaries past the first, {r['official_uncounted_flops'] / G:,.1f} GFLOP in the "
            f"official sampler, {r['carried_uncounted_flops'] / G:,.1f} in ours.",
            "",
            f"Ours saves {r['saving']:.2%} of the official sampler's FLOPs; the re-run's share is "
            f"{r['rerun_share']:.2%}, the state hand-on costs "
            f"{r['state_flops'] / r['official_rerun_flops']:.2%}: target (saving >= re-run share) "
            f"{'met' if r['meets_target'] else 'MISSED'}.",
            "",
            f"Ours' Mamba branches over all scales (state handed on), GFLOP per scan chunk: {sweep}.",
            "",
        ]
    )


PROG = "python -m bench.bench_m_var_cost"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="toy model, batch 2")
flags.DEFINE_integer("batch", None, f"default {BATCH}", lower_bound=1, flag_values=FLAGS)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    result = measure(args.smoke, args.batch or (2 if args.smoke else BATCH))
    common.write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
