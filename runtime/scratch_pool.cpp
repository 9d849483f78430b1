#include "runtime/scratch_pool.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "qsparseprop/runtime.hpp"
#include "runtime/env.hpp"

namespace qsp::runtime {

namespace {

// Large buffers are mapped directly: unmapping them gives the memory back
// to the system for sure (malloc may keep freed heap memory resident).
constexpr size_t mmap_threshold = size_t(1) << 20;
constexpr size_t page = 4096;

size_t capacity_from_env() {
    return static_cast<size_t>(env_integer("QSP_SCRATCH_CAPACITY_MB", 256, 0, 1ll << 30, "MiB"))
           << 20;
}

struct buffer {
    void *data;
    size_t size;
};

void *allocate(size_t size) {
    if (size >= mmap_threshold) {
        void *p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        // Large scratch (packed activations) is read by kernels that jump
        // between channel planes: 2 MiB pages keep those reads out of the
        // TLB's misses where the kernel grants them (a hint; harmless if not).
        madvise(p, size, MADV_HUGEPAGE);
        return p;
    }
    void *p = std::aligned_alloc(64, size);
    if (!p) throw std::bad_alloc();
    return p;
}

void deallocate(const buffer &b) {
    if (b.size >= mmap_threshold)
        munmap(b.data, b.size);
    else
        std::free(b.data);
}

class pool {
public:
    pool() : capacity_(capacity_from_env()) {}

    buffer acquire(size_t bytes) {
        const size_t size = round_up(bytes);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            // Best fit among the idle buffers.
            auto best = idle_.end();
            for (auto it = idle_.begin(); it != idle_.end(); ++it)
                if (it->size >= size && (best == idle_.end() || it->size < best->size)) best = it;
            if (best != idle_.end()) {
                const buffer b = *best;
                idle_.erase(best);
                idle_bytes_ -= b.size;
                in_use_bytes_ += b.size;
                return b;
            }
            // No idle buffer fits: allocate (the idle ones may still serve
            // other layers, so they stay).
            in_use_bytes_ += size;
            peak_bytes_ = std::max(peak_bytes_, idle_bytes_ + in_use_bytes_);
        }
        try {
            return buffer{allocate(size), size};
        } catch (...) {
            std::lock_guard<std::mutex> lock(mutex_);
            in_use_bytes_ -= size;
            throw;
        }
    }

    void release(const buffer &b) {
        std::vector<buffer> freed;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            in_use_bytes_ -= b.size;
            if (b.size > capacity_) {
                freed.push_back(b); // alone larger than what we keep
            } else {
                idle_.push_back(b);
                idle_bytes_ += b.size;
                freed = trim_locked();
            }
        }
        for (const buffer &f : freed)
            deallocate(f);
    }

    scratch_info info() {
        std::lock_guard<std::mutex> lock(mutex_);
        return scratch_info{idle_bytes_, in_use_bytes_, capacity_, peak_bytes_};
    }

    void set_capacity(size_t bytes) {
        std::vector<buffer> freed;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            capacity_ = bytes;
            freed = trim_locked();
        }
        for (const buffer &f : freed)
            deallocate(f);
    }

    void release_idle() {
        std::vector<buffer> freed;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            freed.swap(idle_);
            idle_bytes_ = 0;
        }
        for (const buffer &f : freed)
            deallocate(f);
    }

private:
    static size_t round_up(size_t bytes) {
        if (bytes > std::numeric_limits<size_t>::max() - page) throw std::bad_alloc();
        return (std::max<size_t>(bytes, 64) + page - 1) / page * page;
    }

    // Oldest idle buffers go first until the idle bytes fit the capacity.
    // Returns them: they are unmapped outside the lock.
    std::vector<buffer> trim_locked() {
        std::vector<buffer> freed;
        size_t i = 0;
        while (idle_bytes_ > capacity_ && i < idle_.size()) {
            idle_bytes_ -= idle_[i].size;
            freed.push_back(idle_[i]);
            ++i;
        }
        idle_.erase(idle_.begin(), idle_.begin() + static_cast<std::ptrdiff_t>(i));
        return freed;
    }

    std::mutex mutex_;
    std::vector<buffer> idle_; // oldest first
    size_t idle_bytes_ = 0, in_use_bytes_ = 0, peak_bytes_ = 0, capacity_;
};

// Leaked on purpose: executions may still return buffers while statics of
// other files are being destroyed at exit.
pool &the_pool() {
    static pool *p = new pool;
    return *p;
}

} // namespace

scratchpad::~scratchpad() {
    for (held &h : held_)
        if (h.data) the_pool().release(buffer{h.data, h.size});
}

void *scratchpad::bytes(int slot, size_t n) {
    if (slot < 0 || slot >= slots)
        throw std::logic_error("scratchpad slot " + std::to_string(slot) + " out of range");
    held &h = held_[slot];
    if (h.data && h.size >= n) return h.data;
    if (h.data) {
        the_pool().release(buffer{h.data, h.size});
        h = held{};
    }
    const buffer b = the_pool().acquire(n);
    h = held{b.data, b.size};
    return h.data;
}

} // namespace qsp::runtime

namespace qsp {

scratch_info scratch_pool_info() {
    return runtime::the_pool().info();
}

void set_scratch_capacity(size_t bytes) {
    runtime::the_pool().set_capacity(bytes);
}

void release_scratch() {
    runtime::the_pool().release_idle();
}

namespace {
// The pool buffer's size sits in a header in front of what the caller gets
// (64 bytes: the alignment survives).
constexpr size_t output_header = 64;
} // namespace

void *acquire_output_buffer(size_t bytes) {
    if (bytes > std::numeric_limits<size_t>::max() - output_header) throw std::bad_alloc();
    const runtime::buffer b = runtime::the_pool().acquire(bytes + output_header);
    std::memcpy(b.data, &b.size, sizeof b.size);
    return static_cast<uint8_t *>(b.data) + output_header;
}

void release_output_buffer(void *buffer) {
    if (!buffer) return;
    uint8_t *base = static_cast<uint8_t *>(buffer) - output_header;
    size_t size;
    std::memcpy(&size, base, sizeof size);
    runtime::the_pool().release(runtime::buffer{base, size});
}

} // namespace qsp
