"""Claims about the v2 CUDA kernels that hold without a GPU: compiled with the host C++
compiler (scripts/cuda_host_shim stands in for the CUDA runtime, one std::thread per CUDA
thread, real barriers), the forward (local and deformable), the gather image gradient and the
DK+DCN scatter image gradient agree
with a direct loop over dk_math.h's footprints in every channel path (scalar, 16-byte vector),
with 1, 2, 3 and 4 rotation groups, strides, dilation, per-sample weights and 32- and 64-bit
offsets. The GPU itself is tested by tests/test_gpu.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jax.ffi
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_v2_kernels_match_footprint_loops_on_host_threads(tmp_path):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / "cuda_v2_host_check"
    build = subprocess.run(
        [
            cxx,
            "-std=c++20",
            "-O1",
            "-pthread",
            f"-I{ROOT / 'scripts' / 'cuda_host_shim'}",
            f"-I{ROOT / 'xla_ffi'}",
            "-isystem",
            jax.ffi.include_dir(),
            str(ROOT / "scripts" / "cuda_v2_host_check.cc"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "0 failure(s)"
    # Every kind of launch ran: both index widths, both channel paths, all three kernels.
    checked = [line for line in lines if line.startswith("ok")]
    kinds = ("forward dcn", "grad image ", "grad image dcn")
    for needle in ("V=1 idx32", "V=4 idx64", "V=8 idx32", "G=4", *kinds):
        assert any(needle in line for line in checked), needle
