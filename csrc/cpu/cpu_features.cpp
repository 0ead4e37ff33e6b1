#include "cpu/cpu_features.h"

#include <atomic>
#include <stdexcept>

namespace fastquant::cpu {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  // __builtin_cpu_supports also checks XCR0, so a feature the OS does not save on context switch
  // (AVX-512 state disabled by a hypervisor) reads as absent.
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512_vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512_vbmi = __builtin_cpu_supports("avx512vbmi");
  f.avx512_vbmi2 = __builtin_cpu_supports("avx512vbmi2");
#endif
  return f;
}

std::atomic<int> g_isa_limit{static_cast<int>(Isa::kAvx512Vbmi)};

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

Isa best_supported_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni && f.avx512_bf16 && f.fma) {
    return f.avx512_vbmi && f.avx512_vbmi2 ? Isa::kAvx512Vbmi : Isa::kAvx512;
  }
  if (f.avx2 && f.fma && f.f16c) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa active_isa() {
  const int best = static_cast<int>(best_supported_isa());
  const int limit = g_isa_limit.load(std::memory_order_relaxed);
  return static_cast<Isa>(best < limit ? best : limit);
}

const char* isa_name(Isa isa) {
  // In the order of Isa's values.
  constexpr const char* kNames[] = {"portable", "avx2", "avx512", "avx512_vbmi"};
  return kNames[static_cast<int>(isa)];
}

void set_isa_limit(const std::string& name) {
  Isa wanted;
  if (name == "avx512_vbmi") {
    wanted = Isa::kAvx512Vbmi;
  } else if (name == "avx512") {
    wanted = Isa::kAvx512;
  } else if (name == "avx2") {
    wanted = Isa::kAvx2;
  } else if (name == "portable") {
    wanted = Isa::kPortable;
  } else {
    throw std::invalid_argument("unknown CPU ISA '" + name +
                                "': expected avx512_vbmi, avx512, avx2 or portable");
  }
  if (static_cast<int>(wanted) > static_cast<int>(best_supported_isa())) {
    throw std::invalid_argument(std::string("this CPU does not support the ") + name +
                                " kernels (best: " + isa_name(best_supported_isa()) + ")");
  }
  g_isa_limit.store(static_cast<int>(wanted), std::memory_order_relaxed);
}

std::string cpu_features_string() {
  const CpuFeatures& f = cpu_features();
  std::string s;
  auto add = [&s](bool present, const char* name) {
    if (!present) return;
    if (!s.empty()) s += ' ';
    s += name;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512dq, "avx512dq");
  add(f.avx512_vnni, "avx512_vnni");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.avx512_vbmi, "avx512_vbmi");
  add(f.avx512_vbmi2, "avx512_vbmi2");
  return s.empty() ? std::string("none") : s;
}

}  // namespace fastquant::cpu
