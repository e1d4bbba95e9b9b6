// Stress test of csrc/cpu/work_sharing.h (built and run by tests/test_work_sharing.py): many threads, many
// phases of random sizes, random delays; every chunk of every phase must be taken exactly once, and every chunk
// given to the prefetch callback must lie in the thread's own share.
#include <omp.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "work_sharing.h"

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 8;
  const int phases = argc > 2 ? std::atoi(argv[2]) : 2000;
  bitnet_cpu::PhaseQueues queues(threads);
  std::vector<int64_t> totals(size_t(phases) + 1);
  std::mt19937 rng(7);
  for (int p = 1; p <= phases; ++p) totals[size_t(p)] = int64_t(rng() % 300);  // 0 .. 299 chunks, some < threads
  int64_t max_total = 0;
  for (int64_t t : totals) max_total = t > max_total ? t : max_total;
  std::vector<std::atomic<int>> taken(static_cast<size_t>(max_total));
  std::atomic<int64_t> errors{0};
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    if (tid == 0) queues.set_threads(nth);
#pragma omp barrier
    std::mt19937 local(uint32_t(tid) + 1);
    auto work = [&](int64_t c) {
      taken[size_t(c)].fetch_add(1, std::memory_order_relaxed);
      for (volatile int spin = int(local() % 2000); spin > 0; spin = spin - 1) {
      }
    };
    for (int p = 1; p <= phases; ++p) {
      const int64_t total = totals[size_t(p)];
      const uint32_t phase = uint32_t(p);
      // The engine's loop (PhaseQueues::run_phase), with a take size that changes from phase to phase.
      queues.run_phase(
          tid, phase, total, 1 + int64_t(phase % 4),
          [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) work(c);
          },
          [&](int64_t c, int64_t end) {
            if (c < queues.share_begin(tid, total) || c >= end) errors.fetch_add(1);  // inside this thread's share
          });
#pragma omp barrier
      if (tid == 0) {
        for (int64_t c = 0; c < total; ++c) {
          if (taken[size_t(c)].load() != 1) {
            if (errors.load() < 10) std::printf("phase %d: chunk %lld taken %d times\n", p, (long long)c, taken[size_t(c)].load());
            errors.fetch_add(1);
          }
          taken[size_t(c)].store(0);
        }
      }
#pragma omp barrier
    }
  }
  std::printf("%s: %d threads, %d phases, %lld errors\n", errors.load() ? "FAIL" : "OK", threads, phases,
              (long long)errors.load());
  return errors.load() ? 1 : 0;
}
