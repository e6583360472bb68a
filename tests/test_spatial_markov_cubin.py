"""The spatial-Markov kernel compiled to CUDA binaries for sm_80 and sm_90, on the CPU.

``kernels.cubin`` exports the kernel's gradient for CUDA, prints each Triton
module with jaxlib's dialect and compiles it with PyPI Triton and the ptxas of
its wheel. Every tiling the tuner may pick (``candidate_tilings``, the default
among them; bfloat16 as the models train, and the float32 defaults) must
compile without spills, within 255 registers and within a block's shared
memory, for every map the models use (13x13, 16x16) and two larger ones.
"""

from __future__ import annotations

import pytest
from jax._src.lib import version as jaxlib_version

if jaxlib_version > (0, 10, 2):  # kernels.cubin.LOWERS_TO_TRITON_IR, without importing triton
    pytest.skip(
        "this jaxlib compiles Pallas kernels while lowering (a GPU machine's jax)", allow_module_level=True
    )

from mvar_jax.kernels import cubin  # noqa: E402
from mvar_jax.kernels.spatial_markov import CANDIDATE_MAPS, Tiling, candidate_tilings, default_tiling  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> list[cubin.Compiled]:
    return cubin.spatial_markov_resources(cubin.checked_cases(), capabilities=(80, 90), processes=2)


def test_every_candidate_compiles_within_the_limits(compiled):
    cases = cubin.checked_cases()
    assert len(compiled) == len(cases) * 3 * 2  # three kernels, two targets
    for side in CANDIDATE_MAPS:
        assert set(candidate_tilings(side, side)) == {
            c.tiling for c in cases if c.side == side and c.dtype == "bfloat16"
        }
    problems = [
        f"{c.kernel} {c.case.side}x{c.case.side} {c.case.dtype} {c.case.tiling} "
        f"sm_{c.resources.capability}: {problem}"
        for c in compiled
        for problem in cubin.within_limits(c.resources)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("side", CANDIDATE_MAPS)
def test_default_is_the_first_candidate(side):
    assert candidate_tilings(side, side)[0] == default_tiling(side, side)


def test_calls_carry_the_tiling_and_grid():
    tiling = Tiling(block_q=128, block_k=128, partner_chunk=64, num_warps=8, num_stages=3)
    calls = cubin.spatial_markov_calls(cubin.KernelCase(16, tiling, heads=4))
    assert [c.name for c in calls] == list(cubin.KERNELS)
    for call in calls:
        assert (call.num_warps, call.num_stages) == (8, 3)
        assert call.grid == (2, 1, 4)  # 256 positions in blocks of 128, batch 1, 4 heads
        assert call.module.startswith(f"module @{call.name}")


def test_spills_are_reported():
    # A tiling outside the candidates: dkv at 16x16 with 128-position blocks and
    # 8 warps needs more than the 255 registers a thread may have on sm_80 (with
    # the pinned triton 3.6.0; 3.9.0 fits it in 255 without spilling).
    tiling = Tiling(block_q=128, block_k=128, partner_chunk=64, num_warps=8, num_stages=3)
    dkv = cubin.spatial_markov_calls(cubin.KernelCase(16, tiling))[2]
    resources = cubin.compile_module(dkv.module, 80, dkv.num_warps, dkv.num_stages)
    assert resources.registers == 255 and resources.spills
    assert any("spills" in problem for problem in cubin.within_limits(resources))
    assert tiling not in candidate_tilings(16, 16)


@pytest.mark.parametrize(
    "resources, expected",
    [
        # 128 registers: 4096 per warp, 16 warps fit; shared (20608 + 1 KB) fits 7 times.
        (cubin.Resources(80, 4, 128, 0, 0, 0, 20608), cubin.Occupancy(4, 16, "registers")),
        # 32 registers leave 64 warps; 100 KB blocks fit twice in 228 KB.
        (cubin.Resources(90, 4, 32, 0, 0, 0, 100 * 1024), cubin.Occupancy(2, 8, "shared")),
        # 255 registers round up to 8192 per warp: 8 warps, one block of 8.
        (cubin.Resources(80, 8, 255, 0, 0, 0, 0), cubin.Occupancy(1, 8, "registers")),
        # 16 registers, 1 warp, no shared memory: 32 blocks at most.
        (cubin.Resources(90, 1, 16, 0, 0, 0, 0), cubin.Occupancy(32, 32, "blocks")),
    ],
)
def test_occupancy(resources, expected):
    assert cubin.occupancy(resources) == expected


@pytest.mark.parametrize(
    "resources, problem",
    [
        (cubin.Resources(80, 4, 128, 0, 0, 0, 166913), "shared"),
        (cubin.Resources(90, 4, 128, 0, 0, 0, 232449), "shared"),
        (cubin.Resources(90, 4, 128, 4, 0, 16, 1024), "spills"),
    ],
)
def test_limits(resources, problem):
    assert [problem in p for p in cubin.within_limits(resources)] == [True]
    assert (
        cubin.within_limits(
            cubin.Resources(
                resources.capability, 4, 255, 0, 0, 0, cubin.SM_LIMITS[resources.capability].shared_per_block
            )
        )
        == []
    )
