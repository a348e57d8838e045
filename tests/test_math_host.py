"""The branch-free footprint the CPU forward runs over vector lanes (dk_math.h's
bilinear_corners) equals bilinear_footprint, the one every other loop and the CUDA kernels use:
the same corners and bitwise the same weights at NaN, infinite, edge and in-cell positions, on
planes of every size from empty up (scripts/corners_check.cc, compiled with the host compiler
and the CPU library's floating-point flags)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jax.ffi
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_branch_free_corners_equal_the_footprint(tmp_path):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / "corners_check"
    build = subprocess.run(
        [
            cxx,
            "-std=c++17",
            "-O2",
            "-fno-math-errno",
            "-fno-trapping-math",
            f"-I{ROOT / 'xla_ffi'}",
            "-isystem",
            jax.ffi.include_dir(),
            str(ROOT / "scripts" / "corners_check.cc"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines()[-1] == "0 failure(s)", run.stdout[-4000:]
    assert run.returncode == 0
