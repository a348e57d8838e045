"""Claims about the build: the CPU library always exists and exports every handler; the CUDA
library exists and exports them too wherever nvcc was on the PATH at install time."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

SECOND_ORDER = [
    "jvp_rotation_grad_image",
    "jvp_rotation_grad_weight",
    "hvp_rotation",
    "hvp_rotation_grad_image",
    "hvp_rotation_grad_weight",
    "grad_cross_rotation",
]
COLS_SECOND_ORDER = [
    "jvp_rotation_grad_image",
    "hvp_rotation",
    "hvp_rotation_grad_image",
    "grad_cross_rotation",
]
TARGETS = [
    f"dk_{kind}_{mode}"
    for kind, modes in [
        (
            "sample",
            ["forward", "grad_image", "grad_weight", "jvp_rotation", "grad_rotation"]
            + SECOND_ORDER,
        ),
        (
            "deform",
            [
                "forward",
                "grad_image",
                "grad_weight",
                "jvp_rotation",
                "grad_rotation",
                "jvp_offset",
                "grad_offset",
            ]
            + SECOND_ORDER,
        ),
        (
            "sample_cols",
            ["forward", "grad_image", "jvp_rotation", "grad_rotation"] + COLS_SECOND_ORDER,
        ),
        (
            "deform_cols",
            ["forward", "grad_image", "jvp_rotation", "grad_rotation", "jvp_offset", "grad_offset"]
            + COLS_SECOND_ORDER,
        ),
        ("nd", ["forward", "grad_data", "jvp_coord", "grad_coord"]),
    ]
    for mode in modes
]


def exported(path: str) -> set[str]:
    out = subprocess.run(
        ["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_library_exports_every_handler(platform):
    spec = importlib.util.find_spec(f"dk_jax._dk_{platform}")
    if platform == "cuda" and spec is None:
        # Only acceptable where the build could not have found nvcc.
        assert shutil.which("nvcc") is None, "nvcc is on the PATH but _dk_cuda was not built"
        return
    assert spec is not None and spec.origin, f"dk_jax._dk_{platform} was not built"
    symbols = exported(spec.origin)
    assert {f"{t}_{platform}" for t in TARGETS} <= symbols


def test_registrations_match_targets():
    from dk_jax import _dk_cpu

    # The names XLA sees carry the interface version (see xla_ffi/dk_targets.h).
    assert _dk_cpu.target_suffix() == "_v1"
    assert sorted(_dk_cpu.registrations()) == sorted(t + "_v1" for t in TARGETS)
