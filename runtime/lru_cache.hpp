// The in-memory caches of the library (FBGEMM's CodeCache shape): typed
// keys compared in full (the hash only picks the bucket), LRU with a bounded
// capacity, thread-safe, and one generation per key even when many threads
// ask at once: the first caller generates *outside* the lock while the
// others wait on a shared future. A generator that throws leaves no entry
// (the next caller retries) and its exception reaches every waiter.
//
// Every cache registers itself by name, so qsp::cache_infos() (and Python's
// qsparseprop.cache_info()) can show what is held and how much.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "qsparseprop/runtime.hpp"

namespace qsp::runtime {

// What the registry needs from a cache of any key and value type.
class cache_base {
public:
    explicit cache_base(std::string name);
    virtual ~cache_base();
    cache_base(const cache_base &) = delete;
    cache_base &operator=(const cache_base &) = delete;

    const std::string &name() const { return name_; }
    virtual cache_info info() const = 0;
    virtual void clear() = 0;
    virtual void set_capacity(size_t entries) = 0;

private:
    std::string name_;
};

// Entries from QSP_CACHE_CAPACITY (default 1024; 0 keeps nothing). A value
// that is not a non-negative integer is refused with a message naming it.
size_t default_cache_capacity();

// Mixes v into the running hash h (FNV-1a style on 64-bit words).
inline uint64_t hash_mix(uint64_t h, uint64_t v) {
    return (h ^ (v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2))) * 1099511628211ull;
}

// key_t needs operator== (the full comparison) and hash_t a std::hash-like
// functor (bucket selection only: equal hashes of different keys are fine).
template <typename key_t, typename value_t, typename hash_t = std::hash<key_t>>
class lru_cache : public cache_base {
public:
    using value_ptr = std::shared_ptr<const value_t>;

    explicit lru_cache(std::string name, size_t capacity = default_cache_capacity())
        : cache_base(std::move(name)), capacity_(capacity) {}

    // The value for key, generating it with make() if absent. `generated` (if
    // given) tells whether this call ran the generator.
    value_ptr get_or_create(const key_t &key, const std::function<value_ptr()> &make,
                            bool *generated = nullptr) {
        std::promise<value_ptr> promise;
        std::shared_future<value_ptr> future;
        bool owner = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            auto it = index_.find(key);
            if (it != index_.end()) {
                ++hits_;
                lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
                future = it->second.future;
            } else {
                ++misses_;
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
            ++generations_;
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

    // The value for key if present and ready (no generation, no waiting).
    value_ptr find(const key_t &key) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = index_.find(key);
        if (it == index_.end()
            || it->second.future.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
            return nullptr;
        ++hits_;
        lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
        return it->second.future.get();
    }

    // Replaces (or inserts) the value for key.
    void put(const key_t &key, value_ptr v) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = index_.find(key);
        if (it != index_.end()) {
            lru_.erase(it->second.lru_pos);
            index_.erase(it);
        }
        std::promise<value_ptr> p;
        p.set_value(std::move(v));
        lru_.push_front(key);
        index_.emplace(key, entry{p.get_future().share(), lru_.begin()});
        evict_locked();
    }

    size_t size() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return index_.size();
    }
    size_t capacity() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return capacity_;
    }
    void set_capacity(size_t c) override {
        std::lock_guard<std::mutex> lock(mutex_);
        capacity_ = c;
        evict_locked();
    }
    cache_info info() const override {
        std::lock_guard<std::mutex> lock(mutex_);
        return cache_info{name(),  index_.size(), capacity_, hits_,
                          misses_, generations_,  evictions_};
    }
    void clear() override {
        std::lock_guard<std::mutex> lock(mutex_);
        // Entries being generated stay: their owner fills them and evicts.
        for (auto it = lru_.begin(); it != lru_.end();) {
            auto e = index_.find(*it);
            if (e == index_.end()) { // unreachable while key hashes are stable
                it = lru_.erase(it);
                continue;
            }
            if (e->second.future.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
                ++it;
                continue;
            }
            index_.erase(e);
            it = lru_.erase(it);
        }
    }

private:
    struct entry {
        std::shared_future<value_ptr> future;
        typename std::list<key_t>::iterator lru_pos;
    };

    void evict_locked() {
        // Entries still being generated are never evicted (their owner will
        // fill them); users of an evicted value keep it alive by shared_ptr.
        auto it = lru_.end();
        while (index_.size() > capacity_ && it != lru_.begin()) {
            --it;
            auto e = index_.find(*it);
            if (e == index_.end()) { // unreachable while key hashes are stable
                it = lru_.erase(it);
                continue;
            }
            if (e->second.future.wait_for(std::chrono::seconds(0)) != std::future_status::ready)
                continue;
            index_.erase(e);
            it = lru_.erase(it);
            ++evictions_;
        }
    }

    size_t capacity_;
    mutable std::mutex mutex_;
    std::list<key_t> lru_; // most recent first
    std::unordered_map<key_t, entry, hash_t> index_;
    uint64_t hits_ = 0, misses_ = 0, generations_ = 0, evictions_ = 0;
};

} // namespace qsp::runtime
