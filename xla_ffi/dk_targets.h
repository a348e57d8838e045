// The list of FFI targets, shared by the handler files (which export one symbol per target and
// platform, e.g. dk_sample_forward_cpu) and the pybind11 module (which hands them to Python).
//
// The custom-call target names XLA sees are these names plus DK_TARGET_SUFFIX, e.g.
// dk_sample_forward_v2. Programs serialised with jax.export name their targets, so a target's
// name, operand order, layouts, dtypes and attributes form an interface: any change to them
// must come with a new suffix (and the old targets kept while old artifacts are supported), so
// an old artifact fails with "No FFI handler registered for ..." instead of computing something
// else.
// Python reads the suffix from the compiled module (dk_jax/_ffi.py), never a copy of it.
#pragma once

#include "xla/ffi/api/c_api.h"

#define DK_TARGET_SUFFIX "_v2"

// Every target, once: X(name, family, mode, deformable). family is `dk` (the depthwise and
// columns handlers, mode a dk::Mode) or `nd` (nd_linear_sample, mode a dk::NdMode). The handler
// symbols (name_cpu, name_cuda), the CPU kernel tables and the registration all expand this
// list; tests/test_build.py checks it equals the targets the Python modes lower to.
#define DK_TARGETS(X)                                                              \
  X(dk_sample_forward, dk, kForward, false)                                        \
  X(dk_sample_grad_image, dk, kGradImage, false)                                   \
  X(dk_sample_grad_weight, dk, kGradWeight, false)                                 \
  X(dk_sample_jvp_rotation, dk, kJvpRotation, false)                               \
  X(dk_sample_grad_rotation, dk, kGradRotation, false)                             \
  X(dk_deform_forward, dk, kForward, true)                                         \
  X(dk_deform_grad_image, dk, kGradImage, true)                                    \
  X(dk_deform_grad_weight, dk, kGradWeight, true)                                  \
  X(dk_deform_jvp_rotation, dk, kJvpRotation, true)                                \
  X(dk_deform_grad_rotation, dk, kGradRotation, true)                              \
  X(dk_deform_jvp_offset, dk, kJvpOffset, true)                                    \
  X(dk_deform_grad_offset, dk, kGradOffset, true)                                  \
  X(dk_sample_jvp_rotation_grad_image, dk, kJvpRotationGradImage, false)           \
  X(dk_sample_jvp_rotation_grad_weight, dk, kJvpRotationGradWeight, false)         \
  X(dk_sample_hvp_rotation, dk, kHvpRotation, false)                               \
  X(dk_sample_hvp_rotation_grad_image, dk, kHvpRotationGradImage, false)           \
  X(dk_sample_hvp_rotation_grad_weight, dk, kHvpRotationGradWeight, false)         \
  X(dk_sample_grad_cross_rotation, dk, kGradCrossRotation, false)                  \
  X(dk_deform_jvp_rotation_grad_image, dk, kJvpRotationGradImage, true)            \
  X(dk_deform_jvp_rotation_grad_weight, dk, kJvpRotationGradWeight, true)          \
  X(dk_deform_hvp_rotation, dk, kHvpRotation, true)                                \
  X(dk_deform_hvp_rotation_grad_image, dk, kHvpRotationGradImage, true)            \
  X(dk_deform_hvp_rotation_grad_weight, dk, kHvpRotationGradWeight, true)          \
  X(dk_deform_grad_cross_rotation, dk, kGradCrossRotation, true)                   \
  X(dk_sample_cols_forward, dk, kCols, false)                                      \
  X(dk_sample_cols_grad_image, dk, kColsGradImage, false)                          \
  X(dk_sample_cols_jvp_rotation, dk, kColsJvpRotation, false)                      \
  X(dk_sample_cols_grad_rotation, dk, kColsGradRotation, false)                    \
  X(dk_deform_cols_forward, dk, kCols, true)                                       \
  X(dk_deform_cols_grad_image, dk, kColsGradImage, true)                           \
  X(dk_deform_cols_jvp_rotation, dk, kColsJvpRotation, true)                       \
  X(dk_deform_cols_grad_rotation, dk, kColsGradRotation, true)                     \
  X(dk_deform_cols_jvp_offset, dk, kColsJvpOffset, true)                           \
  X(dk_deform_cols_grad_offset, dk, kColsGradOffset, true)                         \
  X(dk_sample_cols_jvp_rotation_grad_image, dk, kColsJvpRotationGradImage, false)  \
  X(dk_sample_cols_hvp_rotation, dk, kColsHvpRotation, false)                      \
  X(dk_sample_cols_hvp_rotation_grad_image, dk, kColsHvpRotationGradImage, false)  \
  X(dk_sample_cols_grad_cross_rotation, dk, kColsGradCrossRotation, false)         \
  X(dk_deform_cols_jvp_rotation_grad_image, dk, kColsJvpRotationGradImage, true)   \
  X(dk_deform_cols_hvp_rotation, dk, kColsHvpRotation, true)                       \
  X(dk_deform_cols_hvp_rotation_grad_image, dk, kColsHvpRotationGradImage, true)   \
  X(dk_deform_cols_grad_cross_rotation, dk, kColsGradCrossRotation, true)          \
  X(dk_nd_forward, nd, kForward, false)                                            \
  X(dk_nd_grad_data, nd, kGradData, false)                                         \
  X(dk_nd_jvp_coord, nd, kJvpCoord, false)                                         \
  X(dk_nd_grad_coord, nd, kGradCoord, false)                                      

// Declared with default visibility so the handlers are exported from the module (pybind11
// hides everything else), which lets CI check the symbols with `nm -D`.
#define DK_DECLARE_CPU(name, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cpu(XLA_FFI_CallFrame*);
#define DK_DECLARE_CUDA(name, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cuda(XLA_FFI_CallFrame*);
