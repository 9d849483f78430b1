// The on-disk cache (runtime/persistent_cache.hpp) and its public controls
// (qsparseprop/runtime.hpp: persistent_cache_*).
#include "runtime/persistent_cache.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include <dirent.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
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

// The cache directory, opened once when it was checked: every later access is
// relative to this descriptor (openat, renameat, unlinkat, fstatat, without
// following links), so swapping the path for a link after the checks
// redirects nothing.
struct cache_directory {
    int fd = -1;
    std::string path; // for messages
    cache_directory(int f, std::string p) : fd(f), path(std::move(p)) {}
    cache_directory(const cache_directory &) = delete;
    cache_directory &operator=(const cache_directory &) = delete;
    ~cache_directory() { ::close(fd); }
};
using directory_ref = std::shared_ptr<const cache_directory>;

struct state {
    std::mutex mutex;
    bool resolved = false;
    bool have_override = false;
    std::string override_dir;
    // resolved:
    directory_ref directory; // null when off
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

// mkdir -p, new components user-only (0700). What it creates is checked
// like the rest afterwards.
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

std::string mode_string(mode_t m) {
    return std::to_string((m >> 6) & 7) + std::to_string((m >> 3) & 7) + std::to_string(m & 7);
}

// A folder above the cache may hold it when no other user can replace what
// is in it: owned by root or by this user, and writable by others only with
// the sticky bit (/tmp), as ssh and git require of the folders above their
// configuration.
std::string untrusted_parent(const struct stat &st, const std::string &path) {
    if (st.st_uid != 0 && st.st_uid != ::geteuid())
        return path + " (above the cache directory) belongs to user " + std::to_string(st.st_uid)
               + ", who could replace what is in it; the cache is kept only under folders "
                 "owned by root or by you";
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
        return path + " (above the cache directory) is writable by other users (mode "
               + mode_string(st.st_mode) + ") and not sticky";
    return "";
}

// Checks that dir can hold the cache and opens it: the descriptor, or -1
// and the reason. Symbolic links in the folders above are resolved first
// and the real path checked; every component of it is then opened without
// following links, so nothing can be swapped between a check and a use.
int open_usable_dir(const std::string &dir, std::string &reason) {
    std::string error;
    struct stat st {};
    if (::lstat(dir.c_str(), &st) != 0) {
        if (errno != ENOENT) {
            reason = dir + ": " + std::strerror(errno);
            return -1;
        }
        if (!make_dirs(dir, error)) {
            reason = error;
            return -1;
        }
        if (::lstat(dir.c_str(), &st) != 0) {
            reason = dir + ": " + std::strerror(errno);
            return -1;
        }
    }
    if (S_ISLNK(st.st_mode)) {
        reason = dir
                 + " is a symbolic link; the cache is kept only in a real directory "
                   "(point QSP_CACHE_DIR at one)";
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        reason = dir + " is not a directory";
        return -1;
    }
    char *real_c = ::realpath(dir.c_str(), nullptr);
    if (!real_c) {
        reason = dir + ": " + std::strerror(errno);
        return -1;
    }
    const std::string real = real_c;
    std::free(real_c);
    int fd = ::open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    std::string walked;
    for (size_t begin = 1; fd >= 0 && begin <= real.size();) {
        if (::fstat(fd, &st) != 0) break;
        const std::string why = untrusted_parent(st, walked.empty() ? "/" : walked);
        if (!why.empty()) {
            reason = why;
            ::close(fd);
            return -1;
        }
        size_t end = real.find('/', begin);
        if (end == std::string::npos) end = real.size();
        const std::string part = real.substr(begin, end - begin);
        begin = end + 1;
        if (part.empty()) continue;
        walked += "/" + part;
        const int next =
                ::openat(fd, part.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        ::close(fd);
        fd = next;
        if (fd < 0) {
            reason = walked + ": " + std::strerror(errno) + " (changed while it was checked?)";
            return -1;
        }
        if (begin > real.size()) break; // the cache directory itself: checked below
    }
    if (fd < 0 || ::fstat(fd, &st) != 0) {
        if (reason.empty()) reason = dir + ": " + std::strerror(errno);
        if (fd >= 0) ::close(fd);
        return -1;
    }
    auto refuse = [&](const std::string &why) {
        reason = why;
        ::close(fd);
        return -1;
    };
    if (st.st_uid != ::geteuid()) return refuse(dir + " belongs to another user");
    if (st.st_mode & (S_IWGRP | S_IWOTH))
        return refuse(dir + " is writable by other users (mode " + mode_string(st.st_mode)
                      + "); entries there could be planted");
    if (::faccessat(fd, ".", R_OK | W_OK | X_OK, 0) != 0)
        return refuse(dir + " is not writable: " + std::strerror(errno));
    // The mode bits do not say it all: root passes access() everywhere, and
    // a pseudo file system (/proc, /sys) takes no files whatever its mode.
    // Create and remove a file, as a store would.
    const std::string probe = ".probe-" + std::to_string(::getpid());
    const int probe_fd =
            ::openat(fd, probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (probe_fd < 0) return refuse(dir + " does not accept files: " + std::strerror(errno));
    ::close(probe_fd);
    ::unlinkat(fd, probe.c_str(), 0);
    return fd;
}

// Under the state's mutex.
void resolve(state &s) {
    if (s.resolved) return;
    s.resolved = true;
    s.directory.reset();
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
    const int fd = open_usable_dir(dir, s.reason);
    if (fd < 0) {
        note("disabled," + s.reason);
        return;
    }
    s.directory = std::make_shared<const cache_directory>(fd, dir);
}

// The opened directory, or null when the cache is off. Callers keep the
// reference for the whole operation: a concurrent set_persistent_cache_dir
// closes the descriptor only after them.
directory_ref cache_dir() {
    state &s = the_state();
    std::lock_guard<std::mutex> lock(s.mutex);
    resolve(s);
    return s.directory;
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
int open_entry(const cache_directory &dir, const std::string &name, std::string &error) {
    const int fd = ::openat(dir.fd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
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

bool read_file(const cache_directory &dir, const std::string &name, std::string &out,
               std::string &error) {
    const int fd = open_entry(dir, name, error);
    if (fd < 0) return false;
    read_all(fd, out);
    ::close(fd);
    return true;
}

struct entry_file {
    std::string name;
    uint64_t bytes;
    struct timespec mtime;
    bool regular; // false: something else sits at an entry's name (a FIFO, a link, ...)
};

std::vector<entry_file> list_entries(const cache_directory &dir) {
    std::vector<entry_file> files;
    // The directory opened again through its descriptor (".": no path
    // lookup outside it): a description of its own, so listings in several
    // threads do not share one read position (a dup() would).
    const int fd = ::openat(dir.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? ::fdopendir(fd) : nullptr; // takes over fd
    if (!d) {
        if (fd >= 0) ::close(fd);
        return files;
    }
    while (dirent *e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name.size() <= std::strlen(suffix)
            || name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) != 0)
            continue;
        struct stat st {};
        if (::fstatat(dir.fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || S_ISDIR(st.st_mode))
            continue;
        const bool regular = S_ISREG(st.st_mode);
        files.push_back(
                {name, regular ? static_cast<uint64_t>(st.st_size) : 0, st.st_mtim, regular});
    }
    ::closedir(d);
    return files;
}

void evict_above_cap(const cache_directory &dir) {
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
        if (::unlinkat(dir.fd, f.name.c_str(), 0) == 0) {
            total -= f.bytes;
            note("evicted," + dir.path + "/" + f.name);
        }
    }
}

std::atomic<uint64_t> temp_counter{0};
std::atomic<void (*)(const std::string &)> load_hook{nullptr};

} // namespace

void set_persistent_load_hook_for_testing(void (*hook)(const std::string &path)) {
    load_hook = hook;
}

namespace {

// Whether a loaded segment of o maps [vaddr, vaddr + size), vaddr from o's
// base: in memory, or (from_file) with bytes from the file, as notes are.
bool loads(const dl_phdr_info &o, ElfW(Addr) vaddr, ElfW(Xword) size, bool from_file) {
    for (int i = 0; i < o.dlpi_phnum; ++i) {
        const ElfW(Phdr) &ph = o.dlpi_phdr[i];
        if (ph.p_type == PT_LOAD && vaddr >= ph.p_vaddr
            && vaddr + size <= ph.p_vaddr + (from_file ? ph.p_filesz : ph.p_memsz))
            return true;
    }
    return false;
}

// The GNU build ID among o's mapped notes (hex), "" where it has none.
std::string build_id_of(const dl_phdr_info &o) {
    for (int i = 0; i < o.dlpi_phnum; ++i) {
        const ElfW(Phdr) &ph = o.dlpi_phdr[i];
        if (ph.p_type != PT_NOTE || !loads(o, ph.p_vaddr, ph.p_memsz, true)) continue;
        const auto *at = reinterpret_cast<const unsigned char *>(o.dlpi_addr + ph.p_vaddr);
        const unsigned char *end = at + ph.p_memsz;
        while (at + sizeof(ElfW(Nhdr)) <= end) {
            ElfW(Nhdr) n;
            std::memcpy(&n, at, sizeof n);
            const unsigned char *name = at + sizeof n;
            const unsigned char *desc = name + ((n.n_namesz + 3) & ~3u);
            const unsigned char *next = desc + ((n.n_descsz + 3) & ~3u);
            if (next > end) break;
            if (n.n_type == NT_GNU_BUILD_ID && n.n_namesz == 4
                && std::memcmp(name, "GNU", 4) == 0) {
                static const char hex[] = "0123456789abcdef";
                std::string id;
                for (uint32_t k = 0; k < n.n_descsz; ++k) {
                    id += hex[desc[k] >> 4];
                    id += hex[desc[k] & 15];
                }
                return id;
            }
            at = next;
        }
    }
    return "";
}

// The GNU build ID of the object holding this code, "" where it has none.
// A rebuilt library at the same version has other kernels: keyed on the
// version alone, it read the decisions the old build's tuner had made (a
// width kernel made 1.3x faster kept losing to the batch family's stored
// decision).
std::string library_build_id() {
    struct search {
        uintptr_t code;
        std::string id;
    } s{reinterpret_cast<uintptr_t>(&library_build_id), ""};
    dl_iterate_phdr(
            [](dl_phdr_info *info, size_t, void *data) -> int {
                auto &s = *static_cast<search *>(data);
                if (!loads(*info, s.code - info->dlpi_addr, 1, false)) return 0;
                s.id = build_id_of(*info);
                return 1;
            },
            &s);
    return s.id;
}

} // namespace

std::string persistent_environment() {
    static const std::string env = [] {
        const std::string id = library_build_id();
        return std::string(version()) + (id.empty() ? "" : "+" + id) + ";" + cpu_brand() + ";"
               + to_string(detected_cpu_isa());
    }();
    return env;
}

std::optional<std::string> persistent_load(const std::string &kind, const std::string &key) {
    const directory_ref dir = cache_dir();
    if (!dir) return std::nullopt;
    const std::string name = file_name(kind, key), path = dir->path + "/" + name;
    std::string bytes, error;
    const int fd = open_entry(*dir, name, error);
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
    const directory_ref dir = cache_dir();
    if (!dir) return;
    const std::string bytes = encode(kind, key, payload);
    const std::string name = file_name(kind, key);
    const std::string tmp = ".tmp-" + name + "-" + std::to_string(::getpid()) + "-"
                            + std::to_string(temp_counter++);
    auto fail = [&](const std::string &what) {
        ::unlinkat(dir->fd, tmp.c_str(), 0);
        state &s = the_state();
        std::lock_guard<std::mutex> lock(s.mutex);
        if (!s.store_failure_reported || verbose_level() >= 2) {
            s.store_failure_reported = true;
            note("store failed," + dir->path + "," + what + ",continuing without storing");
        }
    };
    const int fd = ::openat(dir->fd, tmp.c_str(),
                            O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
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
    if (::renameat(dir->fd, tmp.c_str(), dir->fd, name.c_str()) != 0)
        return fail(std::strerror(errno));
    note("stored," + dir->path + "/" + name);
    try {
        evict_above_cap(*dir);
    } catch (const std::exception &e) { // a malformed QSP_CACHE_MAX_MB: said, not thrown from here
        note(std::string("eviction skipped,") + e.what());
    }
}

} // namespace runtime

// ---- public controls --------------------------------------------------------

persistent_cache_info persistent_cache_status() {
    auto &s = runtime::the_state();
    persistent_cache_info info;
    runtime::directory_ref dir;
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        runtime::resolve(s);
        dir = s.directory;
        info.enabled = dir != nullptr;
        info.dir = s.dir;
        info.reason = s.reason;
    }
    info.max_bytes = runtime::max_bytes_from_env();
    if (dir)
        for (const auto &f : runtime::list_entries(*dir)) {
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
    const runtime::directory_ref dir = runtime::cache_dir();
    size_t removed = 0;
    if (!dir) return 0;
    for (const auto &f : runtime::list_entries(*dir))
        removed += ::unlinkat(dir->fd, f.name.c_str(), 0) == 0;
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
    const runtime::directory_ref dir = runtime::cache_dir();
    if (!dir) return result;
    for (const auto &f : runtime::list_entries(*dir)) {
        std::string bytes, error, why;
        runtime::decoded d;
        if (!f.regular)
            why = "not a regular file";
        else if (!runtime::read_file(*dir, f.name, bytes, error))
            why = error.empty() ? "vanished" : error;
        else
            why = runtime::usable(bytes, d);
        if (why.empty() && f.name != runtime::file_name(d.kind, d.key))
            why = "its name does not match its key";
        if (why.empty()) {
            ++result.valid;
            continue;
        }
        result.problems.push_back(dir->path + "/" + f.name + ": " + why);
        result.removed += ::unlinkat(dir->fd, f.name.c_str(), 0) == 0;
    }
    return result;
}

} // namespace qsp
