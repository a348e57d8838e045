"""Claims about the v2 CUDA kernels that hold without a GPU: compiled with the host C++
compiler (scripts/cuda_host_shim stands in for the CUDA runtime, one std::thread per CUDA
thread, real barriers), the forward (local and deformable), the gather image gradient and the
DK+DCN scatter image gradient agree
with a direct loop over dk_math.h's footprints in every channel path (scalar, 16-byte vector),
with 1, 2, 3 and 4 rotation groups, strides, dilation, per-sample weights and 32- and 64-bit
offsets. The GPU itself is tested by tests/test_gpu.py."""

from __future__ import annotations

from conftest import ROOT, build_and_run_host_check


def test_v2_kernels_match_footprint_loops_on_host_threads(tmp_path):
    shim = ROOT / "scripts" / "cuda_host_shim"
    run = build_and_run_host_check(
        tmp_path,
        "cuda_v2_host_check.cc",
        "-std=c++20",
        "-O1",
        "-pthread",
        f"-I{shim}",
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "0 failure(s)"
    # Every kind of launch ran: both index widths, both channel paths, all three kernels.
    checked = [line for line in lines if line.startswith("ok")]
    kinds = ("forward dcn", "grad image ", "grad image dcn")
    for needle in ("V=1 idx32", "V=4 idx64", "V=8 idx32", "G=4", *kinds):
        assert any(needle in line for line in checked), needle
