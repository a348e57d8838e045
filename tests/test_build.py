"""Claims about the build: the CPU library always exists and exports every handler; the CUDA
library exists and exports them too wherever nvcc was on the PATH at install time. The CPU
library runs on any CPU of its architecture: only its per-instruction-set builds of the loops use
instructions beyond the baseline, and it picks one the CPU has."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from dk_jax import _modes
from dk_jax._modes import FAMILIES

# Every custom-call target the Python primitives lower to, from their declarations.
TARGETS = [target for family in FAMILIES for target in family.targets()]


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


def test_the_python_modes_are_the_registered_targets():
    """The library registers exactly the targets the declared modes lower to (one list in each
    language, neither written from the other)."""
    from dk_jax import _dk_cpu

    assert len(TARGETS) == len(set(TARGETS)) == 46
    # The names XLA sees carry the interface version (see xla_ffi/dk_targets.h).
    assert _dk_cpu.target_suffix() == "_v2"
    assert sorted(_dk_cpu.registrations()) == sorted(t + "_v2" for t in TARGETS)


def test_the_library_declares_each_mode_as_python_does():
    """Each depthwise and columns target computes, in the library's mode list (DK_MODES), the
    same slot of the same form as its Python declaration: the operands, loops and kernel
    weights both sides derive from that pair agree."""
    from dk_jax import _dk_cpu

    declared = {}
    for family in (_modes.DK, _modes.COLS):
        for name, mode in family.modes.items():
            for deformable in (False, True):
                if deformable or not family.takes_offset(name):
                    declared[family.target(name, deformable)] = (mode.form, mode.slot)
    assert _dk_cpu.modes() == declared
    assert len(declared) == 42


# --- instruction sets ------------------------------------------------------------------------

X86 = platform.machine() in ("x86_64", "AMD64")
# Instructions an x86-64 CPU without the named extensions lacks: every VEX/EVEX-encoded one
# (AVX, AVX2, FMA, AVX-512: mnemonics starting with v), BMI/LZCNT/POPCNT/MOVBE, and the common
# SSE3/SSSE3/SSE4 ones; plus any ymm, zmm or mask register.
BEYOND_SSE2 = re.compile(
    r"^(v[a-z0-9]+|andn|bextr|blsi|blsmsk|blsr|bzhi|pdep|pext|rorx|sarx|shlx|shrx|lzcnt|tzcnt"
    r"|popcnt|movbe|round[sp][sd]|pshufb|ptest|pmulld|blendv?p[sd]|pblend[a-z]*|insertps"
    r"|extractps|pinsr[bdq]|pextr[bdq]|pmov[sz]x[a-z]+|palignr|h(add|sub)p[sd]|addsubp[sd]"
    r"|movddup|movs[hl]dup|lddqu|pabs[bwd]|pmax[su][bdw]|pmin[su][bdw]|packusdw|pcmp[ge][qt]q"
    r"|dpp[sd]|crc32|phadd[dw]|phsub[dw]|psign[bdw]|pmaddubsw|pmulhrsw)$"
)
WIDE_REGISTER = re.compile(r"%[yz]mm\d|%k[0-7]\b")
AVX512_REGISTER = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")


def cpu_library_path() -> str:
    spec = importlib.util.find_spec("dk_jax._dk_cpu")
    assert spec is not None and spec.origin
    return spec.origin


def functions_beyond_baseline(path: str) -> dict[str, list[str]]:
    """{function (demangled): its instructions that need more than SSE2} from objdump."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found: dict[str, list[str]] = {}
    function = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        if function is None or "\t" not in line:
            continue
        # "addr:\tmnemonic operands  <symbol>  # comment": keep the mnemonic and operands.
        ins = line.split("\t", 1)[1].split("<")[0].split("#")[0].strip()
        parts = ins.split(None, 1)
        if (
            parts
            and parts[0] in ("rep", "repz", "repnz", "lock", "notrack", "bnd")
            and len(parts) > 1
        ):
            parts = parts[1].split(None, 1)
        if parts and (BEYOND_SSE2.match(parts[0]) or WIDE_REGISTER.search(ins)):
            found.setdefault(function, []).append(ins)
    return found


@pytest.mark.skipif(not X86, reason="the instruction scan reads x86-64 machine code")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump is not installed")
def test_only_the_isa_builds_use_instructions_beyond_the_baseline():
    """The library as built by default (pip install / pip wheel) runs on a baseline x86-64 CPU:
    every function with an AVX, AVX-512, FMA, BMI or SSE3-4 instruction belongs to the AVX2 or
    AVX-512 build of the loops, which run only where the CPU has them."""
    from dk_jax import _dk_cpu

    if _dk_cpu.march_native():
        pytest.skip("built with DK_JAX_MARCH_NATIVE=ON: compiled for the building machine")
    found = functions_beyond_baseline(cpu_library_path())
    avx2 = {f: i for f, i in found.items() if "dk::avx2::" in f}
    avx512 = {f: i for f, i in found.items() if "dk::avx512::" in f}
    # The builds are there and use their instruction sets (the scan sees what it looks for).
    assert any("ymm" in i for ins in avx2.values() for i in ins)
    assert any("zmm" in i for ins in avx512.values() for i in ins)
    elsewhere = sorted(set(found) - set(avx2) - set(avx512))
    assert not elsewhere, f"{len(elsewhere)} functions outside the ISA builds, e.g. {elsewhere[:3]}"
    # The AVX2 build uses no AVX-512 register (zmm, masks, or xmm/ymm 16-31).
    leaks = [f for f, ins in avx2.items() if any(AVX512_REGISTER.search(i) for i in ins)]
    assert not leaks, leaks[:3]


def cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    not (X86 and os.path.exists("/proc/cpuinfo")), reason="reads x86-64 flags of /proc/cpuinfo"
)
def test_dispatcher_offers_only_what_the_cpu_has():
    """The builds the library will run are exactly those whose instructions /proc/cpuinfo lists
    (an independent reading of the CPU), and "auto" takes the best of them."""
    from dk_jax import _dk_cpu

    flags = cpuinfo_flags()
    expected = []
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"} <= flags:
        expected.append("avx512")
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
    expected.append("baseline")
    assert _dk_cpu.cpu_isas_built() == ["avx512", "avx2", "baseline"]
    assert _dk_cpu.cpu_isas_supported() == expected
    built = _dk_cpu.cpu_isas_built()
    assert _dk_cpu.resolve_cpu_isa("auto", built, expected) == expected[0]
    for isa in built:
        if isa in expected:
            assert _dk_cpu.resolve_cpu_isa(isa, built, expected) == isa
        else:
            with pytest.raises(ValueError, match="DK_JAX_CPU_ISA"):
                _dk_cpu.resolve_cpu_isa(isa, built, expected)


def test_dispatch_rule_never_picks_an_unsupported_build():
    """The rule on every CPU one could meet: auto is the best supported build, a named build
    must be supported, anything else is refused naming the variable."""
    from dk_jax import _dk_cpu

    built = ["avx512", "avx2", "baseline"]
    for supported in (["baseline"], ["avx2", "baseline"], ["avx512", "avx2", "baseline"]):
        assert _dk_cpu.resolve_cpu_isa("auto", built, supported) == supported[0]
        assert _dk_cpu.resolve_cpu_isa("", built, supported) == supported[0]
        for isa in built:
            if isa in supported:
                assert _dk_cpu.resolve_cpu_isa(isa, built, supported) == isa
            else:
                with pytest.raises(ValueError, match="lacks; it can run: " + ", ".join(supported)):
                    _dk_cpu.resolve_cpu_isa(isa, built, supported)
    with pytest.raises(ValueError, match="DK_JAX_CPU_ISA='sse9' is not one of auto"):
        _dk_cpu.resolve_cpu_isa("sse9", built, built)
    with pytest.raises(ValueError, match="supports none"):
        _dk_cpu.resolve_cpu_isa("auto", built, [])


@pytest.mark.parametrize("request_", ["baseline", "avx3"])
def test_environment_variable_is_read_at_load(request_):
    """DK_JAX_CPU_ISA picks the build when the library loads; a name it can't honour is a
    ValueError naming the variable when dk_jax loads the library."""
    code = "import dk_jax; print(dk_jax.cpu_isa())"
    env = dict(os.environ, DK_JAX_CPU_ISA=request_)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if request_ == "baseline":
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == "baseline"
    else:
        assert out.returncode != 0
        assert "ValueError: DK_JAX_CPU_ISA='avx3' is not one of" in out.stderr


def isa_programs():
    """One program per family of CPU loops, each a loss whose value and gradients (and, for
    the second-order modes, a Hessian-vector product) exercise that family's kernels: depthwise
    with one and with two rotation groups, deformable, bfloat16, columns, nd. 37 channels: whole
    vectors of every width and a remainder."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dk_jax

    rng = np.random.default_rng(0)

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.normal(size=shape), dtype)

    c, geo = 37, dict(kernel_size=3, padding=1)
    x, w = normal(2, 9, 8, c), normal(4, 4, c)
    rot, rot2, off = normal(2, 9, 8, 18), normal(2, 9, 8, 36), normal(2, 9, 8, 18)
    data, coord = normal(2, 5, 6, c), jnp.asarray(rng.uniform(-1, 6, size=(11, 3)), jnp.float32)

    def grads(loss, *args):
        return lambda implementation: jax.value_and_grad(
            lambda *a: loss(implementation, *a), tuple(range(len(args)))
        )(*args)

    def sin_sum(y):
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    def hvp(implementation):
        def loss(r):
            return sin_sum(dk_jax.sample_depthwise(x, r, w, **geo, implementation=implementation))

        return jax.jvp(jax.grad(loss), (rot,), (jnp.cos(rot),))

    return {
        "sample_depthwise": grads(
            lambda i, x, r, w: sin_sum(dk_jax.sample_depthwise(x, r, w, **geo, implementation=i)),
            x,
            rot,
            w,
        ),
        "two rotation groups": grads(
            lambda i, x, r, w: sin_sum(
                dk_jax.sample_depthwise(x, r, w, **geo, rotation_groups=2, implementation=i)
            ),
            x[..., :36],
            rot2,
            w[..., :36],
        ),
        "deform_sample_depthwise": grads(
            lambda i, x, o, r, w: sin_sum(
                dk_jax.deform_sample_depthwise(x, o, r, w, **geo, implementation=i)
            ),
            x,
            off,
            rot,
            w,
        ),
        "bfloat16 forward": lambda i: dk_jax.sample_depthwise(
            x.astype(jnp.bfloat16),
            rot.astype(jnp.bfloat16),
            w.astype(jnp.bfloat16),
            **geo,
            implementation=i,
        ),
        "deform_scope_im2col": grads(
            lambda i, x, o, r: sin_sum(
                dk_jax.deform_scope_im2col(x, o, r, **geo, scope_size=4, implementation=i)
            ),
            x,
            off,
            rot,
        ),
        "nd_linear_sample": grads(
            lambda i, d, q: sin_sum(dk_jax.nd_linear_sample(d, q, implementation=i)), data, coord
        ),
        "hvp in rotation": hvp,
    }


def test_every_build_computes_the_same_numbers():
    """Each build of the loops this CPU runs agrees with the xla reference on every family of
    kernels (forward, first- and second-order modes), switched on the same compiled programs.
    `make test-isa` runs the whole operator suite under each build."""
    import jax
    import numpy as np

    import dk_jax
    from dk_jax import _ffi

    active = dk_jax.cpu_isa()
    try:
        for name, program in isa_programs().items():
            want = [np.asarray(a, np.float32) for a in jax.tree.leaves(program("xla"))]
            ffi = jax.jit(lambda program=program: program("ffi"))
            tol = 2e-2 if "bfloat16" in name else 1e-4
            for isa in dk_jax.cpu_isas():
                _ffi.set_cpu_isa(isa)
                assert dk_jax.cpu_isa() == isa
                got = [np.asarray(a, np.float32) for a in jax.tree.leaves(ffi())]
                for g, wv in zip(got, want, strict=True):
                    np.testing.assert_allclose(
                        g, wv, rtol=tol, atol=tol, err_msg=f"{name} under {isa}"
                    )
    finally:
        _ffi.set_cpu_isa(active)
