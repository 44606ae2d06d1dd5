"""The conv kernels compile ahead of time for sm_80 and sm_90 (no GPU needed): a seeded sample of each
spec's default space plus its extremes (smallest and largest tiles), each spec on a different dtype."""

from __future__ import annotations

import random

import pytest

from triton_workbench import kernels
from triton_workbench.kernels import aot

SAMPLED_PER_SPEC = 2
CASES = ((kernels.CONV_FWD_SPEC, "fp16"), (kernels.CONV_DGRAD_SPEC, "fp32"), (kernels.CONV_WGRAD_SPEC, "bf16"))


def _tile_volume(config: dict) -> tuple[int, ...]:
    return (config["BLOCK_M"] * config["BLOCK_N"] * config["BLOCK_K"], config["num_stages"], config["num_warps"])


@pytest.mark.parametrize("spec, dtype", CASES, ids=[f"{spec.name}-{dtype}" for spec, dtype in CASES])
def test_sample_and_extremes_of_the_default_space_compile_for_sm80_and_sm90(spec, dtype):
    (problem,) = [p for p in spec.example_problems if p["dtype"] == dtype]
    space = sorted(aot.default_space(spec, problem), key=_tile_volume)
    assert len(space) > SAMPLED_PER_SPEC + 2
    chosen = [space[0], space[-1], *random.Random(f"{spec.name}-{dtype}").sample(space[1:-1], SAMPLED_PER_SPEC)]
    results = aot.compile_space(spec, [(config, problem) for config in chosen], archs=(80, 90), workers=2,
                                progress=False)
    assert len(results) == 2 * len(chosen)
    failed = results[~results.ok]
    assert failed.empty, failed[["config", "arch", "reason"]].to_string()
    assert (results.shared_bytes > 0).all() and (results.registers > 0).all()
