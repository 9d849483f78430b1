// Where an execution's time goes, for benchmarks and users who ask
// (qsp::set_profiling, QSP_PROFILE=1): per direction, the whole execution
// and the part spent in the kernels' parallel regions; the rest is the
// passes (packing, quantization, transposes) and the call itself. Off by
// default: then a scope costs one relaxed atomic load.
#pragma once

#include <cstdint>

namespace qsp::runtime {

enum class profile_direction { forward, backward_data, backward_weights };
enum class profile_phase { total, kernel };

bool profiling_enabled();

// Adds the time from construction to destruction to (direction, phase).
class profile_scope {
public:
    profile_scope(profile_direction d, profile_phase p);
    ~profile_scope();
    profile_scope(const profile_scope &) = delete;
    profile_scope &operator=(const profile_scope &) = delete;

private:
    profile_direction d_;
    profile_phase p_;
    int64_t start_ns_ = -1; // -1: profiling was off when the scope began
};

// Kernel nanoseconds this thread's profile scopes recorded since the last
// call (an execution reads it for its verbose line: kernel vs passes).
int64_t take_thread_kernel_ns();

} // namespace qsp::runtime
