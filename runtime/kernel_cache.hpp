// The in-memory kernel cache (FBGEMM's CodeCache shape): LRU, thread-safe,
// and one generation per key even when many threads ask at once: the first
// caller generates *outside* the lock while the others wait on a shared
// future. A generator that throws leaves no entry (the next caller retries)
// and its exception reaches every waiter.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace qsp::runtime {

// What a generated kernel is specialised for. Two keys are equal exactly when
// the same code serves both.
struct kernel_key {
    std::string op; // e.g. "spmm_f32", "sddmm_f32"
    int direction = 0;
    std::vector<int64_t> shape;
    int scheme = 0;
    int isa = 0;
    int threads = 0;
    uint64_t pattern_hash = 0;

    bool operator==(const kernel_key &o) const {
        return op == o.op && direction == o.direction && shape == o.shape && scheme == o.scheme
               && isa == o.isa && threads == o.threads && pattern_hash == o.pattern_hash;
    }
    std::string str() const;
};

struct kernel_key_hash {
    size_t operator()(const kernel_key &k) const;
};

// Capacity from QSP_CACHE_CAPACITY (entries; default 1024; 0 disables caching).
size_t default_cache_capacity();

template <typename value_t> class kernel_cache {
public:
    using value_ptr = std::shared_ptr<const value_t>;
    struct stats_t {
        uint64_t hits = 0, misses = 0, generations = 0, evictions = 0;
    };

    explicit kernel_cache(size_t capacity = default_cache_capacity()) : capacity_(capacity) {}

    // The value for key, generating it with make() if absent. `generated` (if
    // given) tells whether this call ran the generator.
    value_ptr get_or_create(const kernel_key &key, const std::function<value_ptr()> &make,
                            bool *generated = nullptr) {
        std::promise<value_ptr> promise;
        std::shared_future<value_ptr> future;
        bool owner = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = index_.find(key);
            if (it != index_.end()) {
                ++stats_.hits;
                lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
                future = it->second.future;
            } else {
                ++stats_.misses;
                owner = true;
                future = promise.get_future().share();
                lru_.push_front(key);
                index_.emplace(key, entry{future, lru_.begin()});
            }
        }
        if (generated) *generated = owner;
        if (!owner) return future.get();
        try {
            value_ptr v = make();
            promise.set_value(v);
            std::lock_guard<std::mutex> lock(mutex_);
            ++stats_.generations;
            evict_locked();
            return v;
        } catch (...) {
            promise.set_exception(std::current_exception());
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = index_.find(key);
            if (it != index_.end()) {
                lru_.erase(it->second.lru_pos);
                index_.erase(it);
            }
            throw;
        }
    }

    size_t size() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return index_.size();
    }
    size_t capacity() const { return capacity_; }
    void set_capacity(size_t c) {
        std::lock_guard<std::mutex> lock(mutex_);
        capacity_ = c;
        evict_locked();
    }
    stats_t stats() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return stats_;
    }
    void clear() {
        std::lock_guard<std::mutex> lock(mutex_);
        index_.clear();
        lru_.clear();
    }

private:
    struct entry {
        std::shared_future<value_ptr> future;
        typename std::list<kernel_key>::iterator lru_pos;
    };

    void evict_locked() {
        // Entries still being generated are never evicted (their owner will
        // fill them); users of an evicted kernel keep it alive by shared_ptr.
        auto it = lru_.end();
        while (index_.size() > capacity_ && it != lru_.begin()) {
            --it;
            auto e = index_.find(*it);
            if (e->second.future.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
                continue;
            index_.erase(e);
            it = lru_.erase(it);
            ++stats_.evictions;
        }
    }

    size_t capacity_;
    mutable std::mutex mutex_;
    std::list<kernel_key> lru_; // most recent first
    std::unordered_map<kernel_key, entry, kernel_key_hash> index_;
    stats_t stats_;
};

} // namespace qsp::runtime
