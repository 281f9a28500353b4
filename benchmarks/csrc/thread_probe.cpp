// How far apart the two OpenMP threads of the training kernels run: the mean time for a
// cache line to go from one thread to the other and back (benchmarks/thread_placement.py).
//
// On a virtual machine the two vCPUs may share a last-level cache in one period and sit
// on different core complexes (or sockets) in the next, without the guest seeing it.
// Every kernel that reads what the other thread wrote pays for the distance, so the same
// training step takes noticeably longer in the second placement. This probe tells the
// two apart: thread 0 writes a flag, thread 1 answers, and the round trips are timed.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <atomic>
#include <chrono>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

// Flag values: thread 0 asks (kAsk), thread 1 answers (kAnswered), thread 0 ends (kDone).
constexpr int kAnswered = 0, kAsk = 1, kDone = 2;

// The mean round trip in nanoseconds of each of `bursts` bursts of `rounds` round trips,
// stopping early after `budget_ms` (two threads squeezed onto one core answer only when
// the scheduler switches them). The caller takes the median: a burst in which the
// hypervisor paused a vCPU is an outlier, not a placement. Empty when torch runs fewer
// than two threads or OpenMP does not give two.
std::vector<double> thread_round_trips_ns(int64_t rounds, int64_t bursts, double budget_ms) {
  TORCH_CHECK(rounds >= 1 && bursts >= 1, "rounds and bursts must be >= 1, got ", rounds, " and ", bursts);
  TORCH_CHECK(budget_ms > 0, "budget_ms must be > 0, got ", budget_ms);
  std::vector<double> means;
  if (at::get_num_threads() < 2) return means;
  alignas(64) std::atomic<int> flag{kAnswered};
  alignas(64) std::atomic<int> started{0};
#pragma omp parallel num_threads(2)
  {
    const bool pair = omp_get_num_threads() == 2;
    if (pair && omp_get_thread_num() == 0) {
      while (started.load() == 0) {
      }
      const auto deadline = Clock::now() + std::chrono::duration<double, std::milli>(budget_ms);
      for (int64_t burst = 0; burst < bursts && Clock::now() < deadline; ++burst) {
        const auto start = Clock::now();
        for (int64_t done = 0; done < rounds; ++done) {
          flag.store(kAsk);
          while (flag.load() != kAnswered) {
          }
        }
        means.push_back(std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
                        static_cast<double>(rounds));
      }
      flag.store(kDone);
    } else if (pair) {
      started.store(1);
      for (;;) {
        const int value = flag.load();
        if (value == kAsk) {
          flag.store(kAnswered);
        } else if (value == kDone) {
          break;
        }
      }
    }
  }
  return means;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("thread_round_trips_ns", &thread_round_trips_ns,
        "mean round trip of a cache line between two OpenMP threads per burst, in ns (none with fewer than two)",
        py::arg("rounds"), py::arg("bursts"), py::arg("budget_ms"));
}
