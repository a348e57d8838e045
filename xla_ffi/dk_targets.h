// The list of FFI targets, shared by the handler files (which export one symbol per target and
// platform, e.g. dk_sample_forward_cpu) and the pybind11 module (which hands them to Python).
//
// The custom-call target names XLA sees are these names plus DK_TARGET_SUFFIX, e.g.
// dk_sample_forward_v1. Programs serialised with jax.export name their targets, so a target's
// name, operand order, layouts, dtypes and attributes form an interface: any change to them
// must come with a new suffix (and the old targets kept while old artifacts are supported), so
// an old artifact fails with "no registered implementation" instead of computing something else.
// Python reads the suffix from the compiled module (dk_jax/_ffi.py), never a copy of it.
#pragma once

#include "xla/ffi/api/c_api.h"

#define DK_TARGET_SUFFIX "_v1"

#define DK_TARGETS(X)        \
  X(dk_sample_forward)       \
  X(dk_sample_grad_image)    \
  X(dk_sample_grad_weight)   \
  X(dk_sample_jvp_rotation)  \
  X(dk_sample_grad_rotation) \
  X(dk_deform_forward)       \
  X(dk_deform_grad_image)    \
  X(dk_deform_grad_weight)   \
  X(dk_deform_jvp_rotation)  \
  X(dk_deform_grad_rotation) \
  X(dk_deform_jvp_offset)    \
  X(dk_deform_grad_offset)   \
  X(dk_sample_jvp_rotation_grad_image)  \
  X(dk_sample_jvp_rotation_grad_weight) \
  X(dk_sample_hvp_rotation)             \
  X(dk_sample_hvp_rotation_grad_image)  \
  X(dk_sample_hvp_rotation_grad_weight) \
  X(dk_sample_grad_cross_rotation)      \
  X(dk_deform_jvp_rotation_grad_image)  \
  X(dk_deform_jvp_rotation_grad_weight) \
  X(dk_deform_hvp_rotation)             \
  X(dk_deform_hvp_rotation_grad_image)  \
  X(dk_deform_hvp_rotation_grad_weight) \
  X(dk_deform_grad_cross_rotation)      \
  X(dk_sample_cols_forward)       \
  X(dk_sample_cols_grad_image)    \
  X(dk_sample_cols_jvp_rotation)  \
  X(dk_sample_cols_grad_rotation) \
  X(dk_deform_cols_forward)       \
  X(dk_deform_cols_grad_image)    \
  X(dk_deform_cols_jvp_rotation)  \
  X(dk_deform_cols_grad_rotation) \
  X(dk_deform_cols_jvp_offset)    \
  X(dk_deform_cols_grad_offset)   \
  X(dk_sample_cols_jvp_rotation_grad_image) \
  X(dk_sample_cols_hvp_rotation)            \
  X(dk_sample_cols_hvp_rotation_grad_image) \
  X(dk_sample_cols_grad_cross_rotation)     \
  X(dk_deform_cols_jvp_rotation_grad_image) \
  X(dk_deform_cols_hvp_rotation)            \
  X(dk_deform_cols_hvp_rotation_grad_image) \
  X(dk_deform_cols_grad_cross_rotation)     \
  X(dk_nd_forward)           \
  X(dk_nd_grad_data)         \
  X(dk_nd_jvp_coord)         \
  X(dk_nd_grad_coord)

// Declared with default visibility so the handlers are exported from the module (pybind11
// hides everything else), which lets CI check the symbols with `nm -D`.
#define DK_DECLARE_CPU(name) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cpu(XLA_FFI_CallFrame*);
#define DK_DECLARE_CUDA(name) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cuda(XLA_FFI_CallFrame*);
