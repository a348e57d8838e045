// The CPU XLA FFI handlers and the choice of the build of the loops they call.
//
// A handler reads its call (operands, sizes, geometry) and hands it to the active build's entry
// point: one of the per-instruction-set builds of dk_cpu_loops.h (dk_cpu_<isa>.cc). This file,
// like the rest of the library outside those builds, is compiled for the architecture's
// baseline, so loading the library and choosing a build is safe on any CPU of it.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "dk_common.h"
#include "dk_cpu_isa.h"
#include "dk_cpu_kernels.h"
#include "dk_targets.h"

namespace dk {
namespace {

// The builds in this library, best first; each table carries its name.
std::vector<const CpuKernels*> builds() {
#if defined(__x86_64__)
  return {&cpu_kernels_avx512(), &cpu_kernels_avx2(), &cpu_kernels_baseline()};
#else
  return {&cpu_kernels_baseline()};
#endif
}

const CpuKernels* built_kernels(const std::string& isa) {
  for (const CpuKernels* k : builds()) {
    if (isa == k->isa) return k;
  }
  return nullptr;
}

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  // libgcc's checks include the operating system's support for the wider register state.
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "baseline";
}

// The active build, or null with the reason in `error` (DK_JAX_CPU_ISA asked for one this CPU
// can't run). Set from the environment on first use.
struct Selection {
  std::atomic<const CpuKernels*> kernels{nullptr};
  std::string error;
};

Selection& selection() {
  static Selection* s = [] {
    auto* sel = new Selection;
    const char* env = std::getenv("DK_JAX_CPU_ISA");
    try {
      const std::string isa =
          resolve_cpu_isa(env ? env : "auto", cpu_isas_built(), cpu_isas_supported());
      sel->kernels.store(built_kernels(isa));
    } catch (const std::invalid_argument& e) {
      sel->error = e.what();
    }
    return sel;
  }();
  return *s;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

template <Mode M, bool kDeform, DkKernel CpuKernels::*kKernel>
ffi::Error dk_handler(ffi::ThreadPool pool, ffi::RemainingArgs args,
                      ffi::Result<ffi::AnyBuffer> out, const Geometry& geometry) {
  DkCall call;
  if (auto err = read_dk_call(M, kDeform, args, *out, geometry, &call); err.failure()) return err;
  const CpuKernels* kernels = selection().kernels.load(std::memory_order_relaxed);
  if (kernels == nullptr) return invalid(selection().error);
  return (kernels->*kKernel)(&pool, call);
}

template <NdMode M, NdKernel CpuKernels::*kKernel>
ffi::Error nd_handler(ffi::ThreadPool pool, ffi::RemainingArgs args,
                      ffi::Result<ffi::AnyBuffer> out) {
  // Operands: forward (data, coord); grad data (gout, coord); JVP (data, coord, dcoord);
  // grad coord (gout, data, coord).
  const size_t expected = (M == NdMode::kForward || M == NdMode::kGradData) ? 2 : 3;
  if (args.size() != expected) return invalid("wrong number of operands");
  std::vector<ffi::AnyBuffer> b;
  for (size_t k = 0; k < expected; ++k) {
    auto buf = args.get<ffi::AnyBuffer>(k);
    if (buf.has_error()) return buf.error();
    if (buf->element_type() != out->element_type()) return invalid("operands must share one dtype");
    b.push_back(*buf);
  }
  NdCall call;
  const ffi::AnyBuffer& data_like =
      M == NdMode::kGradData ? *out : (M == NdMode::kGradCoord ? b[1] : b[0]);
  const ffi::AnyBuffer& coord = M == NdMode::kGradCoord ? b[2] : b[1];
  if (auto err = read_nd_problem(data_like, coord, &call.p); err.failure()) return err;
  call.dtype = out->element_type();
  call.out = out->untyped_data();
  if (M == NdMode::kGradCoord) {
    call.lhs = b[1].untyped_data(), call.coord = b[2].untyped_data();
    call.tangent = b[0].untyped_data();
  } else {
    call.lhs = b[0].untyped_data(), call.coord = b[1].untyped_data();
    if (M == NdMode::kJvpCoord) call.tangent = b[2].untyped_data();
  }
  const CpuKernels* kernels = selection().kernels.load(std::memory_order_relaxed);
  if (kernels == nullptr) return invalid(selection().error);
  return (kernels->*kKernel)(&pool, call);
}

}  // namespace

std::vector<std::string> cpu_isas_built() {
  std::vector<std::string> out;
  for (const CpuKernels* k : builds()) out.push_back(k->isa);
  return out;
}

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> out;
  for (const auto& isa : cpu_isas_built()) {
    if (cpu_has(isa)) out.push_back(isa);
  }
  return out;
}

std::string resolve_cpu_isa(const std::string& request, const std::vector<std::string>& built,
                            const std::vector<std::string>& supported) {
  auto has = [](const std::vector<std::string>& names, const std::string& n) {
    for (const auto& m : names) {
      if (m == n) return true;
    }
    return false;
  };
  if (request.empty() || request == "auto") {
    for (const auto& isa : built) {
      if (has(supported, isa)) return isa;
    }
    throw std::invalid_argument("DK_JAX_CPU_ISA=auto: this CPU supports none of the builds " +
                                join(built));
  }
  if (!has(built, request)) {
    throw std::invalid_argument("DK_JAX_CPU_ISA='" + request + "' is not one of auto, " +
                                join(built) + " (the builds of this library)");
  }
  if (!has(supported, request)) {
    throw std::invalid_argument("DK_JAX_CPU_ISA='" + request + "' asks for instructions this " +
                                "CPU lacks; it can run: " + join(supported));
  }
  return request;
}

std::string cpu_isa() {
  const CpuKernels* kernels = selection().kernels.load();
  if (kernels == nullptr) throw std::invalid_argument(selection().error);
  return kernels->isa;
}

void set_cpu_isa(const std::string& request) {
  const std::string isa = resolve_cpu_isa(request, cpu_isas_built(), cpu_isas_supported());
  selection().kernels.store(built_kernels(isa));
}

}  // namespace dk

namespace ffi = xla::ffi;

DK_TARGETS(DK_DECLARE_CPU)

#define DK_CPU_HANDLER_dk(name, mode, deform)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cpu,                                               \
                                (dk::dk_handler<dk::Mode::mode, deform,                   \
                                                &dk::CpuKernels::name>),                  \
                                ffi::Ffi::Bind()                                          \
                                    .Ctx<ffi::ThreadPool>()                               \
                                    .RemainingArgs()                                      \
                                    .Ret<ffi::AnyBuffer>()                                \
                                    .Attrs<dk::Geometry>());
#define DK_CPU_HANDLER_nd(name, mode, deform)                                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                               \
      name##_cpu, (dk::nd_handler<dk::NdMode::mode, &dk::CpuKernels::name>),                   \
      ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<ffi::AnyBuffer>());
#define DK_CPU_HANDLER(name, family, mode, deform) DK_CPU_HANDLER_##family(name, mode, deform)
DK_TARGETS(DK_CPU_HANDLER)
