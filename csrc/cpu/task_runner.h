// How the CPU kernels run in parallel, without knowing whose threads they use: the FFI layer
// (csrc/ffi/cpu_ffi.cc) implements TaskRunner on XLA's intra-op thread pool. No XLA types here.
#pragma once

#include <cstdint>
#include <functional>

namespace deft::cpu {

class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  // Threads that may run tasks at once (>= 1); kernels size their tasks from it. No result may
  // depend on it: every output element is computed by one task in a fixed order.
  virtual int64_t threads() const = 0;
  // Calls body(i) exactly once for every i in [0, n), on any threads, and returns after the last
  // call has returned. body must not throw.
  virtual void Run(int64_t n, const std::function<void(int64_t)>& body) = 0;
};

// Runs every task on the calling thread, in order.
class SerialRunner final : public TaskRunner {
 public:
  int64_t threads() const override { return 1; }
  void Run(int64_t n, const std::function<void(int64_t)>& body) override {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
};

}  // namespace deft::cpu
