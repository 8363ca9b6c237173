// Where a kernel's time goes, phase by phase: compiled in only for the profiling build (-DSAN_PROFILE, see
// benchmarks/profile_kernels.py), where each phase's cycles are summed over threads; otherwise nothing.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(SAN_PROFILE) && (defined(__x86_64__) || defined(__i386__))
#include <x86intrin.h>
#endif

namespace san {

enum Phase : int { kPad, kPack, kProduct, kSoftmax, kLayout, kAggregate, kAggregateGrad, kScatter, kReduce, kPhases };

inline const char* phase_name(int p) {
  static const char* names[kPhases] = {"pad", "pack", "product", "softmax", "layout", "aggregate",
                                       "aggregate_grad", "scatter", "reduce"};
  return names[p];
}

#ifdef SAN_PROFILE
inline std::array<std::atomic<uint64_t>, kPhases>& phase_counters() {
  static std::array<std::atomic<uint64_t>, kPhases> counters{};
  return counters;
}

inline uint64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

struct PhaseTimer {
  int phase;
  uint64_t start;
  explicit PhaseTimer(int p) : phase(p), start(ticks()) {}
  ~PhaseTimer() { phase_counters()[phase] += ticks() - start; }
};
#define SAN_PHASE(p) ::san::PhaseTimer san_phase_timer_(p)
#else
#define SAN_PHASE(p) ((void)0)
#endif

}  // namespace san
