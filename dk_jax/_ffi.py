"""Loads the compiled FFI libraries and registers their handlers with XLA.

`_dk_cpu` is always built by `pip install`; `_dk_cuda` only where nvcc was found. Each exposes
`registrations()`, a dict of target name -> capsule, registered here once per platform.
"""

from __future__ import annotations

import importlib

import jax

# XLA platform name used for registration and lowering, by extension module.
_MODULES = {"cpu": "_dk_cpu", "cuda": "_dk_cuda"}
_registered: dict[str, bool] = {}
_errors: dict[str, str] = {}
_batch_partitionable: set[str] = set()


def _register(platform: str) -> bool:
    if platform in _registered:
        return _registered[platform]
    try:
        module = importlib.import_module(f"dk_jax.{_MODULES[platform]}")
    except ImportError as e:
        _errors[platform] = str(e)
        _registered[platform] = False
        return False
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(
            name, capsule, platform="CUDA" if platform == "cuda" else platform
        )
        if name not in _batch_partitionable:
            # Every handler maps sample n of each operand to sample n of its result, so XLA
            # may run it on each device's slice of a batch-sharded input.
            jax.ffi.register_ffi_target_as_batch_partitionable(name)
            _batch_partitionable.add(name)
    _registered[platform] = True
    return True


def lowering_platforms() -> list[str]:
    """The platforms for which a compiled FFI library is present (and now registered)."""
    return [p for p in _MODULES if _register(p)]


def available(platform: str) -> bool:
    """Whether the ffi implementation exists for a JAX platform name ("cpu", "gpu", "cuda")."""
    platform = "cuda" if platform in ("gpu", "cuda") else platform
    return platform in _MODULES and _register(platform)


def why_unavailable(platform: str) -> str:
    platform = "cuda" if platform in ("gpu", "cuda") else platform
    if platform not in _MODULES:
        return f"dk_jax has no FFI library for platform {platform!r}"
    return _errors.get(platform, "the library was not built")
