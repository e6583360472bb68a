"""The real programs' cost from XLA's own analyses, compiled on the CPU: no GPU, no weights.

    python -m bench.bench_cost --out bench_out/cost        # d16/d20/d24 x batch 32/64, all programs
    python -m bench.bench_cost --out bench_out/cost --families mvar --depths 16 --batches 64 \\
        --programs sample                                   # one program
    python -m bench.bench_cost --out /tmp/cost_smoke --smoke  # toy model, seconds (CI)

Every program is lowered with abstract inputs (``jax.ShapeDtypeStruct``: no weight
is allocated) and compiled for the CPU, never run. Each runs in its own process
(compiling d24 at batch 64 takes minutes and GBs); finished rows are kept in
``results.json``, so an interrupted sweep resumes. Programs:

* ``sample`` / ``sample+decode``: ``sampling.generate`` at bfloat16, cfg 1.5,
  top-k 900, top-p 0.96, the neighbourhood impl ``auto`` resolves to here (the
  memory-lean 'masked' path, as on TPUs; ``--neighborhood_impl`` for another);
* ``train <scales>``: the train step (forward, backward, AdamW) of each MVAR
  segment (scales 1-8, 13 and 16 at 256 px) and of VAR, bfloat16.

Columns:

* ``XLA GFLOP`` and ``XLA GB``: ``compiled.cost_analysis()`` flops and bytes
  accessed. XLA counts a while loop's body once, so the sampler's cost is read
  off its loop-free form (per-block params, one image chunk, one decode batch):
  the same arithmetic as the production program, unrolled;
* ``temp``, ``args``, ``out``, ``peak`` GiB: ``compiled.memory_analysis()`` of the
  production program (``sampling.sample`` on a model as ``checkpoint.load_model`` returns
  it: block-stacked params, the default image chunks and decode batches); peak is
  arguments + outputs + temporaries - aliased, i.e. the device memory the
  program needs with its weights;
* ``analytic GFLOP``: the matmul work the model needs (``analytic_flops``):
  attention counted as each pattern needs it (block-diagonal: the tokens of
  the query's scale; neighbourhood: k*k; block-causal: every token of the
  scales up to the query's), the linear layers, AdaLN, the head, the VQVAE's
  per-scale Phi convs and resizes, the decoder; training is 3x the forward.
  ``ratio`` is XLA / analytic: XLA also counts elementwise work (softmax,
  LayerNorm, GELU, the logit filters), so ~1.0-1.1 is the expected floor and
  more than 1.15 points at waste (dense attention where a pattern needs less,
  padding, recomputation);
* ``compile s``: CPU seconds to lower and compile the production program.

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from bench.bench_sampling import OPTIONS as SAMPLE_OPTIONS, model_configs
from bench.common import GiB, define_flags, run_case, write_results
from mvar_jax import checkpoint, cli, parallel, sampling
from mvar_jax.models import families, transformer
from mvar_jax.models.config import NEIGHBORHOOD_IMPLS, REMATS, InitScales, TransformerConfig
from mvar_jax.models.segments import Segment
from mvar_jax.models.vqvae import VQVAEConfig, abstract_variables
from mvar_jax.training import optimizer, state as state_lib, step as step_lib

PROGRAMS = ("sample", "sample+decode", "train")
UNCHUNKED = 2**62  # chunk_tokens that keeps every image in one chunk


@dataclasses.dataclass(frozen=True)
class Program:
    family: str  # models.families
    depth: int
    batch: int
    kind: str  # 'sample', 'sample+decode' or 'train'
    segment: tuple[int, int] | None = None  # train: scales [first, last)
    neighborhood_impl: str = "auto"
    # The sampler's production form (ablations: 'per-block' params run unrolled).
    blocks: str = "stacked"
    chunk_tokens: int = sampling.CHUNK_TOKENS
    grad_accum: int = 1  # train: micro-batches per step (the batch is the step's)
    remat: str = "none"  # train: TransformerConfig.remat
    smoke: bool = False

    def name(self, config: TransformerConfig) -> str:
        if self.kind != "train":
            return self.kind
        accum = f" in {self.grad_accum} micro-batches" if self.grad_accum > 1 else ""
        remat = f", remat {self.remat}" if self.remat != "none" else ""
        return f"train {Segment(*self.segment).name(config.patch_nums)}{accum}{remat}"


def configs(program: Program) -> tuple[VQVAEConfig, TransformerConfig]:
    """The released tokenizer and the official d-depth model at bfloat16 (toy with smoke)."""
    vqvae_config, config = model_configs(program.family, program.smoke)
    config = dataclasses.replace(config, neighborhood_impl=program.neighborhood_impl, remat=program.remat)
    if not program.smoke:
        config = dataclasses.replace(
            config,
            depth=program.depth,
            embed_dim=64 * program.depth,
            num_heads=program.depth,
            drop_path_rate=0.1 * program.depth / 24,
        )
    return vqvae_config, config


def programs_for(
    family: str, depth: int, batch: int, kinds: tuple[str, ...], **options: Any
) -> list[Program]:
    """One Program per kind, one train step per segment of the family's schedule."""
    base = Program(family, depth, batch, "sample", **options)
    config = configs(base)[1]
    out = []
    for kind in kinds:
        if kind != "train":
            out.append(dataclasses.replace(base, kind=kind))
            continue
        schedule = families.of(config).schedule(config, 1)
        out += [dataclasses.replace(base, kind=kind, segment=tuple(s)) for s in schedule.segments]
    return out


# ----------------------------------------------------------------------------
# The analytic count: matmul FLOPs (2 per multiply-add) the model needs.


def _resize_flops(size_in: int, size_out: int, channels: int) -> int:
    """A separable resize of a square map: two matmuls with interpolation matrices."""
    return 2 * channels * (size_in * size_in * size_out + size_in * size_out * size_out)


def decoder_flops(config: VQVAEConfig) -> int:
    """post_quant_conv and the decoder, one image."""
    side = config.patch_nums[-1]
    hw = side * side
    conv = lambda k, cin, cout, pixels: 2 * k * k * cin * cout * pixels  # noqa: E731

    def resnet(cin, cout, pixels):
        return (
            conv(3, cin, cout, pixels)
            + conv(3, cout, cout, pixels)
            + (conv(1, cin, cout, pixels) if cin != cout else 0)
        )

    def attn(c, pixels):
        return conv(1, c, 4 * c, pixels) + 4 * pixels * pixels * c  # qkv + proj, logits + mix

    z, top = config.z_channels, config.ch * config.ch_mult[-1]
    flops = conv(config.quant_conv_ks, z, z, hw) + conv(3, z, top, hw)
    flops += 2 * resnet(top, top, hw) + (attn(top, hw) if config.using_mid_sa else 0)
    channels, last = top, len(config.ch_mult) - 1
    for i in reversed(range(len(config.ch_mult))):
        out = config.ch * config.ch_mult[i]
        for _ in range(config.num_res_blocks + 1):
            flops += resnet(channels, out, hw)
            flops += attn(out, hw) if config.using_sa and i == last else 0
            channels = out
        if i:
            hw *= 4
            flops += conv(3, out, out, hw)
    return flops + conv(3, channels, 3, hw)


def transformer_flops(
    config: TransformerConfig, rows: int, first: int, last: int, input_rows: int
) -> dict[str, int]:
    """One forward over scales [first, last) for ``rows`` rows.

    ``input_rows`` rows get the word embedding of their VQVAE input (the sampler
    embeds each image once and shares it between the guidance rows).
    """
    C, N, D = config.embed_dim, config.depth, config.embed_dim
    begin, end = config.token_range(first, last)
    tokens = end - begin
    embedded = tokens - (config.first_l if first == 0 else 0)
    keys = families.of(config).keys_per_query
    attention = sum(config.patch_nums[si] ** 2 * 4 * C * keys(config, si) for si in range(first, last))
    return {
        "linear": rows * tokens * N * 2 * C * (4 * C + 2 * config.mlp_dim),
        "attention": rows * N * attention,
        "adaln": rows * (N * 2 * D * 6 * C + 2 * D * 2 * C),
        "head": rows * tokens * 2 * C * config.vocab_size,
        "embed": input_rows * embedded * 2 * config.cvae * C,
    }


def analytic_flops(program: Program) -> dict[str, int]:
    """The work the program needs, by component (``analytic_flops(p)['total']``)."""
    vqvae_config, config = configs(program)
    B = program.batch
    parts: dict[str, int] = {}

    def add(counts: dict[str, int], times: int = 1):
        for key, value in counts.items():
            parts[key] = parts.get(key, 0) + times * value

    if program.kind == "train":
        add(transformer_flops(config, B, *program.segment, input_rows=B), times=3)
    else:
        rows = 2 * B  # cfg 1.5: conditional and unconditional rows (VAR always guides)
        side = config.patch_nums[-1]
        for si, pn in enumerate(config.patch_nums):
            add(transformer_flops(config, rows, si, si + 1, input_rows=B))
            # f_hat += Phi(upsampled scale); the next input is f_hat area-downsampled.
            vqvae = 2 * 9 * config.cvae**2 * side * side
            if si + 1 < config.num_scales:
                vqvae += _resize_flops(pn, side, config.cvae) + _resize_flops(
                    side, config.patch_nums[si + 1], config.cvae
                )
            add({"vqvae": B * vqvae})
        if program.kind == "sample+decode":
            add({"decoder": B * decoder_flops(vqvae_config)})
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------
# The programs, lowered from abstract inputs.


def sampler_lowered(program: Program, *, loop_free: bool):
    """The sampler lowered; ``loop_free`` for the cost view (see the module doc).

    The production program is exactly the call ``sampling.sample(checkpoint.load_model(d))``
    makes (``sampling.lower_sample`` on ``checkpoint.abstract_model``); the ablation
    ``--blocks=per-block`` and the cost view lower ``generate`` on per-block params.
    """
    vqvae_config, config = configs(program)
    B, decode = program.batch, program.kind == "sample+decode"
    options = dataclasses.replace(SAMPLE_OPTIONS, decode=decode, chunk_tokens=program.chunk_tokens)
    if not loop_free and program.blocks == "stacked":
        return sampling.lower_sample(checkpoint.abstract_model(vqvae_config, config), B, options)
    if loop_free:
        options = dataclasses.replace(options, decode_batch_size=B, chunk_tokens=UNCHUNKED)
    return sampling.generate_jit.lower(
        vqvae_config,
        config,
        abstract_variables(vqvae_config),
        transformer.param_shapes(config),
        jax.ShapeDtypeStruct((B,), jnp.int32),
        jax.eval_shape(lambda: jax.random.PRNGKey(0)),
        sampling.guidance_schedule(options.cfg, config),
        options,
    )


def train_step_lowered(program: Program):
    """One train step of the program's segment, jitted as the trainer does (state donated)."""
    from mvar_jax.configs import common  # ml_collections: imported only for the train steps

    _, config = configs(program)
    recipe = common.get_config()
    tx, lr = optimizer.make_optimizer(
        optimizer.OptimizerConfig(**recipe.optim),
        global_batch_size=program.batch,
        total_steps=10_000,
        decay_mask=optimizer.official_decay_mask,
    )
    scales = InitScales(**recipe.init)
    state = jax.eval_shape(
        lambda rng: state_lib.create_train_state(state_lib.init_params(config, scales, rng), tx, rng),
        jax.random.PRNGKey(0),
    )
    B, L = program.batch, config.seq_len
    batch = {
        "label": jax.ShapeDtypeStruct((B,), jnp.int32),
        "tokens": jax.ShapeDtypeStruct((B, L), jnp.int32),
        "x_BLCv": jax.ShapeDtypeStruct((B, L - config.first_l, config.cvae), jnp.float32),
    }
    step = step_lib.make_train_step(
        transformer.Transformer(config),
        tx,
        lr,
        Segment(*program.segment),
        label_smoothing=recipe.label_smoothing,
        grad_accum_steps=program.grad_accum,
    )
    mesh = parallel.make_mesh(jax.local_devices())
    jitted = parallel.jit_train_step(step, parallel.state_shardings(state, mesh, fsdp=False), mesh)
    return jitted.lower(state, batch)


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def measure(program: Program) -> dict[str, Any]:
    """Compiles the program (twice for the sampler: production and loop-free views)."""
    _, config = configs(program)
    started = time.process_time()
    lowered = (
        train_step_lowered(program) if program.kind == "train" else sampler_lowered(program, loop_free=False)
    )
    compiled = lowered.compile()
    compile_s = time.process_time() - started
    memory = compiled.memory_analysis()
    if program.kind != "train":
        compiled = sampler_lowered(program, loop_free=True).compile()
    flops, accessed = _cost(compiled)
    analytic = analytic_flops(program)
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return dict(
        dataclasses.asdict(program),
        name=program.name(config),
        xla_flops=flops,
        xla_bytes_accessed=accessed,
        analytic_flops=analytic["total"],
        analytic=analytic,
        ratio=flops / analytic["total"],
        temp_bytes=memory.temp_size_in_bytes,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        peak_bytes=peak,
        compile_cpu_s=compile_s,
        jax=jax.__version__,
        device=jax.devices()[0].device_kind,
    )


def run_isolated(program: Program) -> dict[str, Any]:
    """``measure`` in a fresh process: compilations of this size hold GBs until exit."""
    return run_case("bench.bench_cost", dataclasses.asdict(program))


def _variant(row: dict[str, Any]) -> str:
    """`` (reference, per-block, unchunked)``: how a row departs from the production program."""
    notes = [row["neighborhood_impl"]] if row["neighborhood_impl"] != "auto" else []
    if row["kind"] != "train":
        notes += [row["blocks"]] if row["blocks"] != "stacked" else []
        if row["chunk_tokens"] != sampling.CHUNK_TOKENS:
            notes.append(
                "unchunked" if row["chunk_tokens"] >= UNCHUNKED else f"chunks of {row['chunk_tokens']}"
            )
    return f" ({', '.join(notes)})" if notes else ""


def markdown(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    lines = [
        f"XLA on {r0['device']} (jax {r0['jax']}), compiled, not run; bfloat16; sampler "
        f"cfg {SAMPLE_OPTIONS.cfg}, top-k {SAMPLE_OPTIONS.top_k}, top-p "
        f"{SAMPLE_OPTIONS.top_p}{' (smoke: toy model)' if r0['smoke'] else ''}.",
        "",
        "| model | batch | program | XLA GFLOP | analytic GFLOP | ratio | XLA GB accessed "
        "| temp GiB | args GiB | out GiB | peak GiB | compile CPU s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def gflop(flops: float) -> str:
        return f"{flops / 1e9:,.0f}" if flops >= 1e11 else f"{flops / 1e9:.3g}"

    for r in rows:
        impl = _variant(r)
        lines.append(
            f"| {families.get(r['family']).title}-d{r['depth']} | {r['batch']} | {r['name']}{impl} | "
            f"{gflop(r['xla_flops'])} | {gflop(r['analytic_flops'])} | "
            f"{r['ratio']:.3f} | {r['xla_bytes_accessed'] / 1e9:,.1f} | "
            f"{r['temp_bytes'] / GiB:.2f} | {r['argument_bytes'] / GiB:.2f} | "
            f"{r['output_bytes'] / GiB:.3f} | {r['peak_bytes'] / GiB:.2f} | "
            f"{r['compile_cpu_s']:.0f} |"
        )
    if any(r.get("grad_accum", 1) > 1 for r in rows):
        lines += ["", "A step in micro-batches scans them: XLA counts the scanned body's FLOPs once."]
    return "\n".join(lines) + "\n"


def program_of(fields: dict[str, Any]) -> Program:
    """The Program a results row (or its JSON) describes."""
    fields = {f.name: fields[f.name] for f in dataclasses.fields(Program) if f.name in fields}
    fields["segment"] = fields["segment"] and tuple(fields["segment"])
    return Program(**fields)


PROG = "python -m bench.bench_cost"
FLAGS = flags.FlagValues()
define_flags(FLAGS, smoke="toy model at batch 2, in this process (CI)", case=True)
flags.DEFINE_list("families", ["mvar", "var"], f"some of {', '.join(families.NAMES)}", flag_values=FLAGS)
cli.define_int_list("depths", "16,20,24", "model depths", FLAGS, what="depths", example="16,24")
cli.define_int_list("batches", "32,64", "batch sizes", FLAGS, what="batch sizes", example="32,64")
flags.DEFINE_list("programs", list(PROGRAMS), f"comma-separated from {PROGRAMS}", flag_values=FLAGS)
flags.DEFINE_enum(
    "neighborhood_impl",
    "auto",
    NEIGHBORHOOD_IMPLS,
    "MVAR's spatial-Markov attention",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "blocks",
    "stacked",
    ["stacked", "per-block"],
    "sampler params: stacked (as load_model returns them, scanned) or per-block (unrolled), for ablations",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "remat", "none", REMATS, "train: what the backward pass keeps of each block", flag_values=FLAGS
)
flags.DEFINE_integer(
    "grad_accum", 1, "train: each step's batch in this many micro-batches", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "chunk_tokens",
    sampling.CHUNK_TOKENS,
    "sampler chunk_tokens (0: one chunk)",
    lower_bound=0,
    flag_values=FLAGS,
)
flags.register_validator(
    "programs",
    lambda kinds: bool(kinds) and set(kinds) <= set(PROGRAMS),
    message=f"--programs must name some of {PROGRAMS}",
    flag_values=FLAGS,
)
flags.register_validator(
    "families",
    lambda names: bool(names) and set(names) <= set(families.NAMES),
    message=f"--families must name some of {families.NAMES}",
    flag_values=FLAGS,
)


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.case:
        print(json.dumps(measure(program_of(json.loads(args.case)))))
        return
    kinds = tuple(args.programs)
    depths, batches = ([2], [2]) if args.smoke else (args.depths, args.batches)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    done = {program_of(row) for row in rows}
    for family in args.families:
        for depth in depths:
            for batch in batches:
                for program in programs_for(
                    family,
                    depth,
                    batch,
                    kinds,
                    neighborhood_impl=args.neighborhood_impl,
                    blocks=args.blocks,
                    chunk_tokens=args.chunk_tokens or UNCHUNKED,
                    grad_accum=args.grad_accum,
                    remat=args.remat,
                    smoke=args.smoke,
                ):
                    if program in done:
                        continue
                    row = measure(program) if args.smoke else run_isolated(program)
                    rows.append(row)
                    results.write_text(json.dumps(rows, indent=1))
                    print(
                        f"{family} d{depth} b{batch} {row['name']}: ratio {row['ratio']:.3f}, "
                        f"temp {row['temp_bytes'] / GiB:.2f} GiB",
                        flush=True,
                    )
    write_results(out, rows, markdown(rows))


if __name__ == "__main__":
    main()
