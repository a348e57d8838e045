// What the CPU and CUDA handlers share besides the maths: the list of operations, how their
// buffers are laid out, how a problem's sizes are read off the buffers, and the one place that
// turns an XLA element type into a C++ type.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"
#include "dk_math.h"
#include "dk_targets.h"
#include "dk_types.h"

namespace dk {

namespace ffi = xla::ffi;

// The operations of the depthwise family (sample_depthwise / deform_sample_depthwise), then
// of scope-space im2col (scope_im2col / deform_scope_im2col), whose "columns" are
// (N, Ho, Wo, Sh, Sw, C): cols[n,i,j,s,c] = sum_taps beta_s(tap) * X(tap position, c), with
// beta_s the kernel footprint's weight on scope position s. A depthwise forward is
// sum_s cols[..., s, c] * weight[s, c]; so the columns modes reuse the depthwise arithmetic
// with the weight rows replaced by the location's rows of columns and the cotangent set to 1.
// The modes (DK_MODES, dk_targets.h): each computes one slot of a form, in the depthwise family
// or the columns. Everything a handler needs to know about a mode (its operands, its loop, its
// kernel weights) is derived here from that triple.
enum class Form : int { kForward, kJvpRotation, kJvpOffset, kHvpRotation };
enum class Slot : int { kY, kX, kWeight, kTangent };

#define DK_MODE_ENUM(X, name, ...) name,
enum class Mode : int { DK_MODES(DK_MODE_ENUM, ) };
enum class NdMode : int { DK_ND_MODES(DK_MODE_ENUM, ) };
#undef DK_MODE_ENUM

struct ModeDecl {
  bool cols;
  Form form;
  Slot slot;
};

#define DK_FAMILY_IS_COLS_dk false
#define DK_FAMILY_IS_COLS_cols true

DK_HD constexpr ModeDecl decl(Mode m) {
  switch (m) {
#define DK_MODE_CASE(X, name, family, form, slot, python_name) \
  case Mode::name:                                             \
    return {DK_FAMILY_IS_COLS_##family, Form::form, Slot::slot};
    DK_MODES(DK_MODE_CASE, )
#undef DK_MODE_CASE
  }
  return {false, Form::kForward, Slot::kY};
}

#define DK_MODE_COUNT(...) +1
constexpr int kModeCount = 0 DK_MODES(DK_MODE_COUNT, );
#undef DK_MODE_COUNT

// The mode computing `slot` of `form` in a family (the list has it for every use below).
DK_HD constexpr Mode mode_of(bool cols, Form form, Slot slot) {
  for (int i = 0; i < kModeCount; ++i) {
    const ModeDecl d = decl(Mode(i));
    if (d.cols == cols && d.form == form && d.slot == slot) return Mode(i);
  }
  return Mode::kForward;
}

// The names Python gives forms and slots (dk_jax/_modes.py), for the check that both sides
// declare the same modes.
DK_HD constexpr const char* form_name(Form f) {
  return f == Form::kForward        ? "forward"
         : f == Form::kJvpRotation  ? "jvp_rotation"
         : f == Form::kJvpOffset    ? "jvp_offset"
                                    : "hvp_rotation";
}
DK_HD constexpr const char* slot_name(Slot s) {
  return s == Slot::kY ? "y" : s == Slot::kX ? "x" : s == Slot::kWeight ? "weight" : "tangent";
}

DK_HD constexpr bool is_cols(Mode m) { return decl(m).cols; }

// Which kernel weights the loop of a mode uses: 0 the bilinear weights, 1 their derivative
// along the rotation tangent (the linear slots of jvp_rotation), 2 their cross second
// derivative times the cross tangent (every slot of hvp_rotation but the tangent's).
DK_HD constexpr int kernel_order(Mode m) {
  const ModeDecl d = decl(m);
  const bool linear = d.slot == Slot::kX || d.slot == Slot::kWeight;
  return (d.form == Form::kJvpRotation && linear)                     ? 1
         : (d.form == Form::kHvpRotation && d.slot != Slot::kTangent) ? 2
                                                                      : 0;
}

// The first-order mode whose loop a mode runs: the forward's same slot when only the kernel
// weights differ, itself otherwise.
DK_HD constexpr Mode loop_of(Mode m) {
  return kernel_order(m) > 0 ? mode_of(decl(m).cols, Form::kForward, decl(m).slot) : m;
}

DK_HD constexpr bool is_grad_cross(Mode m) {
  return decl(m).form == Form::kHvpRotation && decl(m).slot == Slot::kTangent;
}

// Replaces a kernel footprint's weights by those the loop of mode M uses (kernel_order):
// along the rotation tangent (u, v) = tan[2 gt], tan[2 gt + 1], or the cross second derivative
// times the cross tangent tan[gt]; gt = g * taps + tap, tan the location's tangent.
template <Mode M, typename T, typename F>
DK_HD void use_order_weights(Footprint<F>& kf, const T* tan, int64_t gt) {
  if constexpr (kernel_order(M) == 1) {
    const F tu = widen(tan[2 * gt]), tv = widen(tan[2 * gt + 1]);
    for (int k = 0; k < 4; ++k) kf.w[k] = position_tangent(kf.dwdu[k], kf.dwdv[k], tu, tv);
  } else if constexpr (kernel_order(M) == 2) {
    const F cross = widen(tan[gt]);
    for (int k = 0; k < 4; ++k) kf.w[k] = kf.duv[k] * cross;
  }
}

// Elements of a location's tangent operand, by the form's tangent: rotation tangents
// (G*taps*2), offset tangents (taps*2) or cross tangents (G*taps).
DK_HD constexpr int64_t tangent_stride(Mode m, int64_t G, int64_t taps) {
  return decl(m).form == Form::kHvpRotation  ? G * taps
         : decl(m).form == Form::kJvpOffset ? taps * 2
                                             : G * taps * 2;
}

// Columns modes whose result is columns (accumulated per location, scope row by scope row).
DK_HD constexpr bool writes_cols(Mode m) { return is_cols(m) && decl(m).slot == Slot::kY; }

// Arguments always come in the order cot, x, offset, rotation, weight, tangent; a mode takes
// every slot of its form but its own (the cotangent standing for y), the positions (offset only
// for the deformable ops), and the weight only in the depthwise family.
DK_HD constexpr bool takes_cot(Mode m) { return decl(m).slot != Slot::kY; }
DK_HD constexpr bool takes_x(Mode m) { return decl(m).slot != Slot::kX; }
DK_HD constexpr bool takes_weight(Mode m) { return !is_cols(m) && decl(m).slot != Slot::kWeight; }
DK_HD constexpr bool takes_tangent(Mode m) {
  return decl(m).form != Form::kForward && decl(m).slot != Slot::kTangent;
}

template <typename T>
struct Operands {
  const T* cot = nullptr;
  const T* x = nullptr;
  const T* offset = nullptr;
  const T* rotation = nullptr;
  const T* weight = nullptr;
  const T* tangent = nullptr;
  T* out = nullptr;
};

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dk_jax: " + what);
}

// Calls f(T{}) with T the C++ type of `dtype`: the single place where dtypes are dispatched.
template <typename F>
ffi::Error dispatch_float(ffi::DataType dtype, F&& f) {
  switch (dtype) {
    case ffi::DataType::F64:
      return f(double{});
    case ffi::DataType::F32:
      return f(float{});
    case ffi::DataType::BF16:
      return f(bf16{});
    case ffi::DataType::F16:
      return f(f16{});
    default:
      return invalid(
          "unsupported element type; expected float64, float32, bfloat16 or float16");
  }
}

// Reads the operands of a depthwise-family call in their canonical order and the sizes of the
// problem off their shapes. `buffers` holds the inputs; `result` the output.
struct DkCall {
  Problem p;
  ffi::DataType dtype;
  const void* cot = nullptr;
  const void* x = nullptr;
  const void* offset = nullptr;
  const void* rotation = nullptr;
  const void* weight = nullptr;
  const void* tangent = nullptr;
  void* out = nullptr;
  int64_t out_elements = 0;

  template <typename T>
  Operands<T> typed() const {
    Operands<T> o;
    o.cot = static_cast<const T*>(cot);
    o.x = static_cast<const T*>(x);
    o.offset = static_cast<const T*>(offset);
    o.rotation = static_cast<const T*>(rotation);
    o.weight = static_cast<const T*>(weight);
    o.tangent = static_cast<const T*>(tangent);
    o.out = static_cast<T*>(out);
    return o;
  }
};

// The geometry of a depthwise or columns call: one named int64 attribute per field, filled by
// dk_jax._modes.Geometry (the scope is the columns'; 0 for the depthwise targets).
struct Geometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t rotation_groups, scope_h, scope_w;
};

inline ffi::Error read_dk_call(Mode mode, bool deform, const ffi::RemainingArgs& args,
                               ffi::AnyBuffer result, const Geometry& g, DkCall* call) {
  const size_t expected = size_t(takes_cot(mode)) + size_t(takes_x(mode)) + size_t(deform) + 1 +
                          size_t(takes_weight(mode)) + size_t(takes_tangent(mode));
  if (args.size() != expected) return invalid("wrong number of operands");
  size_t next = 0;
  ffi::DataType dtype = result.element_type();
  auto take = [&](const void** ptr, ffi::AnyBuffer* keep) -> ffi::Error {
    auto buf = args.get<ffi::AnyBuffer>(next++);
    if (buf.has_error()) return buf.error();
    if (buf->element_type() != dtype) return invalid("operands must share one dtype");
    *ptr = buf->untyped_data();
    if (keep) *keep = *buf;
    return ffi::Error::Success();
  };
  ffi::AnyBuffer cot_b = result, x_b = result, rot_b = result, w_b = result;
  ffi::Error err = ffi::Error::Success();
  if (takes_cot(mode) && (err = take(&call->cot, &cot_b)).failure()) return err;
  if (takes_x(mode) && (err = take(&call->x, &x_b)).failure()) return err;
  if (deform && (err = take(&call->offset, nullptr)).failure()) return err;
  if ((err = take(&call->rotation, &rot_b)).failure()) return err;
  if (takes_weight(mode) && (err = take(&call->weight, &w_b)).failure()) return err;
  if (takes_tangent(mode) && (err = take(&call->tangent, nullptr)).failure()) return err;

  // Image sizes come from x, or from the result when x is what is being computed.
  const auto xd = takes_x(mode) ? x_b.dimensions() : result.dimensions();
  const auto rd = rot_b.dimensions();
  if (xd.size() != 4 || rd.size() != 4) return invalid("bad operand ranks");
  Problem& p = call->p;
  p.N = xd[0], p.H = xd[1], p.W = xd[2], p.C = xd[3];
  p.Ho = rd[1], p.Wo = rd[2];
  p.Kh = g.kernel_h, p.Kw = g.kernel_w, p.sh = g.stride_h, p.sw = g.stride_w;
  p.ph = g.pad_h, p.pw = g.pad_w, p.dh = g.dilation_h, p.dw = g.dilation_w;
  p.G = g.rotation_groups;
  bool ok;
  if (is_cols(mode)) {
    // Columns (N, Ho, Wo, Sh, Sw, C): the cotangent, or the result of the forward and JVPs.
    p.Sh = g.scope_h, p.Sw = g.scope_w, p.Nw = p.N;
    const auto cd = takes_cot(mode) ? cot_b.dimensions() : result.dimensions();
    ok = cd.size() == 6 && cd[0] == p.N && cd[1] == p.Ho && cd[2] == p.Wo &&
         cd[3] == p.Sh && cd[4] == p.Sw && cd[5] == p.C;
  } else {
    const auto wd = takes_weight(mode) ? w_b.dimensions() : result.dimensions();
    if (wd.size() != 4) return invalid("bad operand ranks");
    p.Nw = wd[0], p.Sh = wd[1], p.Sw = wd[2];
    ok = wd[3] == p.C && (p.Nw == 1 || p.Nw == p.N);
  }
  if (!ok || p.G <= 0 || p.C % p.G != 0 || rd[0] != p.N || rd[3] != p.G * p.taps() * 2) {
    return invalid("inconsistent operand shapes");
  }
  call->dtype = dtype;
  call->out = result.untyped_data();
  call->out_elements = int64_t(result.element_count());
  return ffi::Error::Success();
}

inline ffi::Error read_nd_problem(ffi::AnyBuffer data_like, ffi::AnyBuffer coord, NdProblem* p) {
  const auto dd = data_like.dimensions();
  const auto cd = coord.dimensions();
  if (cd.size() != 3 || dd.size() < 3) return invalid("bad operand ranks");
  p->Nb = cd[0], p->M = cd[1];
  p->dims = int(cd[2]);
  if (int64_t(dd.size()) != p->dims + 2 || dd[0] != p->Nb || p->dims > 6 || p->dims < 1) {
    return invalid("inconsistent operand shapes");
  }
  for (int d = 0; d < p->dims; ++d) p->shape[d] = dd[1 + d];
  p->C = dd[dd.size() - 1];
  return ffi::Error::Success();
}

}  // namespace dk

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    dk::Geometry, ::xla::ffi::StructMember<int64_t>("kernel_h"),
    ::xla::ffi::StructMember<int64_t>("kernel_w"), ::xla::ffi::StructMember<int64_t>("stride_h"),
    ::xla::ffi::StructMember<int64_t>("stride_w"), ::xla::ffi::StructMember<int64_t>("pad_h"),
    ::xla::ffi::StructMember<int64_t>("pad_w"), ::xla::ffi::StructMember<int64_t>("dilation_h"),
    ::xla::ffi::StructMember<int64_t>("dilation_w"),
    ::xla::ffi::StructMember<int64_t>("rotation_groups"),
    ::xla::ffi::StructMember<int64_t>("scope_h"), ::xla::ffi::StructMember<int64_t>("scope_w"));
