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

// Every mode, once, as in dk_jax/_modes.py (a Python record and a row here are all a new mode
// needs besides its arithmetic). A depthwise (dk) or columns (cols) mode computes one slot of a
// multilinear form: the form's value (slot kY) or its gradient in a linear operand (kX,
// kWeight) or in the tangent. The forms are the forward and its derivatives in the positions:
// with B the kernel's bilinear read, jvp_rotation is the forward with B replaced by
// dB[t] = dB/du t_u + dB/dv t_v, and hvp_rotation (its derivative in rotation along s) the
// forward with B replaced by d2B/du dv * cross, cross = t_u s_v + t_v s_u (one number per group
// and tap, (N, Ho, Wo, G*Kh*Kw)). dk_common.h derives from a mode's (family, form, slot) its
// operands, its loop and its kernel weights; the targets below are named after the Python mode.
//   R(X, Mode, family, Form, Slot, python name)
#define DK_MODES(R, X)                                                         \
  R(X, kForward, dk, kForward, kY, forward)                                    \
  R(X, kGradImage, dk, kForward, kX, grad_image)                               \
  R(X, kGradWeight, dk, kForward, kWeight, grad_weight)                        \
  R(X, kJvpRotation, dk, kJvpRotation, kY, jvp_rotation)                       \
  R(X, kGradRotation, dk, kJvpRotation, kTangent, grad_rotation)               \
  R(X, kJvpOffset, dk, kJvpOffset, kY, jvp_offset)                             \
  R(X, kGradOffset, dk, kJvpOffset, kTangent, grad_offset)                     \
  R(X, kJvpRotationGradImage, dk, kJvpRotation, kX, jvp_rotation_grad_image)   \
  R(X, kJvpRotationGradWeight, dk, kJvpRotation, kWeight, jvp_rotation_grad_weight) \
  R(X, kHvpRotation, dk, kHvpRotation, kY, hvp_rotation)                       \
  R(X, kHvpRotationGradImage, dk, kHvpRotation, kX, hvp_rotation_grad_image)   \
  R(X, kHvpRotationGradWeight, dk, kHvpRotation, kWeight, hvp_rotation_grad_weight) \
  R(X, kGradCrossRotation, dk, kHvpRotation, kTangent, grad_cross_rotation)    \
  R(X, kCols, cols, kForward, kY, forward)                                     \
  R(X, kColsGradImage, cols, kForward, kX, grad_image)                         \
  R(X, kColsJvpRotation, cols, kJvpRotation, kY, jvp_rotation)                 \
  R(X, kColsGradRotation, cols, kJvpRotation, kTangent, grad_rotation)         \
  R(X, kColsJvpOffset, cols, kJvpOffset, kY, jvp_offset)                       \
  R(X, kColsGradOffset, cols, kJvpOffset, kTangent, grad_offset)               \
  R(X, kColsJvpRotationGradImage, cols, kJvpRotation, kX, jvp_rotation_grad_image) \
  R(X, kColsHvpRotation, cols, kHvpRotation, kY, hvp_rotation)                 \
  R(X, kColsHvpRotationGradImage, cols, kHvpRotation, kX, hvp_rotation_grad_image) \
  R(X, kColsGradCrossRotation, cols, kHvpRotation, kTangent, grad_cross_rotation)

// The modes of nd_linear_sample (family nd): R(X, NdMode, python name).
#define DK_ND_MODES(R, X)           \
  R(X, kForward, forward)           \
  R(X, kGradData, grad_data)        \
  R(X, kJvpCoord, jvp_coord)        \
  R(X, kGradCoord, grad_coord)

// Every target: X(name, family, mode, deformable), family `dk` (the depthwise and columns
// handlers, mode a dk::Mode) or `nd` (mode a dk::NdMode). A depthwise or columns mode has a
// target for the deformable ops (dk_deform_<name>, dk_deform_cols_<name>) and, unless its form
// is the offset's, one for the rigid image taps (dk_sample_...). The handler symbols
// (name_cpu, name_cuda), the CPU kernel tables and the registration all expand this list;
// tests/test_build.py checks it equals the targets the Python modes lower to.
#define DK_CALL(X, ...) X(__VA_ARGS__)  // expands the name before X sees it
#define DK_TARGET_NAME_dk(variant, name) dk_##variant##_##name
#define DK_TARGET_NAME_cols(variant, name) dk_##variant##_cols_##name
#define DK_SAMPLE_TARGET(X, mode, family, name) \
  DK_CALL(X, DK_TARGET_NAME_##family(sample, name), dk, mode, false)
#define DK_SAMPLE_TARGET_kForward DK_SAMPLE_TARGET
#define DK_SAMPLE_TARGET_kJvpRotation DK_SAMPLE_TARGET
#define DK_SAMPLE_TARGET_kHvpRotation DK_SAMPLE_TARGET
#define DK_SAMPLE_TARGET_kJvpOffset(...)
#define DK_MODE_TARGETS(X, mode, family, form, slot, name) \
  DK_SAMPLE_TARGET_##form(X, mode, family, name)          \
  DK_CALL(X, DK_TARGET_NAME_##family(deform, name), dk, mode, true)
#define DK_ND_TARGET(X, mode, name) X(dk_nd_##name, nd, mode, false)
#define DK_TARGETS(X) DK_MODES(DK_MODE_TARGETS, X) DK_ND_MODES(DK_ND_TARGET, X)

// Declared with default visibility so the handlers are exported from the module (pybind11
// hides everything else), which lets CI check the symbols with `nm -D`.
#define DK_DECLARE_CPU(name, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cpu(XLA_FFI_CallFrame*);
#define DK_DECLARE_CUDA(name, ...) \
  extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* name##_cuda(XLA_FFI_CallFrame*);
