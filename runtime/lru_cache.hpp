// The in-memory caches of the library (FBGEMM's CodeCache shape): typed
// keys compared in full (the hash only picks the bucket), LRU, thread-safe,
// and one generation per key even when many threads ask at once: the first
// caller generates *outside* the lock while the others wait on a shared
// future. A generator that throws leaves no entry (the next caller retries)
// and its exception reaches every waiter.
//
// What a cache holds is bounded twice: by entries and by bytes (each value's
// memory_bytes() where it has one). Beyond either bound the cache lets go of
// its least recently used values: a value still in use (a primitive holds
// it) stays alive and findable through a weak reference, one nobody uses is
// freed, so the code and plans of a deleted layer go when its last user
// goes, except what the bounds keep for reuse.
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
#include <type_traits>
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
    virtual void set_memory_limit(size_t bytes) = 0;

private:
    std::string name_;
};

// Entries from QSP_CACHE_CAPACITY (default 1024; 0 keeps nothing). A value
// that is not a non-negative integer is refused with a message naming it.
size_t default_cache_capacity();
// Bytes from QSP_CACHE_MEMORY_MB (default 64 MiB per cache; 0 keeps nothing
// that is not in use).
size_t default_cache_memory_limit();
// The byte bound of a cache of small values nobody holds (tuning decisions):
// bounded by entries only, whatever set_cache_memory_limit() says.
constexpr size_t no_memory_limit = ~size_t(0);

// The memory a cached value stands for: its memory_bytes() when it has one
// (generated code, plans), else its size.
template <typename T, typename = void> struct has_memory_bytes : std::false_type {};
template <typename T>
struct has_memory_bytes<T, std::void_t<decltype(std::declval<const T &>().memory_bytes())>>
    : std::true_type {};
template <typename T> size_t memory_bytes_of(const T &v) {
    if constexpr (has_memory_bytes<T>::value)
        return v.memory_bytes();
    else
        return sizeof(T);
}

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

    explicit lru_cache(std::string name, size_t capacity = default_cache_capacity(),
                       size_t memory_limit = default_cache_memory_limit())
        : cache_base(std::move(name)), capacity_(capacity), memory_limit_(memory_limit) {}

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
            if (it != index_.end() && !it->second.future.valid()) {
                // let go of by the cache: alive while someone uses it
                if (value_ptr v = it->second.weak.lock()) {
                    ++hits_;
                    hold_locked(it->second, v);
                    lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
                    evict_locked();
                    if (generated) *generated = false;
                    return v;
                }
                lru_.erase(it->second.lru_pos);
                index_.erase(it);
                it = index_.end();
            }
            if (it != index_.end()) {
                ++hits_;
                lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
                future = it->second.future;
            } else {
                ++misses_;
                owner = true;
                future = promise.get_future().share();
                lru_.push_front(key);
                index_.emplace(key, entry{future, {}, 0, lru_.begin()});
            }
        }
        if (generated) *generated = owner;
        if (!owner) return future.get();
        try {
            value_ptr v = make();
            promise.set_value(v);
            std::lock_guard<std::mutex> lock(mutex_);
            ++generations_;
            auto it = index_.find(key);
            if (it != index_.end() && it->second.future.valid()) it->second.weak = v;
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
        if (it == index_.end()) return nullptr;
        value_ptr v;
        if (!it->second.future.valid()) {
            v = it->second.weak.lock();
            if (!v) return nullptr;
            hold_locked(it->second, v);
        } else if (it->second.future.wait_for(std::chrono::seconds(0))
                   != std::future_status::ready) {
            return nullptr;
        } else {
            v = it->second.future.get();
        }
        ++hits_;
        lru_.splice(lru_.begin(), lru_, it->second.lru_pos);
        evict_locked();
        return v;
    }

    // Replaces (or inserts) the value for key.
    void put(const key_t &key, value_ptr v) {
        std::lock_guard<std::mutex> lock(mutex_);
        auto it = index_.find(key);
        if (it != index_.end()) {
            lru_.erase(it->second.lru_pos);
            index_.erase(it);
        }
        lru_.push_front(key);
        entry &e = index_.emplace(key, entry{{}, {}, 0, lru_.begin()}).first->second;
        hold_locked(e, std::move(v));
        evict_locked();
    }

    // Values the cache holds (not those it let go of that are still in use).
    size_t size() const {
        std::lock_guard<std::mutex> lock(mutex_);
        return held_locked();
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
    void set_memory_limit(size_t bytes) override {
        std::lock_guard<std::mutex> lock(mutex_);
        if (memory_limit_ == no_memory_limit) return; // entries only (see no_memory_limit)
        memory_limit_ = bytes;
        evict_locked();
    }
    cache_info info() const override {
        std::lock_guard<std::mutex> lock(mutex_);
        cache_info i{name(), held_locked(), capacity_, hits_, misses_, generations_, evictions_};
        i.bytes = held_bytes_; // as measured at the last change
        i.memory_limit = memory_limit_;
        for (const auto &kv : index_)
            if (!kv.second.future.valid() && !kv.second.weak.expired()) ++i.in_use_elsewhere;
        return i;
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
            if (e->second.future.valid()
                && e->second.future.wait_for(std::chrono::seconds(0))
                           != std::future_status::ready) {
                ++it;
                continue;
            }
            index_.erase(e);
            it = lru_.erase(it);
        }
        evict_locked(); // measures what is left (entries being generated hold nothing yet)
    }

private:
    struct entry {
        // Valid while generating, and while the cache holds the value.
        std::shared_future<value_ptr> future;
        std::weak_ptr<const value_t> weak; // once generated
        size_t bytes;                      // memory_bytes() when last measured
        typename std::list<key_t>::iterator lru_pos;
    };

    static bool ready(const entry &e) {
        return e.future.valid()
               && e.future.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
    }
    size_t held_locked() const {
        size_t n = 0;
        for (const auto &kv : index_)
            n += ready(kv.second);
        return n;
    }
    // Callers then evict_locked(), which measures what is held.
    static void hold_locked(entry &e, value_ptr v) {
        std::promise<value_ptr> p;
        p.set_value(v);
        e.future = p.get_future().share();
        e.weak = std::move(v);
    }

    void evict_locked() {
        // Held values are counted and measured again: a plan grows when
        // code is generated for it on first use.
        size_t held = 0;
        held_bytes_ = 0;
        for (auto &kv : index_)
            if (ready(kv.second)) {
                const value_ptr &v = kv.second.future.get();
                kv.second.bytes = v ? memory_bytes_of(*v) : 0;
                held_bytes_ += kv.second.bytes;
                ++held;
            }
        // Least recent first; entries still being generated are never let go
        // of (their owner will fill them); values in use stay alive through
        // their users and findable by their weak reference.
        auto it = lru_.end();
        while (it != lru_.begin()) {
            --it;
            auto e = index_.find(*it);
            if (e == index_.end()) { // unreachable while key hashes are stable
                it = lru_.erase(it);
                continue;
            }
            entry &en = e->second;
            if (!en.future.valid()) { // let go of earlier: drop it once nobody uses it
                if (en.weak.expired()) {
                    index_.erase(e);
                    it = lru_.erase(it);
                }
                continue;
            }
            if (held <= capacity_ && held_bytes_ <= memory_limit_) continue;
            if (!ready(en)) continue;
            en.future = {};
            held_bytes_ -= en.bytes;
            --held;
            ++evictions_;
            if (en.weak.expired()) {
                index_.erase(e);
                it = lru_.erase(it);
            }
        }
    }

    size_t capacity_, memory_limit_;
    size_t held_bytes_ = 0;
    mutable std::mutex mutex_;
    std::list<key_t> lru_; // most recent first
    std::unordered_map<key_t, entry, hash_t> index_;
    uint64_t hits_ = 0, misses_ = 0, generations_ = 0, evictions_ = 0;
};

} // namespace qsp::runtime
