"""Shared helpers for the dk-jax tests."""

import os
import shutil
import subprocess
from pathlib import Path

import jax.ffi
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (normwise relative error)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def build_and_run_host_check(tmp_path, source: str, *flags: str, timeout: int = 120):
    """Compiles scripts/<source> with the host C++ compiler ($CXX, else c++; skips without
    one), the project's xla_ffi/ and XLA's FFI headers on the include path, runs it, and
    returns the finished process (the build must succeed)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / Path(source).stem
    build = subprocess.run(
        [cxx, *flags, f"-I{ROOT / 'xla_ffi'}", "-isystem", jax.ffi.include_dir()]
        + [str(ROOT / "scripts" / source), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=timeout)
