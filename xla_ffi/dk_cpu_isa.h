// Which build of the CPU loops runs: the library carries one per instruction set (AVX-512,
// AVX2 + FMA and the baseline on x86-64; the baseline, NEON, on aarch64) and picks the best one
// the CPU has at load, unless DK_JAX_CPU_ISA names another (auto | avx512 | avx2 | baseline).
// The environment variable is read once, when the library is first used. Declared apart from
// the handlers so the Python module can report and change the choice without the FFI headers.
#pragma once

#include <string>
#include <vector>

namespace dk {

// The builds in this library, best first ("avx512", "avx2", "baseline" on x86-64).
std::vector<std::string> cpu_isas_built();
// The builds this CPU can run, best first.
std::vector<std::string> cpu_isas_supported();
// The rule: "auto" (or "") is the first supported build; a name must be built and supported.
// Throws std::invalid_argument, naming DK_JAX_CPU_ISA, for anything else.
std::string resolve_cpu_isa(const std::string& request, const std::vector<std::string>& built,
                            const std::vector<std::string>& supported);
// The active build; throws std::invalid_argument if DK_JAX_CPU_ISA asked for one it can't run.
std::string cpu_isa();
// Makes `request` (resolved as above) the active build from the next call on.
void set_cpu_isa(const std::string& request);

}  // namespace dk
