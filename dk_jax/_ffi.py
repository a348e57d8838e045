"""Loads the compiled FFI libraries and registers their handlers with XLA.

`_dk_cpu` is always built by `pip install`; `_dk_cuda` only where nvcc was found. Each exposes
`registrations()`, a dict of target name -> capsule, registered here once per platform, and
`target_suffix()`, the interface version every target name ends with (xla_ffi/dk_targets.h is
the one place it is written).

CPU instruction sets: `_dk_cpu` carries its loops compiled for AVX-512, AVX2 + FMA and the
architecture's baseline (x86-64: SSE2; aarch64: NEON) and runs the best one the CPU has.
`DK_JAX_CPU_ISA=auto|avx512|avx2|baseline`, read once when the library loads, picks another; one
the CPU lacks is a ValueError when dk_jax loads it. `cpu_isa()` names the build in use.

Targets and `jax.export`: a serialised program names its custom-call targets, so their names,
operand layouts and attributes are an interface (versioned by the suffix). `jax.export` refuses
custom calls whose targets are not on its list of targets with compatibility guarantees; JAX
(0.10) has no public way to add to that list, so registration adds ours to it (the private
`jax._src.export._export._CUSTOM_CALL_TARGETS_GUARANTEED_STABLE`), guarded so a JAX without it
only loses that convenience. `export_safety_checks()` gives the public alternative: pass it as
`jax.export.export(f, disabled_checks=dk_jax.export_safety_checks())`.
"""

from __future__ import annotations

import importlib

import jax

# XLA platform name used for registration and lowering, by extension module.
_MODULES = {"cpu": "_dk_cpu", "cuda": "_dk_cuda"}
_registered: dict[str, bool] = {}
_errors: dict[str, str] = {}
_batch_partitionable: set[str] = set()
_targets: set[str] = set()
_suffix: list[str] = []


def _allow_in_export(names) -> None:
    """Puts our targets on jax.export's list of targets with compatibility guarantees."""
    try:
        from jax._src.export import _export
    except ImportError:  # pragma: no cover - a JAX that moved it: export_safety_checks() remains
        return
    stable = getattr(_export, "_CUSTOM_CALL_TARGETS_GUARANTEED_STABLE", None)
    if isinstance(stable, set):
        stable.update(names)


def _register(platform: str) -> bool:
    if platform in _registered:
        return _registered[platform]
    try:
        module = importlib.import_module(f"dk_jax.{_MODULES[platform]}")
    except ImportError as e:
        _errors[platform] = str(e)
        _registered[platform] = False
        return False
    if platform == "cpu":
        # A DK_JAX_CPU_ISA this CPU can't run raises ValueError here, naming the variable.
        module.cpu_isa()
    registrations = module.registrations()
    for name, capsule in registrations.items():
        jax.ffi.register_ffi_target(
            name, capsule, platform="CUDA" if platform == "cuda" else platform
        )
        if name not in _batch_partitionable:
            # Every handler maps sample n of each operand to sample n of its result, so XLA
            # may run it on each device's slice of a batch-sharded input.
            jax.ffi.register_ffi_target_as_batch_partitionable(name)
            _batch_partitionable.add(name)
    _targets.update(registrations)
    if not _suffix:
        _suffix.append(module.target_suffix())
    _allow_in_export(registrations)
    _registered[platform] = True
    return True


def target_suffix() -> str:
    """The version suffix of every custom-call target name, e.g. "_v2"."""
    if not _suffix:
        lowering_platforms()
    if not _suffix:
        raise RuntimeError("dk_jax: no FFI library is built, so there are no FFI targets")
    return _suffix[0]


def target_names() -> list[str]:
    """Every custom-call target name of the built libraries (versioned), sorted."""
    lowering_platforms()
    return sorted(_targets)


def export_safety_checks() -> list:
    """`jax.export` safety-check exemptions for the dk_jax targets (public-API route).

    Registration already lists the targets as stable for `jax.export` where the running JAX
    allows it; pass this as `disabled_checks=` to export without relying on that.
    """
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in target_names()]


def _cpu_module():
    if not _register("cpu"):
        raise RuntimeError(f"dk_jax: the CPU library is not available: {why_unavailable('cpu')}")
    return importlib.import_module("dk_jax._dk_cpu")


def cpu_isa() -> str:
    """The instruction set the CPU custom calls run with: "avx512", "avx2" or "baseline".

    The library carries its CPU loops compiled for each and picks the best one this CPU has
    when it loads, unless the environment variable DK_JAX_CPU_ISA (auto, avx512, avx2 or
    baseline) asks for another; asking for one the CPU lacks is a ValueError.
    """
    return _cpu_module().cpu_isa()


def cpu_isas() -> list[str]:
    """The instruction sets of the CPU loops this CPU can run, best first."""
    return list(_cpu_module().cpu_isas_supported())


def set_cpu_isa(isa: str) -> None:
    """Switches the CPU custom calls to the loops for `isa` ("auto" for the best), from the next
    call on, compiled programs included. For tests and benchmarks that compare the builds in one
    process; DK_JAX_CPU_ISA is the way to choose one."""
    _cpu_module().set_cpu_isa(isa)


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
