"""The branch-free footprint the CPU forward runs over vector lanes (dk_math.h's
bilinear_corners) equals bilinear_footprint, the one every other loop and the CUDA kernels use:
the same corners and bitwise the same weights at NaN, infinite, edge and in-cell positions, on
planes of every size from empty up (scripts/corners_check.cc, compiled with the host compiler
and the CPU library's floating-point flags)."""

from __future__ import annotations

from conftest import build_and_run_host_check


def test_branch_free_corners_equal_the_footprint(tmp_path):
    run = build_and_run_host_check(
        tmp_path, "corners_check.cc", "-std=c++17", "-O2", "-fno-math-errno", "-fno-trapping-math"
    )
    assert run.stdout.splitlines()[-1] == "0 failure(s)", run.stdout[-4000:]
    assert run.returncode == 0
