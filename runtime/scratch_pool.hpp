// Scratch memory of executions, borrowed from one process-wide pool and
// given back when the execution ends (oneDNN gives each primitive its own
// scratchpad; a pool shared by all layers needs the memory of the largest
// layer, not the sum over layers). Reusing buffers matters: a fresh
// multi-MB allocation per call costs page faults comparable to the kernels.
// The pool keeps at most its capacity of idle buffers; a larger idle
// remainder is unmapped at once, so one huge layer does not leave gigabytes
// resident after it ran.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace qsp::runtime {

// One execution's scratch: up to `slots` buffers, each borrowed on first use
// and returned to the pool by the destructor. Not shared between threads:
// take the pointers before an OpenMP region and hand them to the workers.
class scratchpad {
public:
    static constexpr int slots = 10;

    scratchpad() = default;
    ~scratchpad();
    scratchpad(const scratchpad &) = delete;
    scratchpad &operator=(const scratchpad &) = delete;

    // At least `bytes` (>= 1) bytes, 64-byte aligned, valid until destruction
    // or the next call for the same slot.
    void *bytes(int slot, size_t bytes);
    template <typename T> T *get(int slot, int64_t elems) {
        return static_cast<T *>(
                bytes(slot, sizeof(T) * static_cast<size_t>(elems > 0 ? elems : 1)));
    }

private:
    struct held {
        void *data = nullptr;
        size_t size = 0;
    };
    std::array<held, slots> held_{};
};

} // namespace qsp::runtime
