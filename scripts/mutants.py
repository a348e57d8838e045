"""Mutation check of the test suite (`make test-mutants`).

Plants deliberate bugs, one at a time, in a scratch copy of the project: in the Python rules of
the primitives (JVP, transpose, batching, lowering parameters) and in the C++ handlers (the
scratch copy's CPU library is rebuilt for those). For each bug it runs the tests that guard that
code and expects them to fail. The un-mutated scratch copy runs the same tests first and must
pass, so a mutant counts as caught only because of its bug.

    python scripts/mutants.py            # every mutant; exit status 1 if any survives
    python scripts/mutants.py --list     # the table of mutants, without running anything
    python scripts/mutants.py --only ID  # one mutant (repeatable)

When a bug is found that the suite missed, add the test that catches it and a mutant here that
reproduces the bug.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = "dk_jax/_modes.py"
RULES = "dk_jax/_rules.py"
LOWERING = "dk_jax/_lowering.py"
CPU = "xla_ffi/dk_cpu_loops.h"
DISPATCH = "xla_ffi/dk_cpu.cc"
MATH = "xla_ffi/dk_math.h"
CUDA_V2 = "xla_ffi/dk_cuda_v2.cuh"


@dataclass(frozen=True)
class Mutant:
    """A bug: in `file`, inside the function `where`, the statement(s) `old` become `new`.

    Found by pattern, not by line: `old` is matched ignoring whitespace (a reformatted or moved
    function keeps its mutants), and must occur exactly once in that function. The lines of
    `new` after its first are indented like the line where `old` starts."""

    id: str
    bug: str
    file: str
    where: str
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def native(self) -> bool:
        # CUDA sources are not part of the CPU library (their host check compiles them itself).
        return self.file.startswith("xla_ffi/") and not self.file.endswith((".cu", ".cuh"))

    def span(self, text: str) -> tuple[int, int]:
        """Where the function `where` is defined in text: a Python def up to the next line at
        its indentation or less, or a C++ function (or method) from its name to its closing
        brace."""
        if self.file.endswith(".py"):
            m = re.search(rf"^( *)def {re.escape(self.where)}\(", text, re.M)
            if m is None:
                raise LookupError(f"no function {self.where} in {self.file}")
            after = re.compile(rf"^ {{0,{len(m.group(1))}}}\S", re.M)
            body = after.search(text, text.index("\n", text.index(":\n", m.end())) + 1)
            return m.start(), body.start() if body else len(text)
        # C++: the name followed by its parameter list and a body (not a call: a call is
        # followed by ";" or an operator before any "{").
        for m in re.finditer(rf"\b{re.escape(self.where)}\s*(<[^;{{}}()]*>)?\s*\(", text):
            depth, i = 0, m.end() - 1
            while True:  # to the end of the parameter list
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            head = re.match(r"[^;{]*\{", text[i:])
            if head is None:
                continue
            depth, j = 0, i + head.end() - 1
            while True:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    return m.start(), j
        raise LookupError(f"no function {self.where} in {self.file}")

    def apply(self, text: str) -> str:
        """text with the bug planted; LookupError where it does not apply exactly once."""
        start, end = self.span(text)
        positions = [i for i in range(start, end) if not text[i].isspace()]
        squeezed = "".join(text[i] for i in positions)
        pattern = "".join(self.old.split())
        found = squeezed.find(pattern)
        if found < 0 or squeezed.find(pattern, found + 1) >= 0:
            count = squeezed.count(pattern)
            raise LookupError(f"{self.id}: its statement occurs {count} times in {self.where}")
        first, last = positions[found], positions[found + len(pattern) - 1] + 1
        line_start = text.rfind("\n", 0, first) + 1
        indent = text[line_start:first] if not text[line_start:first].strip() else ""
        new = textwrap.dedent(self.new).strip("\n").replace("\n", "\n" + indent)
        return text[:first] + new + text[last:]


MUTANTS = [
    Mutant(
        "lowering-stride-dilation",
        "stride and dilation swapped in the lowering of every mode but the forward",
        LOWERING,
        "_kernel_lowering",
        'attributes = {k: np.int64(v) for k, v in params["geometry"]._asdict().items()}',
        'g = params["geometry"]\n'
        'if mode != "forward":\n'
        "    g = g._replace(stride_h=g.dilation_h, stride_w=g.dilation_w,\n"
        "                   dilation_h=g.stride_h, dilation_w=g.stride_w)\n"
        "attributes = {k: np.int64(v) for k, v in g._asdict().items()}",
        ("tests/test_grads.py::test_depthwise_derivatives_match_reference",),
    ),
    Mutant(
        "jvp-drops-a-term",
        "the JVP sums the tangent terms of all arguments but the last",
        RULES,
        "_sum_tangents",
        "for t in terms[1:]:",
        "for t in terms[1:-1]:",
        ("tests/test_ops.py::test_gradients_match_reference",),
    ),
    Mutant(
        "transpose-wrong-primitive",
        "the transpose of grad_offset in its cotangent points at jvp_rotation",
        MODES,
        "transpose",
        "target = self.mode_of(m.form, slot)",
        'form = "jvp_rotation" if (mode, role) == ("grad_offset", "cot") else m.form\n'
        "target = self.mode_of(form, slot)",
        ("tests/test_grads.py::test_transposed_vjp_is_the_jvp",),
    ),
    Mutant(
        "batch-interleave",
        "the batching rule unfolds (B*N, ...) as (N, B, ...)",
        RULES,
        "_batch",
        "out = out.reshape(size, n, *out.shape[1:])",
        "out = out.reshape(n, size, *out.shape[1:]).swapaxes(0, 1)",
        ("tests/test_grads.py::test_per_example_gradients_with_shared_and_batched_weight",),
    ),
    Mutant(
        "batch-weight-first-sample",
        "a shared weight's per-example gradient keeps the first sample instead of the sum",
        RULES,
        "_batch",
        "out = out.sum(axis=1, keepdims=True)",
        "out = out[:, :1]",
        ("tests/test_grads.py::test_per_example_gradients_with_shared_and_batched_weight",),
    ),
    Mutant(
        "nd-jvp-sign",
        "the JVP of nd_linear_sample in coord has the wrong sign",
        RULES,
        "_position_jvp",
        'ops["tangent"] = s',
        'ops["tangent"] = -s if family.name == "nd" else s',
        ("tests/test_grads.py::test_nd_derivatives_match_reference",),
    ),
    Mutant(
        "grad-image-stride",
        "the image gradient reads the next output row when the stride is not 1",
        CPU,
        "dk_row",
        "        const int64_t tap = a * p.Kw + b;\n"
        "        const auto img = image_footprint<kDeform>(p, off, i, j, a, b);\n",
        "        const int64_t tap = a * p.Kw + b;\n"
        "        const auto img = image_footprint<kDeform>(\n"
        "            p, off, (M == Mode::kGradImage && p.sh > 1) ? i + 1 : i, j, a, b);\n",
        ("tests/test_grads.py::test_depthwise_derivatives_match_reference",),
    ),
    Mutant(
        "grad-rotation-one-group",
        "with one rotation group the column derivative of the rotation is the row one",
        CPU,
        "dk_row",
        "            o[1] = narrow<T>(sv);\n",
        "            o[1] = narrow<T>(kOneGroup ? su : sv);\n",
        ("tests/test_grads.py::test_depthwise_derivatives_match_reference",),
    ),
    Mutant(
        "grad-weight-per-sample",
        "per-sample weight gradients (a batched weight under vmap) skip each sample's last row",
        CPU,
        "dk_run",
        "std::pair<int64_t, int64_t>{chunk * p.Ho, (chunk + 1) * p.Ho}",
        "std::pair<int64_t, int64_t>{chunk * p.Ho, (chunk + 1) * p.Ho - 1}",
        ("tests/test_grads.py::test_per_example_gradients_with_shared_and_batched_weight",),
    ),
    Mutant(
        "forward-low-accumulation",
        "the bfloat16/float16 forward accumulates in the input precision",
        CPU,
        "forward_block",
        "      acc[v] += tap_product(image, kernel);\n",
        "      T low[kLanes<F>];\n"
        "      store_vec(low, acc[v]);\n"
        "      acc[v] = load_vec(low) + tap_product(image, kernel);\n",
        ("tests/test_grads.py::test_low_precision_accumulates_in_float32",),
    ),
    Mutant(
        "forward-run-start",
        "every run of a row's locations reads the rotations of the row's first run",
        CPU,
        "forward_row_one_group",
        "const T* rot = A.rotation + loc0 * stride + 2 * tap;",
        "const T* rot = A.rotation + (loc0 - j0) * stride + 2 * tap;",
        ("tests/test_ops.py::test_sample_depthwise_matches_reference",),
    ),
    Mutant(
        "corners-nan-reads-nothing",
        "the branch-free footprint gives a NaN position a zero weight (it reads zero, not NaN)",
        MATH,
        "bilinear_corners",
        "w[0] = nan ? u + v : w[0];",
        "w[0] = w[0];",
        ("tests/test_math_host.py", "tests/test_ops.py::test_nan_positions_read_and_write_nothing"),
    ),
    Mutant(
        "grad-rotation-low-accumulation",
        "the rotation gradient sums channels in the input precision",
        CPU,
        "dk_row",
        "                vu += d * blend_vec<4>(kf.dwdu, wr, c);\n"
        "                vv += d * blend_vec<4>(kf.dwdv, wr, c);\n",
        "                T low[kLanes<F>];\n"
        "                store_vec(low, vu + d * blend_vec<4>(kf.dwdu, wr, c));\n"
        "                vu = load_vec(low);\n"
        "                store_vec(low, vv + d * blend_vec<4>(kf.dwdv, wr, c));\n"
        "                vv = load_vec(low);\n",
        ("tests/test_grads.py::test_low_precision_accumulates_in_float32",),
    ),
    Mutant(
        "nd-grad-coord-high-dims",
        "the coordinate gradient of nd_linear_sample differentiates along axis 0 beyond 3 dims",
        CPU,
        "nd_run",
        "            const F w = nd_corner_weight(f, k, int(e));\n",
        "            const F w = nd_corner_weight(f, k, e < 3 ? int(e) : 0);\n",
        ("tests/test_grads.py::test_nd_derivatives_match_reference",),
    ),
    Mutant(
        "cols-jvp-rotation",
        "the columns JVP in rotation uses the row tangent for both axes",
        CPU,
        "dk_row",
        "widen(tan[r]), widen(tan[r + 1]));\n            }\n#pragma GCC ivdep",
        "widen(tan[r]), widen(tan[r]));\n            }\n#pragma GCC ivdep",
        ("tests/test_grads.py::test_columns_derivatives_match_reference",),
    ),
    Mutant(
        "dispatch-ignores-cpu",
        "auto picks the best build the library has, whether or not the CPU can run it",
        DISPATCH,
        "resolve_cpu_isa",
        "      if (has(supported, isa)) return isa;\n",
        "      return isa;\n",
        ("tests/test_build.py::test_dispatch_rule_never_picks_an_unsupported_build",),
    ),
    Mutant(
        "nan-position-scatters",
        "a NaN position's gradient is scattered into element 0 of the plane it reads",
        MATH,
        "scatters_to",
        "  return f.index[k] >= 0 && !f.nan;\n",
        "  return f.index[k] >= 0;\n",
        ("tests/test_ops.py::test_nan_positions_read_and_write_nothing",),
    ),
    Mutant(
        "v2-vector-one-group",
        "the v2 kernels give a lane's vector of channels the rotation group of its first channel",
        CUDA_V2,
        "group_bases",
        "group_base[v] = ((c + v) % G) * taps;",
        "group_base[v] = (c % G) * taps;",
        ("tests/test_cuda_host.py",),
    ),
    Mutant(
        "v2-gather-stride",
        "the v2 image-gradient gather takes every output whose tap lands near a pixel, ignoring"
        " the stride",
        CUDA_V2,
        "output_position",
        "return (i < out_size && image_position(i, a, stride, pad, dil) == h) ? i : -1;",
        "return i < out_size ? i : -1;",
        ("tests/test_cuda_host.py",),
    ),
    Mutant(
        "v2-scatter-corner-weight",
        "the v2 DK+DCN image gradient gives every bilinear corner the full tap value",
        CUDA_V2,
        "grad_image_scatter_kernel",
        "scatter_add<V>(gx_n + im.off[k] + c, im.w[k], d);",
        "scatter_add<V>(gx_n + im.off[k] + c, 1.f, d);",
        ("tests/test_cuda_host.py",),
    ),
]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def scratch_copy(dest: Path) -> None:
    """The project's files as they are now (tracked and new), and the built CPU library."""
    listed = run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    library = importlib.util.find_spec("dk_jax._dk_cpu").origin
    shutil.copy2(library, dest / "dk_jax" / Path(library).name)


def build_cpu_library(src: Path) -> None:
    """Builds the scratch copy's CPU library (no CUDA) and puts it into its dk_jax/."""
    build = src / "build-mutant"
    # cmake and ninja come with the build requirements, beside this interpreter.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not (build / "build.ninja").exists():
        pybind11_dir = run([sys.executable, "-m", "pybind11", "--cmakedir"]).stdout.strip()
        configure = ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja"]
        configure += ["-DCMAKE_BUILD_TYPE=Release", "-DDK_JAX_CUDA=OFF"]
        configure += [f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11_dir}"]
        run(configure, env=env)
    run(["cmake", "--build", str(build), "--target", "_dk_cpu"], env=env)
    (library,) = build.glob("_dk_cpu*.so")
    shutil.copy2(library, src / "dk_jax" / library.name)


# pytest in the scratch copy: the editable install's import redirection is removed first, so
# `import dk_jax` finds the scratch copy's package and library.
RUNNER = (
    "import sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path "
    "if type(f).__name__ != 'ScikitBuildRedirectingFinder']; "
    "sys.path.insert(0, sys.argv[1]); "
    "import pytest, dk_jax; "
    "assert dk_jax.__file__.startswith(sys.argv[1]), dk_jax.__file__; "
    "raise SystemExit(pytest.main(sys.argv[2:]))"
)


def pytest_in(src: Path, tests, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", RUNNER, str(src), "-q", "-p", "no:cacheprovider", *extra, *tests]
    return subprocess.run(cmd, cwd=src, capture_output=True, text=True)


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def table(rows) -> str:
    lines = ["| mutant | where | planted bug | caught by | s |", "|---|---|---|---|---|"]
    for m, caught, seconds in rows:
        where = f"`{m.file}`, `{m.where}`"
        lines.append(f"| `{m.id}` | {where} | {m.bug} | {caught or '**not caught**'} | {seconds} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--only", action="append", default=[], metavar="ID")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.list:
        print(table([(m, "`" + "`, `".join(m.tests) + "`", "") for m in mutants]))
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dk-mutants-") as tmp:
        src = Path(tmp)
        scratch_copy(src)
        for m in mutants:
            try:
                m.apply((src / m.file).read_text())
            except LookupError as e:
                print(f"mutant {m.id} no longer applies: {e}")
                return 2
        tests = sorted({t for m in mutants for t in m.tests})
        baseline = pytest_in(src, tests)
        if baseline.returncode != 0:
            print(baseline.stdout[-4000:], baseline.stderr[-2000:])
            print("the un-mutated scratch copy fails its tests; fix that first")
            return 2
        print(f"baseline: {baseline.stdout.strip().splitlines()[-1]}", flush=True)
        rows = []
        (library,) = (src / "dk_jax").glob("_dk_cpu*.so")
        shutil.copy2(library, src / "built-library.so")
        for m in mutants:
            t0 = time.perf_counter()
            path = src / m.file
            original = path.read_text()
            path.write_text(m.apply(original))
            try:
                if m.native:
                    build_cpu_library(src)
                result = pytest_in(src, m.tests, "-x")
            finally:
                path.write_text(original)
                shutil.copy2(src / "built-library.so", library)
            caught = first_failure(result.stdout) if result.returncode == 1 else ""
            seconds = round(time.perf_counter() - t0)
            rows.append((m, f"`{caught}`" if caught else "", seconds))
            verdict = f"caught by {caught}" if caught else "NOT CAUGHT"
            print(f"{m.id}: {verdict} ({seconds} s)", flush=True)
    print()
    print(table(rows))
    survivors = [m.id for m, caught, _ in rows if not caught]
    print(
        f"\n{len(rows) - len(survivors)} of {len(rows)} mutants caught in "
        f"{time.perf_counter() - start:.0f} s"
    )
    if survivors:
        print("survived: " + ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
