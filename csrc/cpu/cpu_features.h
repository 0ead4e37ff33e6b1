#pragma once
// Run-time instruction-set selection. Kernels are compiled for several ISAs and the best one the CPU
// (and OS) supports is chosen once, so one binary runs on any x86-64 and non-x86 builds take the
// portable path.
#include <string>

namespace fastquant::cpu {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;
  bool avx512_vbmi = false;
  bool avx512_vbmi2 = false;
};

// Ordered: each level includes the ones below it. kAvx512Vbmi adds the byte permute and byte expand
// (VBMI, VBMI2; Ice Lake, Zen 4 and later) to kAvx512, for kernels that expand int8 values.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vbmi = 3 };

const CpuFeatures& cpu_features();
// The best ISA this CPU supports, lowered by set_isa_limit (tests use it to reach every path).
Isa active_isa();
Isa best_supported_isa();
const char* isa_name(Isa isa);
// Raises std::invalid_argument for an unknown name or an ISA the CPU does not support.
void set_isa_limit(const std::string& name);
std::string cpu_features_string();

}  // namespace fastquant::cpu
