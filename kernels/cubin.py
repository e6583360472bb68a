"""Pallas Triton kernels compiled to CUDA binaries on a machine without a GPU.

``jax.export(..., platforms=["cuda"])`` lowers every Pallas call to a
``__gpu$xla.gpu.triton`` custom call whose ``backend_config`` holds the Triton
module as MLIR bytecode (``ir``) with its ``name``, ``num_warps``,
``num_stages`` and grid; XLA would compile it when the program is compiled for
a GPU. Here the module is printed as text with jaxlib's own Triton dialect
(PyPI Triton cannot read jaxlib's bytecode, but parses the text) and compiled
by the PyPI ``triton`` package through its CUDA backend's stages (ttir, ttgir,
llir, ptx, cubin) for a chosen compute capability. ptxas ships inside the
wheel, so neither a GPU nor a driver is needed, and ptxas' own report gives
the figures that decide whether a kernel runs well: registers per thread,
spills, and the shared memory Triton allocates per block.

Needs the ``triton`` pinned in requirements-dev.txt (a dev/test dependency:
the model never imports this module), and a jaxlib whose Pallas lowering
emits ``__gpu$xla.gpu.triton`` (up to 0.10.2; later jaxlibs compile the
kernel with their own Triton while lowering, which needs a GPU plugin).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import math
import multiprocessing
import re
import tempfile
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir
from jax._src.lib import version as jaxlib_version
from jax._src.lib.mlir import ir
from jax._src.lib.triton import dialect as tt_dialect

from mvar_jax.kernels.spatial_markov import (
    CANDIDATE_MAPS,
    Tiling,
    candidate_tilings,
    default_tiling,
    spatial_markov_attention,
)

try:
    import triton
    from triton import knobs
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget, Language
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler.compiler import make_backend
except ImportError as e:  # a dev dependency: say which
    raise ImportError("kernels.cubin needs PyPI triton (pinned in requirements-dev.txt)") from e

TRITON_CALL = "__gpu$xla.gpu.triton"
# Pallas emits TRITON_CALL with the Triton module up to this jaxlib (see
# jax._src.pallas.triton.pallas_call_registration); later ones compile it there.
LOWERS_TO_TRITON_IR = jaxlib_version <= (0, 10, 2)
TRITON_VERSION = triton.__version__
PTXAS_VERSION = get_ptxas(80).version  # the CUDA release of the wheel's ptxas


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One Pallas call of an exported program: its Triton module and launch parameters."""

    name: str
    module: str  # Triton MLIR as text, printed with jaxlib's dialect
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def triton_calls(fn: Callable, *args: jax.ShapeDtypeStruct) -> list[TritonCall]:
    """The Triton calls of ``jax.jit(fn)(*args)`` exported for CUDA, in program order.

    ``args`` may be abstract (``jax.ShapeDtypeStruct``): nothing runs.
    """
    if not LOWERS_TO_TRITON_IR:
        raise RuntimeError(
            f"jaxlib {jaxlib_version} compiles Pallas Triton kernels while lowering "
            f"(on a GPU); kernels.cubin needs the {TRITON_CALL} custom calls of "
            "jaxlib <= 0.10.2"
        )
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*args)
    context = mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    calls = []
    with context:
        program = ir.Module.parse(exported.mlir_module())

        def visit(op):
            if (
                op.name == "stablehlo.custom_call"
                and ir.StringAttr(op.attributes["call_target_name"]).value == TRITON_CALL
            ):
                calls.append(_read_call(ir.DictAttr(op.attributes["mhlo.backend_config"])))
            return ir.WalkResult.ADVANCE

        program.operation.walk(visit)
    return calls


def _read_call(config: ir.DictAttr) -> TritonCall:
    def integer(key):
        return ir.IntegerAttr(config[key]).value

    module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)  # bytecode
    return TritonCall(
        name=ir.StringAttr(config["name"]).value,
        module=module.operation.get_asm(),
        num_warps=integer("num_warps"),
        num_stages=integer("num_stages"),
        grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
    )


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one compiled kernel needs per thread and per block, from ptxas and Triton."""

    capability: int  # 80 (A100), 90 (H100)
    num_warps: int
    registers: int  # per thread
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes per thread of local memory (stack frame)
    shared: int  # bytes per block: Triton's dynamic allocation plus any static smem

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(.*)")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def compile_module(module: str, capability: int, num_warps: int, num_stages: int) -> Resources:
    """Compiles Triton MLIR text to a cubin for ``sm_<capability>``; its resources.

    Runs the CUDA backend's stages as ``triton.compile`` does for a kernel
    written in Python (make_ttir first: jaxlib emits un-optimised Triton IR),
    without its cache. Raises whatever a stage raises (ptxas errors included).
    """
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    context = triton_ir.context()
    triton_ir.load_dialects(context)
    backend.load_dialects(context)
    with tempfile.NamedTemporaryFile("w", suffix=".ttir") as source:  # it parses files only
        source.write(module)
        source.flush()
        parsed = triton_ir.parse_mlir_module(source.name, context)
    parsed.context = context
    stages = {}
    backend.add_stages(stages, options, Language.TRITON)
    metadata = {"target": target, **options.__dict__}
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        current = parsed
        for stage in stages.values():
            current = stage(current, metadata)
    return _resources(log.getvalue(), capability, metadata)


def _resources(ptxas_log: str, capability: int, metadata: dict) -> Resources:
    frame, used = _PTXAS_FRAME.search(ptxas_log), _PTXAS_USED.search(ptxas_log)
    if frame is None or used is None:
        raise RuntimeError(f"unexpected ptxas report:\n{ptxas_log}")
    static_smem = _PTXAS_SMEM.search(used.group(2))
    stack, stores, loads = (int(x) for x in frame.groups())
    return Resources(
        capability=capability,
        num_warps=metadata["num_warps"],
        registers=int(used.group(1)),
        spill_stores=stores,
        spill_loads=loads,
        stack=stack,
        shared=metadata["shared"] + (int(static_smem.group(1)) if static_smem else 0),
    )


# --------------------------------------------------------------------------
# Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table).


@dataclasses.dataclass(frozen=True)
class SMLimits:
    registers: int = 65536  # 32-bit registers per SM
    registers_per_thread: int = 255
    register_unit: int = 256  # registers are allocated per warp in units of this
    warps: int = 64
    blocks: int = 32
    shared: int = 0  # bytes per SM available to blocks
    shared_per_block: int = 0  # the opt-in maximum of one block
    shared_reserved: int = 1024  # per block, taken by the system
    shared_unit: int = 128


SM_LIMITS = {
    80: SMLimits(shared=167936, shared_per_block=166912),  # A100: 164 KB, 163 KB
    90: SMLimits(shared=233472, shared_per_block=232448),
}  # H100: 228 KB, 227 KB


def within_limits(r: Resources) -> list[str]:
    """Why the kernel risks running badly or not at all (empty when it is fine)."""
    limits = SM_LIMITS[r.capability]
    problems = []
    if r.spills:
        problems.append(f"spills ({r.spill_stores} B stored, {r.spill_loads} B loaded)")
    if r.registers > limits.registers_per_thread:
        problems.append(f"{r.registers} registers > {limits.registers_per_thread}")
    if r.shared > limits.shared_per_block:
        problems.append(f"{r.shared} B shared > {limits.shared_per_block}")
    return problems


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int
    limited_by: str  # registers, shared, warps or blocks


def occupancy(r: Resources) -> Occupancy:
    """Resident blocks per SM, as the CUDA occupancy calculator estimates them."""
    limits = SM_LIMITS[r.capability]
    regs_per_warp = _round_up(r.registers * 32, limits.register_unit)
    shared_per_block = _round_up(r.shared + limits.shared_reserved, limits.shared_unit)
    bounds = {
        "registers": limits.registers // regs_per_warp // r.num_warps,
        "shared": limits.shared // shared_per_block,
        "warps": limits.warps // r.num_warps,
        "blocks": limits.blocks,
    }
    limited_by = min(bounds, key=bounds.get)
    blocks = bounds[limited_by]
    return Occupancy(blocks=blocks, warps=blocks * r.num_warps, limited_by=limited_by)


def _round_up(x: int, unit: int) -> int:
    return math.ceil(x / unit) * unit


# --------------------------------------------------------------------------
# Many compilations at once.


@dataclasses.dataclass(frozen=True)
class Job:
    """One Triton module for one target: the unit that is compiled once."""

    module: str
    capability: int
    num_warps: int
    num_stages: int


def compile_all(job_lists: Iterable[list[Job]], processes: int = 2) -> dict[Job, Resources]:
    """Compiles each distinct job once, in ``processes`` worker processes (> 1).

    ``job_lists`` may be a generator that exports the next program while the
    workers compile the last one's modules. A job is keyed by its module text,
    so a module that several cases share is compiled once. Workers are
    spawned, not forked: jax is multithreaded.
    """
    if processes <= 1:
        compiled = {}
        for jobs in job_lists:
            for job in jobs:
                if job not in compiled:
                    compiled[job] = _compile_job(job)
        return compiled
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        futures = {}
        for jobs in job_lists:
            for job in jobs:
                if job not in futures:
                    futures[job] = pool.submit(_compile_job, job)
        return {job: future.result() for job, future in futures.items()}


def _compile_job(job: Job) -> Resources:
    return compile_module(job.module, job.capability, job.num_warps, job.num_stages)


# --------------------------------------------------------------------------
# The spatial-Markov kernels.


KERNELS = ("spatial_markov_fwd", "spatial_markov_dq", "spatial_markov_dkv")


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One square map and tiling of ``spatial_markov_attention`` (forward and backward)."""

    side: int
    tiling: Tiling
    dtype: str = "bfloat16"
    heads: int = 16
    head_dim: int = 64
    kernel_size: int = 7


@dataclasses.dataclass(frozen=True)
class Compiled:
    case: KernelCase
    kernel: str  # spatial_markov_fwd, _dq or _dkv
    resources: Resources


def checked_cases() -> list[KernelCase]:
    """What CI compiles: the defaults in both dtypes, then the other candidates.

    Every map of ``CANDIDATE_MAPS``; candidates in bfloat16, as the models
    train (the tuner sweeps bfloat16).
    """
    defaults = [
        KernelCase(side, default_tiling(side, side, dtype), dtype)
        for side in CANDIDATE_MAPS
        for dtype in ("bfloat16", "float32")
    ]
    others = [
        KernelCase(side, tiling) for side in CANDIDATE_MAPS for tiling in candidate_tilings(side, side)[1:]
    ]
    return defaults + others


def spatial_markov_calls(case: KernelCase) -> list[TritonCall]:
    """Forward, dq and dkv Triton calls of the kernel's gradient, exported for CUDA.

    Batch 1: the batch size changes only the grid, never the Triton module.
    """
    x = jax.ShapeDtypeStruct((1, case.side, case.side, case.heads, case.head_dim), case.dtype)

    def loss(q, k, v):
        out = spatial_markov_attention(q, k, v, case.kernel_size, tiling=case.tiling)
        return out.astype(jnp.float32).sum()

    calls = triton_calls(jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    if [call.name for call in calls] != list(KERNELS):
        raise RuntimeError(
            f"expected the Triton calls {KERNELS} in the exported gradient, found "
            f"{[call.name for call in calls]}"
        )
    return calls


def spatial_markov_resources(
    cases: Iterable[KernelCase], capabilities=(80, 90), processes: int = 2
) -> list[Compiled]:
    """Every case's three kernels compiled for every capability, in case order."""
    calls = {}

    def job_lists():
        for case in cases:
            calls[case] = spatial_markov_calls(case)
            yield [_job(call, capability) for call in calls[case] for capability in capabilities]

    compiled = compile_all(job_lists(), processes)
    return [
        Compiled(case, call.name, compiled[_job(call, capability)])
        for case, case_calls in calls.items()
        for call in case_calls
        for capability in capabilities
    ]


def _job(call: TritonCall, capability: int) -> Job:
    return Job(call.module, capability, call.num_warps, call.num_stages)
