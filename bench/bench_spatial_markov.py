"""Spatial-Markov attention: Pallas kernel vs XLA alternatives (a GPU benchmark).

    python -m bench.bench_spatial_markov --out bench_out/spatial_markov
    python -m bench.bench_spatial_markov --out /tmp/sm_smoke --smoke   # CPU smoke run

Methods, all on ``(B, H, W, heads, head_dim)`` bfloat16 inputs:

* ``pallas``: ``kernels.spatial_markov`` (Triton; interpreted on the CPU);
* ``reference``: the pure-jnp window gather beside the kernel (``kernels.neighborhood``);
* ``masked``: the model's pure-XLA path (``neighborhood_attention_masked``,
  what ``auto`` picks off GPU): the whole map under the window mask up to
  16 wide, tiles of rows and columns beyond;
* ``dense_xla``: full attention over the map with the neighbourhood as a
  boolean mask (einsum, mask, float32 softmax, einsum);
* ``dense_sdpa``: ``jax.nn.dot_product_attention`` with that mask, cuDNN when
  it accepts the call, else its XLA implementation (the table says which).

Each runs forward (``fwd``) and forward plus vjp (``fwd+bwd``). A kernel of
0.05 ms is shorter than a host round trip, so calls are not timed one by one:
up to ``--reps`` calls (a round of about 0.1 s) are dispatched back to back,
cycling over enough input sets to defeat the 50 MB L2 cache, then
synchronised once; a call's time is the round's over its calls, and the table
gives the median of 5 rounds after ``--warmup`` calls.

The memory floor of a pass is its compulsory traffic, each tensor read or
written once: q, k, v read and o written for ``fwd``; q, k, v, do read and o,
dq, dk, dv written for ``fwd+bwd``. ``x floor`` divides the time by floor
bytes / copy bandwidth, the latter measured in the same run by a large device
copy. Methods whose intermediates would not fit in device
memory are skipped (the table says so). Before timing, the kernel's forward
and gradients are checked against the reference at batch 2.

Writes ``results.md`` (a table for docs/benchmarks.md) and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bench import common
from bench.common import GiB
from mvar_jax import cli
from mvar_jax.kernels.neighborhood import neighborhood_attention_reference, neighborhood_window_starts
from mvar_jax.kernels.spatial_markov import Tiling, spatial_markov_attention
from mvar_jax.models.attention import neighborhood_attention_masked


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    side: int  # square maps, side x side
    heads: int
    head_dim: int
    kernel_size: int
    dtype: str = "bfloat16"

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.side, self.side, self.heads, self.head_dim)

    @property
    def tensor_bytes(self) -> int:
        return int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize


# Tensors moved once per pass: see the module docstring.
FLOOR_TENSORS = {"fwd": 4, "fwd+bwd": 8}


@dataclasses.dataclass
class Result:
    case: Case
    method: str
    mode: str
    impl: str = ""
    median_ms: float | None = None
    gbps: float | None = None
    x_floor: float | None = None
    note: str = ""


# Input sets rotate until they span this many bytes, about twice the H100's L2.
ROTATION_BYTES = 100 * 2**20
ROUNDS = 5
ROUND_S = 0.1  # target length of one timed round


def input_sets(case: Case, count: int, seed: int = 0) -> list[list[jax.Array]]:
    """Independent random (q, k, v, do) sets; enough of them to defeat the L2 cache."""
    rng = np.random.default_rng(seed)
    sets = max(1, -(-ROTATION_BYTES // (count * case.tensor_bytes)))
    return [
        [jnp.asarray(rng.standard_normal(case.shape), case.dtype) for _ in range(count)] for _ in range(sets)
    ]


def time_call(fn: Callable, arg_sets: list, warmup: int, reps: int, rounds: int = ROUNDS) -> float:
    """Seconds per call of ``fn(*args)``: the median over ``rounds`` of back-to-back rounds.

    Each round dispatches up to ``reps`` calls (fewer for slow calls: a round
    lasts about ``ROUND_S``), cycling over ``arg_sets``, and waits once at the
    end, so short kernels are timed on the device's clock rather than the
    host's round trips.
    """
    for i in range(warmup + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    calls = max(1, min(reps, int(ROUND_S / (time.perf_counter() - start))))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(calls):
            # Earlier outputs are dropped at once (memory); the device runs the
            # calls in order, so the last one finishing means all have.
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, warmup: int, reps: int) -> float:
    """Bytes/s of a device copy (read + write) of an ``nbytes`` buffer."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)  # an op, so XLA cannot elide the copy
    return 2 * x.nbytes / time_call(copy, [(x,)], warmup, reps)


# --------------------------------------------------------------------------
# The methods compared, all attention fns on (B, H, W, heads, head_dim).


def neighbourhood_mask(side: int, kernel_size: int) -> jax.Array:
    """``(N, N)`` boolean: key in the query's window, N = side**2 row-major."""
    start = neighborhood_window_starts(side, kernel_size)
    pos = jnp.arange(side)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + kernel_size)
    return (inside[:, None, :, None] & inside[None, :, None, :]).reshape(side**2, side**2)


def _flat(x):
    b, h, w, heads, d = x.shape
    return x.reshape(b, h * w, heads, d)


def dense_xla(q, k, v, kernel_size):
    """Full attention with the neighbourhood mask; float32 logits and softmax."""
    mask = neighbourhood_mask(q.shape[1], kernel_size)
    logits = (
        jnp.einsum("bqhd,bkhd->bhqk", _flat(q), _flat(k), preferred_element_type=jnp.float32)
        * q.shape[-1] ** -0.5
    )
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), _flat(v), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(q.shape)


def dense_sdpa(q, k, v, kernel_size, implementation):
    mask = neighbourhood_mask(q.shape[1], kernel_size)[None, None]
    out = jax.nn.dot_product_attention(_flat(q), _flat(k), _flat(v), mask=mask, implementation=implementation)
    return out.reshape(q.shape)


def methods(case: Case, interpret: bool) -> dict[str, tuple[list, int]]:
    """name -> ([(impl, fn), ...] in order of preference, estimated extra bytes)."""
    ks = case.kernel_size
    n = case.side**2
    logits = case.batch * case.heads * n * n * 4
    window = case.tensor_bytes * ks * ks * 4 // jnp.dtype(case.dtype).itemsize
    sdpa = [
        (impl, functools.partial(dense_sdpa, kernel_size=ks, implementation=impl))
        for impl in ("cudnn", "xla")
    ]
    return {
        "pallas": (
            [
                (
                    "interpret" if interpret else "triton",
                    functools.partial(spatial_markov_attention, kernel_size=ks, interpret=interpret),
                )
            ],
            0,
        ),
        "reference": (
            [("xla gather", functools.partial(neighborhood_attention_reference, kernel_size=ks))],
            4 * window,
        ),
        # Tiling only shrinks the masked path's logits below dense attention's.
        "masked": ([("xla", functools.partial(neighborhood_attention_masked, kernel_size=ks))], 3 * logits),
        "dense_xla": ([("xla", functools.partial(dense_xla, kernel_size=ks))], 3 * logits),
        "dense_sdpa": (sdpa, 3 * logits),
    }


def passes(fn: Callable) -> dict[str, Callable]:
    """The timed passes of an attention fn ``(q, k, v)``: 'fwd' and 'fwd+bwd' (jitted, each
    taking ``(q, k, v, do)``); the tuner times tilings the same way."""

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)

    return {"fwd": jax.jit(lambda q, k, v, do: fn(q, k, v)), "fwd+bwd": jax.jit(fwd_bwd)}


def device_memory() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 16 * GiB)


def time_method(case: Case, impls, arg_sets, copy_bps: float, warmup: int, reps: int):
    """Results of the first implementation that compiles and runs; notes the refusals."""
    notes = []
    for i, (impl, fn) in enumerate(impls):
        try:
            seconds = {
                mode: time_call(pass_fn, arg_sets, warmup, reps) for mode, pass_fn in passes(fn).items()
            }
        except Exception as e:  # noqa: BLE001 - a refusal means: try the next one
            if i == len(impls) - 1:
                raise
            notes.append(f"{impl} refused: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        results = []
        for mode, t in seconds.items():
            floor_bytes = FLOOR_TENSORS[mode] * case.tensor_bytes
            results.append(
                dict(
                    mode=mode,
                    impl=impl,
                    median_ms=t * 1e3,
                    gbps=floor_bytes / t / 1e9,
                    x_floor=t / (floor_bytes / copy_bps),
                    note="; ".join(notes),
                )
            )
        return results


def run_case(
    case: Case, interpret: bool, copy_bps: float, warmup: int, reps: int, names: tuple[str, ...] | None = None
):
    """Every method's results (those in ``names`` only, in that order, when given)."""
    arg_sets = input_sets(case, 4)
    budget = device_memory() // 2
    results = []
    every = methods(case, interpret)
    for method in names or every:
        impls, extra_bytes = every[method]
        if extra_bytes > budget:
            note = f"skipped: needs ~{extra_bytes / GiB:.0f} GiB"
            results += [Result(case, method, mode, note=note) for mode in FLOOR_TENSORS]
            continue
        timed = time_method(case, impls, arg_sets, copy_bps, warmup, reps)
        results += [Result(case, method, **r) for r in timed]
        print(
            f"  {method:10s} {timed[0]['impl']:10s} "
            + "  ".join(f"{r['mode']} {r['median_ms']:.3f} ms" for r in timed),
            flush=True,
        )
    return results


def check_kernel(case: Case, interpret: bool, tiling: Tiling | None = None) -> dict[str, float]:
    """Relative errors of the kernel's output and grads vs the reference, batch 2."""
    small = dataclasses.replace(case, batch=2)
    rng = np.random.default_rng(1)
    q, k, v, do = (jnp.asarray(rng.standard_normal(small.shape), small.dtype) for _ in range(4))
    errors = {}
    fns = {
        "pallas": functools.partial(
            spatial_markov_attention, kernel_size=case.kernel_size, interpret=interpret, tiling=tiling
        ),
        "reference": functools.partial(neighborhood_attention_reference, kernel_size=case.kernel_size),
    }
    outs = {}
    for name, fn in fns.items():
        out, vjp = jax.vjp(fn, q, k, v)
        outs[name] = (out, *vjp(do))
    for name, got, ref in zip(["o", "dq", "dk", "dv"], outs["pallas"], outs["reference"]):
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        errors[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return errors


def markdown(results: list[Result], header: dict) -> str:
    lines = [
        f"Spatial-Markov attention, {header['dtype']}, heads {header['heads']}, "
        f"head_dim {header['head_dim']}, kernel {header['kernel_size']}, on "
        f"{header['device']}; copy bandwidth {header['copy_gbps']:.0f} GB/s. "
        "GB/s counts compulsory bytes only (q, k, v, o once; plus do, dq, dk, dv "
        "for fwd+bwd); x floor = time / (those bytes / copy bandwidth).",
        "",
        "| map | B | pass | method | impl | median ms | GB/s | x floor | note |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        cells = (
            "-" if x is None else f"{x:.{p}f}" for x, p in ((r.median_ms, 3), (r.gbps, 1), (r.x_floor, 1))
        )
        lines.append(
            f"| {r.case.side}x{r.case.side} | {r.case.batch} | {r.mode} | "
            f"{r.method} | {r.impl} | " + " | ".join(cells) + f" | {r.note} |"
        )
    lines += [
        "",
        "Kernel vs reference at batch 2 (relative error, bfloat16 kernel vs float32-accumulating reference):",
        "",
        "| map | o | dq | dk | dv |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for side, errs in header["checks"].items():
        lines.append(
            f"| {side}x{side} | " + " | ".join(f"{errs[n]:.1e}" for n in ("o", "dq", "dk", "dv")) + " |"
        )
    return "\n".join(lines) + "\n"


def define_case_flags(flag_values: flags.FlagValues, *, warmup: int) -> None:
    """``--heads --head_dim --kernel_size --warmup --reps``: the kernel benches' case and timing."""
    flags.DEFINE_integer("heads", 16, "attention heads", flag_values=flag_values)
    flags.DEFINE_integer("head_dim", 64, "head dimension", flag_values=flag_values)
    flags.DEFINE_integer("kernel_size", 7, "neighbourhood side", flag_values=flag_values)
    flags.DEFINE_integer("warmup", warmup, "untimed calls first", flag_values=flag_values)
    flags.DEFINE_integer("reps", 50, "calls per timed round", flag_values=flag_values)


PROG = "python -m bench.bench_spatial_markov"
FLAGS = flags.FlagValues()
common.define_flags(FLAGS, smoke="tiny shapes, few reps: checks the script runs (CPU)")
cli.define_int_list("batches", "32,128", "batch sizes", FLAGS, what="ints", example="32,128")
cli.define_int_list("maps", "13,16,32,64", "square map sides", FLAGS, what="ints", example="13,16")
define_case_flags(FLAGS, warmup=3)
flags.DEFINE_float("copy_gib", 2.0, "size of the copy that measures bandwidth", flag_values=FLAGS)


def main(argv=None):
    args = cli.parse_flags(FLAGS, argv, prog=PROG, doc=__doc__)
    if args.smoke:
        args.batches, args.maps, args.heads, args.head_dim = [1], [8], 2, 16
        args.kernel_size, args.warmup, args.reps, args.copy_gib = 3, 1, 2, 1 / 64

    interpret = jax.default_backend() == "cpu"
    copy_bps = copy_bandwidth(int(args.copy_gib * GiB), args.warmup, args.reps)
    header = common.header(
        dtype="bfloat16",
        heads=args.heads,
        head_dim=args.head_dim,
        kernel_size=args.kernel_size,
        copy_gbps=copy_bps / 1e9,
        checks={},
    )
    print(f"{header['device']}: copy {header['copy_gbps']:.0f} GB/s", flush=True)
    results = []
    for side in args.maps:
        case = Case(2, side, args.heads, args.head_dim, args.kernel_size)
        header["checks"][side] = check_kernel(case, interpret)
        print(f"{side}x{side} check: {header['checks'][side]}", flush=True)
        for batch in args.batches:
            case = dataclasses.replace(case, batch=batch)
            print(f"{side}x{side} B={batch}", flush=True)
            results += run_case(case, interpret, copy_bps, args.warmup, args.reps)

    common.write_results(
        args.out,
        dict(header=header, results=[dataclasses.asdict(r) for r in results]),
        markdown(results, header),
    )


if __name__ == "__main__":
    main()
