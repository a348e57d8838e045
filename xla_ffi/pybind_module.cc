// The Python side of the FFI library: a dict of capsules, one per handler, for
// jax.ffi.register_ffi_target. Built twice, once for the CPU handlers (DK_PLATFORM_CPU) and once
// for the CUDA handlers (DK_PLATFORM_CUDA), so the CUDA module only exists where it was built.
#include <pybind11/pybind11.h>

#include <string>

#include "dk_common.h"
#include "dk_targets.h"
#if !defined(DK_PLATFORM_CUDA)
#include <pybind11/stl.h>

#include "dk_cpu_isa.h"
#endif

#if defined(DK_PLATFORM_CUDA)
#define DK_SUFFIX(name) name##_cuda
#define DK_MODULE _dk_cuda
#else
#define DK_SUFFIX(name) name##_cpu
#define DK_MODULE _dk_cpu
#endif

#if defined(DK_PLATFORM_CUDA)
DK_TARGETS(DK_DECLARE_CUDA)
#else
DK_TARGETS(DK_DECLARE_CPU)
#endif

namespace py = pybind11;

PYBIND11_MODULE(DK_MODULE, m) {
  m.doc() = "dk-jax XLA FFI handlers, as capsules keyed by (versioned) target name.";
  m.def("target_suffix", []() { return std::string(DK_TARGET_SUFFIX); });
  m.def("registrations", []() {
    py::dict d;
#define DK_ENTRY(name, ...)                                                       \
  d[#name DK_TARGET_SUFFIX] =                                                     \
      py::capsule(reinterpret_cast<void*>(&DK_SUFFIX(name)), "xla._CUSTOM_CALL_TARGET");
    DK_TARGETS(DK_ENTRY)
#undef DK_ENTRY
    return d;
  });
  // The (form, slot) each depthwise and columns target computes, from DK_MODES (dk_common.h),
  // so a test can check that the Python declarations (dk_jax/_modes.py) say the same.
  m.def("modes", []() {
    py::dict d;
#define DK_MODE_ENTRY_dk(name, mode)                                      \
  d[#name] = py::make_tuple(dk::form_name(dk::decl(dk::Mode::mode).form), \
                            dk::slot_name(dk::decl(dk::Mode::mode).slot));
#define DK_MODE_ENTRY_nd(name, mode)
#define DK_MODE_ENTRY(name, family, mode, deform) DK_MODE_ENTRY_##family(name, mode)
    DK_TARGETS(DK_MODE_ENTRY)
#undef DK_MODE_ENTRY
    return d;
  });
#if !defined(DK_PLATFORM_CUDA)
  // The build of the CPU loops (std::invalid_argument becomes ValueError).
  m.def("cpu_isa", &dk::cpu_isa);
  m.def("cpu_isas_built", &dk::cpu_isas_built);
  m.def("cpu_isas_supported", &dk::cpu_isas_supported);
  m.def("resolve_cpu_isa", &dk::resolve_cpu_isa);
  m.def("set_cpu_isa", &dk::set_cpu_isa);
  // Whether the whole library was compiled for the building machine (DK_JAX_MARCH_NATIVE=ON).
#if defined(DK_MARCH_NATIVE)
  m.def("march_native", []() { return true; });
#else
  m.def("march_native", []() { return false; });
#endif
#endif
}
