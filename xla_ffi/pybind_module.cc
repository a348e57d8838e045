// The Python side of the FFI library: a dict of capsules, one per handler, for
// jax.ffi.register_ffi_target. Built twice, once for the CPU handlers (DK_PLATFORM_CPU) and once
// for the CUDA handlers (DK_PLATFORM_CUDA), so the CUDA module only exists where it was built.
#include <pybind11/pybind11.h>

#include "xla/ffi/api/c_api.h"

#if defined(DK_PLATFORM_CUDA)
#define DK_SUFFIX(name) name##_cuda
#define DK_MODULE _dk_cuda
#else
#define DK_SUFFIX(name) name##_cpu
#define DK_MODULE _dk_cpu
#endif

#define DK_TARGETS(X)       \
  X(dk_sample_forward)      \
  X(dk_sample_grad_image)   \
  X(dk_sample_grad_weight)  \
  X(dk_sample_jvp_rotation) \
  X(dk_sample_grad_rotation) \
  X(dk_deform_forward)      \
  X(dk_deform_grad_image)   \
  X(dk_deform_grad_weight)  \
  X(dk_deform_jvp_rotation) \
  X(dk_deform_grad_rotation) \
  X(dk_deform_jvp_offset)   \
  X(dk_deform_grad_offset)  \
  X(dk_nd_forward)          \
  X(dk_nd_grad_data)        \
  X(dk_nd_jvp_coord)        \
  X(dk_nd_grad_coord)

#define DK_DECLARE(name) extern "C" XLA_FFI_Error* DK_SUFFIX(name)(XLA_FFI_CallFrame*);
DK_TARGETS(DK_DECLARE)

namespace py = pybind11;

PYBIND11_MODULE(DK_MODULE, m) {
  m.doc() = "dk-jax XLA FFI handlers, as capsules keyed by target name.";
  m.def("registrations", []() {
    py::dict d;
#define DK_ENTRY(name) \
  d[#name] = py::capsule(reinterpret_cast<void*>(&DK_SUFFIX(name)), "xla._CUSTOM_CALL_TARGET");
    DK_TARGETS(DK_ENTRY)
#undef DK_ENTRY
    return d;
  });
}
