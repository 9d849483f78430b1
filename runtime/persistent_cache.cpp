// The on-disk cache (runtime/persistent_cache.hpp) and its public controls
// (qsparseprop/runtime.hpp: persistent_cache_*).
#include "runtime/persistent_cache.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xbyak/xbyak_util.h>

#include "qsparseprop/runtime.hpp"
#include "runtime/env.hpp"
#include "runtime/verbose.hpp"

namespace qsp {

namespace runtime {

namespace {

constexpr char magic[4] = {'Q', 'S', 'P', 'C'};
constexpr const char *suffix = ".qspc";
// Entries are small (a decision and a pattern); anything larger is not ours.
constexpr uint64_t max_entry_bytes = uint64_t(256) << 20;

uint64_t fnv1a(const char *p, size_t n, uint64_t h = 1469598103934665603ull) {
    for (size_t i = 0; i < n; ++i) {
        h ^= static_cast<unsigned char>(p[i]);
        h *= 1099511628211ull;
    }
    return h;
}

void note(const std::string &what) {
    if (verbose_level() >= 1) verbose_print("persistent_cache," + what);
}

std::string cpu_brand() {
    // CPUID leaves 0x80000002..4: the brand string.
    uint32_t regs[12] = {};
    uint32_t max_ext[4];
    Xbyak::util::Cpu::getCpuid(0x80000000u, max_ext);
    if (max_ext[0] < 0x80000004u) return "unknown CPU";
    for (uint32_t i = 0; i < 3; ++i)
        Xbyak::util::Cpu::getCpuid(0x80000002u + i, regs + 4 * i);
    std::string s(reinterpret_cast<const char *>(regs), sizeof regs);
    s = s.c_str(); // up to the first NUL
    const auto b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
    return b == std::string::npos ? "unknown CPU" : s.substr(b, e - b + 1);
}

// ---- where the cache lives --------------------------------------------------

struct state {
    std::mutex mutex;
    bool resolved = false;
    bool have_override = false;
    std::string override_dir;
    // resolved:
    bool enabled = false;
    std::string dir, reason;
    bool store_failure_reported = false;
};

state &the_state() {
    static state *s = new state; // leaked: used from other statics' destructors
    return *s;
}

size_t max_bytes_from_env() {
    return static_cast<size_t>(env_integer("QSP_CACHE_MAX_MB", 256, 1, 1ll << 30, "MiB")) << 20;
}

std::string default_dir(std::string &why_none) {
    if (const char *xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
        return std::string(xdg) + "/qsparseprop";
    if (const char *home = std::getenv("HOME"); home && *home)
        return std::string(home) + "/.cache/qsparseprop";
    why_none = "neither QSP_CACHE_DIR, XDG_CACHE_HOME nor HOME is set";
    return "";
}

// mkdir -p, new components user-only (0700).
bool make_dirs(const std::string &dir, std::string &error) {
    for (size_t pos = 1; pos <= dir.size(); ++pos) {
        if (pos != dir.size() && dir[pos] != '/') continue;
        const std::string part = dir.substr(0, pos);
        if (::mkdir(part.c_str(), 0700) != 0 && errno != EEXIST) {
            error = "cannot create " + part + ": " + std::strerror(errno);
            return false;
        }
    }
    return true;
}

// Decides whether dir can hold the cache; the reason when not.
bool usable_dir(const std::string &dir, std::string &reason) {
    std::string error;
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) {
        if (errno != ENOENT) {
            reason = dir + ": " + std::strerror(errno);
            return false;
        }
        if (!make_dirs(dir, error)) {
            reason = error;
            return false;
        }
        if (::lstat(dir.c_str(), &st) != 0) {
            reason = dir + ": " + std::strerror(errno);
            return false;
        }
    }
    if (S_ISLNK(st.st_mode)) {
        reason = dir
                 + " is a symbolic link; the cache is kept only in a real directory "
                   "(point QSP_CACHE_DIR at one)";
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        reason = dir + " is not a directory";
        return false;
    }
    if (st.st_uid != ::geteuid()) {
        reason = dir + " belongs to another user";
        return false;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        reason = dir + " is writable by other users (mode " + std::to_string((st.st_mode >> 6) & 7)
                 + std::to_string((st.st_mode >> 3) & 7) + std::to_string(st.st_mode & 7)
                 + "); entries there could be planted";
        return false;
    }
    if (::access(dir.c_str(), R_OK | W_OK | X_OK) != 0) {
        reason = dir + " is not writable: " + std::strerror(errno);
        return false;
    }
    // The mode bits do not say it all: root passes access() everywhere, and
    // a pseudo file system (/proc, /sys) takes no files whatever its mode.
    // Create and remove a file, as a store would.
    const std::string probe = dir + "/.probe-" + std::to_string(::getpid());
    const int fd =
            ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        reason = dir + " does not accept files: " + std::strerror(errno);
        return false;
    }
    ::close(fd);
    ::unlink(probe.c_str());
    return true;
}

// Under the state's mutex.
void resolve(state &s) {
    if (s.resolved) return;
    s.resolved = true;
    s.enabled = false;
    s.reason.clear();
    s.store_failure_reported = false;
    std::string dir;
    if (s.have_override) {
        dir = s.override_dir;
        if (dir.empty()) s.reason = "turned off (set_persistent_cache_dir(\"\"))";
    } else if (const char *env = std::getenv("QSP_CACHE_DIR")) {
        dir = env;
        if (dir.empty()) s.reason = "turned off (QSP_CACHE_DIR is empty)";
    } else {
        dir = default_dir(s.reason);
    }
    while (dir.size() > 1 && dir.back() == '/')
        dir.pop_back();
    s.dir = dir;
    if (dir.empty()) return;
    if (!usable_dir(dir, s.reason)) {
        note("disabled," + s.reason);
        return;
    }
    s.enabled = true;
}

// The directory, or "" when the cache is off.
std::string cache_dir() {
    state &s = the_state();
    std::lock_guard<std::mutex> lock(s.mutex);
    resolve(s);
    return s.enabled ? s.dir : std::string();
}

std::string file_name(const std::string &kind, const std::string &key) {
    const uint64_t h = fnv1a(key.data(), key.size(), fnv1a(kind.data(), kind.size()));
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
    return kind + "-" + hex + suffix;
}

// ---- entry bytes ------------------------------------------------------------

void put_u32(std::string &b, uint32_t v) {
    for (int i = 0; i < 4; ++i)
        b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_u64(std::string &b, uint64_t v) {
    for (int i = 0; i < 8; ++i)
        b.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

std::string encode(const std::string &kind, const std::string &key, const std::string &payload) {
    std::string b(magic, sizeof magic);
    put_u32(b, persistent_format_version);
    put_u32(b, static_cast<uint32_t>(kind.size()));
    b += kind;
    const std::string env = persistent_environment();
    put_u32(b, static_cast<uint32_t>(env.size()));
    b += env;
    put_u64(b, key.size());
    b += key;
    put_u64(b, payload.size());
    b += payload;
    put_u64(b, fnv1a(b.data(), b.size()));
    return b;
}

// A bounds-checked reader over an entry's bytes.
class reader {
public:
    explicit reader(const std::string &b) : b_(b) {}
    bool u32(uint32_t &v) { return fixed(v, 4); }
    bool u64(uint64_t &v) { return fixed(v, 8); }
    bool bytes(uint64_t n, std::string &out) {
        if (n > b_.size() - pos_) return false;
        out.assign(b_, pos_, n);
        pos_ += n;
        return true;
    }
    size_t pos() const { return pos_; }

private:
    template <typename T> bool fixed(T &v, int n) {
        if (b_.size() - pos_ < static_cast<size_t>(n)) return false;
        v = 0;
        for (int i = 0; i < n; ++i)
            v |= static_cast<T>(static_cast<unsigned char>(b_[pos_ + i])) << (8 * i);
        pos_ += n;
        return true;
    }
    const std::string &b_;
    size_t pos_ = 0;
};

struct decoded {
    uint32_t format = 0;
    std::string kind, env, key, payload;
};

// "" when the bytes are a well-formed entry, else what is wrong.
std::string decode(const std::string &b, decoded &d) {
    if (b.empty()) return "empty file";
    if (b.size() < sizeof magic || std::memcmp(b.data(), magic, sizeof magic) != 0)
        return "not a qsparseprop cache entry";
    if (b.size() < sizeof magic + 4 + 8) return "truncated";
    reader r(b);
    std::string skip;
    r.bytes(sizeof magic, skip);
    r.u32(d.format);
    if (d.format != persistent_format_version)
        return "format version " + std::to_string(d.format) + ", this library reads "
               + std::to_string(persistent_format_version);
    // The checksum first: lengths inside a damaged entry mean nothing.
    const size_t body = b.size() - 8;
    reader tail(b);
    tail.bytes(body, skip);
    uint64_t sum = 0;
    tail.u64(sum);
    if (sum != fnv1a(b.data(), body)) return "checksum mismatch (damaged or truncated)";
    uint32_t n32 = 0;
    uint64_t n64 = 0;
    if (!r.u32(n32) || !r.bytes(n32, d.kind) || !r.u32(n32) || !r.bytes(n32, d.env) || !r.u64(n64)
        || !r.bytes(n64, d.key) || !r.u64(n64) || !r.bytes(n64, d.payload) || r.pos() != body)
        return "malformed";
    return "";
}

// "" when the bytes are a whole entry written under this library version
// and CPU (what load and check both require), else why not.
std::string usable(const std::string &bytes, decoded &d) {
    std::string why = decode(bytes, d);
    if (why.empty() && d.env != persistent_environment())
        why = "written under '" + d.env + "', this process is '" + persistent_environment() + "'";
    return why;
}

// Opens an entry for reading without following a symbolic link and without
// blocking (a FIFO or device planted at an entry's name would otherwise block
// the open, or the read, of every load of that key), then checks on the open
// descriptor that it is a regular file of a plausible size: -1 and `error`
// set when it is not ("" when there is no entry).
int open_entry(const std::string &path, std::string &error) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        error = errno == ENOENT ? "" : std::strerror(errno);
        return -1;
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)
        || static_cast<uint64_t>(st.st_size) > max_entry_bytes) {
        error = "not a regular file of a plausible size";
        ::close(fd);
        return -1;
    }
    return fd;
}

void read_all(int fd, std::string &out) {
    struct stat st {};
    out.resize(::fstat(fd, &st) == 0 ? static_cast<size_t>(st.st_size) : 0);
    size_t done = 0;
    while (done < out.size()) {
        const ssize_t n = ::read(fd, &out[done], out.size() - done);
        if (n <= 0) break;
        done += static_cast<size_t>(n);
    }
    out.resize(done);
}

bool read_file(const std::string &path, std::string &out, std::string &error) {
    const int fd = open_entry(path, error);
    if (fd < 0) return false;
    read_all(fd, out);
    ::close(fd);
    return true;
}

struct entry_file {
    std::string path;
    uint64_t bytes;
    struct timespec mtime;
    bool regular; // false: something else sits at an entry's name (a FIFO, a link, ...)
};

std::vector<entry_file> list_entries(const std::string &dir) {
    std::vector<entry_file> files;
    DIR *d = ::opendir(dir.c_str());
    if (!d) return files;
    while (dirent *e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() <= std::strlen(suffix)
            || name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) != 0)
            continue;
        const std::string path = dir + "/" + name;
        struct stat st {};
        if (::lstat(path.c_str(), &st) != 0 || S_ISDIR(st.st_mode)) continue;
        const bool regular = S_ISREG(st.st_mode);
        files.push_back(
                {path, regular ? static_cast<uint64_t>(st.st_size) : 0, st.st_mtim, regular});
    }
    ::closedir(d);
    return files;
}

void evict_above_cap(const std::string &dir) {
    const uint64_t cap = max_bytes_from_env();
    auto files = list_entries(dir);
    uint64_t total = 0;
    for (const auto &f : files)
        total += f.bytes;
    if (total <= cap) return;
    std::sort(files.begin(), files.end(), [](const entry_file &a, const entry_file &b) {
        return a.mtime.tv_sec != b.mtime.tv_sec ? a.mtime.tv_sec < b.mtime.tv_sec
                                                : a.mtime.tv_nsec < b.mtime.tv_nsec;
    });
    for (const auto &f : files) {
        if (total <= cap * 9 / 10) break; // some room, so the next store does not evict again
        if (::unlink(f.path.c_str()) == 0) {
            total -= f.bytes;
            note("evicted," + f.path);
        }
    }
}

std::atomic<uint64_t> temp_counter{0};
std::atomic<void (*)(const std::string &)> load_hook{nullptr};

} // namespace

void set_persistent_load_hook_for_testing(void (*hook)(const std::string &path)) {
    load_hook = hook;
}

std::string persistent_environment() {
    static const std::string env =
            std::string(version()) + ";" + cpu_brand() + ";" + to_string(detected_cpu_isa());
    return env;
}

std::optional<std::string> persistent_load(const std::string &kind, const std::string &key) {
    const std::string dir = cache_dir();
    if (dir.empty()) return std::nullopt;
    const std::string path = dir + "/" + file_name(kind, key);
    std::string bytes, error;
    const int fd = open_entry(path, error);
    if (fd < 0) {
        if (!error.empty()) note("ignored," + path + "," + error);
        return std::nullopt;
    }
    read_all(fd, bytes);
    decoded d;
    std::string why = usable(bytes, d);
    if (why.empty() && d.kind != kind) why = "an entry of kind " + d.kind;
    if (why.empty() && d.key != key) why = "another key with the same file name";
    if (!why.empty()) {
        ::close(fd);
        note("ignored," + path + "," + why + ",rebuilt");
        return std::nullopt;
    }
    if (auto hook = load_hook.load()) hook(path);
    // Recently used (evicted last): through the descriptor that was read, so
    // a name swapped for a link meanwhile touches nothing outside the cache.
    ::futimens(fd, nullptr);
    ::close(fd);
    note("hit," + path);
    return std::move(d.payload);
}

void persistent_store(const std::string &kind, const std::string &key, const std::string &payload) {
    const std::string dir = cache_dir();
    if (dir.empty()) return;
    const std::string bytes = encode(kind, key, payload);
    const std::string name = file_name(kind, key);
    const std::string tmp = dir + "/.tmp-" + name + "-" + std::to_string(::getpid()) + "-"
                            + std::to_string(temp_counter++);
    auto fail = [&](const std::string &what) {
        ::unlink(tmp.c_str());
        state &s = the_state();
        std::lock_guard<std::mutex> lock(s.mutex);
        if (!s.store_failure_reported || verbose_level() >= 2) {
            s.store_failure_reported = true;
            note("store failed," + dir + "," + what + ",continuing without storing");
        }
    };
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) return fail(std::strerror(errno));
    size_t done = 0;
    while (done < bytes.size()) {
        const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
        if (n <= 0) {
            const int e = n < 0 ? errno : ENOSPC;
            ::close(fd);
            return fail(std::strerror(e));
        }
        done += static_cast<size_t>(n);
    }
    if (::close(fd) != 0) return fail(std::strerror(errno));
    if (::rename(tmp.c_str(), (dir + "/" + name).c_str()) != 0) return fail(std::strerror(errno));
    note("stored," + dir + "/" + name);
    try {
        evict_above_cap(dir);
    } catch (const std::exception &e) { // a malformed QSP_CACHE_MAX_MB: said, not thrown from here
        note(std::string("eviction skipped,") + e.what());
    }
}

} // namespace runtime

// ---- public controls --------------------------------------------------------

persistent_cache_info persistent_cache_status() {
    auto &s = runtime::the_state();
    persistent_cache_info info;
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        runtime::resolve(s);
        info.enabled = s.enabled;
        info.dir = s.dir;
        info.reason = s.reason;
    }
    info.max_bytes = runtime::max_bytes_from_env();
    if (info.enabled)
        for (const auto &f : runtime::list_entries(info.dir)) {
            ++info.entries;
            info.bytes += f.bytes;
        }
    return info;
}

void set_persistent_cache_dir(const std::string &dir) {
    auto &s = runtime::the_state();
    std::lock_guard<std::mutex> lock(s.mutex);
    s.have_override = true;
    s.override_dir = dir;
    s.resolved = false;
}

size_t clear_persistent_cache() {
    const std::string dir = runtime::cache_dir();
    size_t removed = 0;
    if (dir.empty()) return 0;
    for (const auto &f : runtime::list_entries(dir))
        removed += ::unlink(f.path.c_str()) == 0;
    return removed;
}

namespace {

// A front end's kind becomes part of a file name: no path, no hidden file.
const std::string &checked_kind(const std::string &kind) {
    if (kind.empty() || kind.find_first_of("/.") != std::string::npos)
        throw std::invalid_argument("persistent cache: kind must be a plain non-empty name, got '"
                                    + kind + "'");
    return kind;
}

} // namespace

std::optional<std::string> persistent_cache_load(const std::string &kind, const std::string &key) {
    return runtime::persistent_load(checked_kind(kind), key);
}

void persistent_cache_store(const std::string &kind, const std::string &key,
                            const std::string &payload) {
    runtime::persistent_store(checked_kind(kind), key, payload);
}

persistent_cache_check check_persistent_cache() {
    persistent_cache_check result;
    const std::string dir = runtime::cache_dir();
    if (dir.empty()) return result;
    for (const auto &f : runtime::list_entries(dir)) {
        std::string bytes, error, why;
        runtime::decoded d;
        if (!f.regular)
            why = "not a regular file";
        else if (!runtime::read_file(f.path, bytes, error))
            why = error.empty() ? "vanished" : error;
        else
            why = runtime::usable(bytes, d);
        if (why.empty()
            && f.path.substr(f.path.rfind('/') + 1) != runtime::file_name(d.kind, d.key))
            why = "its name does not match its key";
        if (why.empty()) {
            ++result.valid;
            continue;
        }
        result.problems.push_back(f.path + ": " + why);
        result.removed += ::unlink(f.path.c_str()) == 0;
    }
    return result;
}

} // namespace qsp
