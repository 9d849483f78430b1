// The persistent cache: a cold process measures and stores, a warm one reads
// the same decisions without measuring; damaged, truncated, empty,
// foreign-version and foreign-CPU entries are ignored and rebuilt; the
// directory is created user-only, and a symlinked, foreign or unwritable one,
// or one under a folder another user could change, turns the cache off while
// the library keeps working; the directory is used through the descriptor
// opened when it was checked; processes storing into one cache at once leave
// it valid.
#include <atomic>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <csignal>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/persistent_cache.hpp"
#include "test_utils.hpp"

namespace qsp::test {

// The other tests run with the persistent cache off: they count
// measurements, which a decision left on disk by an earlier run would skip.
// The tests here point it at directories of their own.
static const bool persistent_cache_off_for_tests = (set_persistent_cache_dir(""), true);

namespace {

std::string fresh_dir(const std::string &name) {
    std::string d = testing::TempDir() + "qsp_pcache_" + name + "_" + std::to_string(::getpid());
    std::system(("rm -rf '" + d + "'").c_str());
    return d;
}

std::vector<std::string> entries(const std::string &dir) {
    std::vector<std::string> out;
    if (DIR *d = ::opendir(dir.c_str())) {
        while (dirent *e = ::readdir(d)) {
            const std::string n = e->d_name;
            if (n.size() > 5 && n.substr(n.size() - 5) == ".qspc") out.push_back(dir + "/" + n);
        }
        ::closedir(d);
    }
    return out;
}

// Stores one entry into the empty cache at dir; its file, or "" when the
// directory does not then hold exactly one.
std::string store_one(const std::string &dir, const std::string &key, const std::string &payload) {
    runtime::persistent_store("test", key, payload);
    const auto files = entries(dir);
    return files.size() == 1 ? files[0] : std::string();
}

std::string read_all(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_all(const std::string &path, const std::string &bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << bytes;
}

// An f32 3x3 Conv2d: on AVX2 and AVX-512 both JIT families (batch- and
// width-innermost) accept it, so tune() measures; on the portable tier only
// the reference does, and nothing is measured or stored.
struct conv_layer {
    conv_layer() : eng(dnnl::engine::kind::cpu, 0) {
        std::mt19937 rng(3);
        g = same_3x3();
        pattern = csr_pattern::from_dense(random_sparse_dense(16, 16 * 9, 0.9, rng).data(), 16,
                                          16 * 9);
        attr.num_threads = 1;
    }
    sparse_conv2d_forward::primitive_desc pd() const {
        return sparse_conv2d_forward::primitive_desc(
                eng, prop_kind::forward_training, f32_desc({4, 16, 12, 12}), pattern, {},
                f32_desc({4, 16, 12, 12}), g, quant_scheme::f32, attr);
    }
    dnnl::engine eng;
    csr_pattern pattern;
    conv2d_geometry g;
    primitive_attr attr;
};

std::string u32_bytes(uint32_t v) {
    return std::string(reinterpret_cast<const char *>(&v), 4);
}

struct cache_dir_scope {
    explicit cache_dir_scope(const std::string &d) { set_persistent_cache_dir(d); }
    ~cache_dir_scope() { set_persistent_cache_dir(""); }
};

} // namespace

TEST(PersistentCache, cold_fills_warm_reads_the_same_decision_without_measuring) {
    const std::string dir = fresh_dir("warm");
    cache_dir_scope scope(dir);
    conv_layer layer;
    clear_tuning_decisions();
    const tuning_result cold = tune(layer.pd());
    if (effective_cpu_isa() == cpu_isa::ref) { // the reference never competes: nothing to store
        EXPECT_FALSE(cold.measured);
        EXPECT_TRUE(entries(dir).empty());
        return;
    }
    EXPECT_TRUE(cold.measured);
    EXPECT_FALSE(cold.from_persistent_cache);
    ASSERT_EQ(entries(dir).size(), 1u);
    struct stat st {};
    ASSERT_EQ(::stat(dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u) << "created user-only";

    clear_tuning_decisions(); // a new process: nothing in memory
    const tuning_result warm = tune(layer.pd());
    EXPECT_FALSE(warm.measured);
    EXPECT_TRUE(warm.from_persistent_cache);
    EXPECT_EQ(warm.chosen, cold.chosen);
    EXPECT_EQ(layer.pd().impl_info_str(), cold.chosen) << "descriptors pick the stored decision";
    const auto status = persistent_cache_status();
    EXPECT_TRUE(status.enabled);
    EXPECT_EQ(status.entries, 1u);
    EXPECT_GT(status.bytes, static_cast<size_t>(layer.pattern.nnz()) * 4)
            << "the key holds the pattern";
    EXPECT_EQ(clear_persistent_cache(), 1u);
    EXPECT_TRUE(entries(dir).empty());
    clear_tuning_decisions();
}

TEST(PersistentCache, bad_entries_are_ignored_and_rebuilt_never_trusted) {
    const std::string dir = fresh_dir("bad");
    cache_dir_scope scope(dir);
    const std::string key = std::string("layer key \0 with a zero", 23), payload = "chosen=x\n";
    const std::string file = store_one(dir, key, payload);
    ASSERT_FALSE(file.empty());
    const std::string good = read_all(file);
    ASSERT_EQ(runtime::persistent_load("test", key).value_or(""), payload);
    EXPECT_FALSE(runtime::persistent_load("test", key + "!")) << "another key";
    EXPECT_FALSE(runtime::persistent_load("other", key)) << "another kind";

    auto corrupt = [&](const std::string &bytes) {
        write_all(file, bytes);
        const bool used = runtime::persistent_load("test", key).has_value();
        runtime::persistent_store("test", key, payload); // rebuilt
        EXPECT_EQ(read_all(file), good);
        return used;
    };
    for (size_t i = 0; i < good.size(); i += 7) { // every region, header to checksum
        std::string flipped = good;
        flipped[i] ^= 0x10;
        EXPECT_FALSE(corrupt(flipped)) << "bit flipped at byte " << i;
    }
    for (size_t n : {size_t(0), size_t(3), size_t(8), good.size() / 2, good.size() - 1})
        EXPECT_FALSE(corrupt(good.substr(0, n))) << "truncated to " << n;
    EXPECT_FALSE(corrupt(good + "trailing")) << "trailing bytes";
    for (uint32_t other :
         {runtime::persistent_format_version - 1, runtime::persistent_format_version + 1}) {
        // another format version: refused before the checksum is read
        std::string version = good;
        version[4] = static_cast<char>(other);
        EXPECT_FALSE(corrupt(version)) << "format version " << other;
    }

    // A well-formed entry written by another library version or on another CPU.
    const std::string env = runtime::persistent_environment();
    for (const std::string &other : {std::string("0.0.0") + env.substr(env.find(';')),
                                     env.substr(0, env.find(';')) + ";Another CPU;avx2"}) {
        ASSERT_NE(good.find(env), std::string::npos);
        std::string foreign = good.substr(0, good.size() - 8);
        const size_t at = foreign.find(env);
        foreign.replace(at - 4, 4 + env.size(),
                        u32_bytes(static_cast<uint32_t>(other.size())) + other);
        uint64_t h = 1469598103934665603ull;
        for (unsigned char c : foreign) {
            h ^= c;
            h *= 1099511628211ull;
        }
        foreign.append(reinterpret_cast<const char *>(&h), 8);
        write_all(file, foreign);
        const auto check = check_persistent_cache();
        EXPECT_EQ(check.valid, 0u);
        EXPECT_EQ(check.removed, 1u) << other;
        EXPECT_FALSE(runtime::persistent_load("test", key));
        runtime::persistent_store("test", key, payload);
    }
    EXPECT_EQ(check_persistent_cache().valid, 1u);
}

// Entries are keyed on the library's build, not its version alone: a
// rebuild with other kernels at the same version must tune again.
TEST(PersistentCache, entries_are_keyed_on_the_library_build) {
    const std::string env = runtime::persistent_environment();
    const std::string first = env.substr(0, env.find(';'));
    ASSERT_EQ(first.rfind(version(), 0), 0u) << env;
    const size_t plus = first.find('+');
    ASSERT_NE(plus, std::string::npos) << "no GNU build ID in " << env;
    const std::string id = first.substr(plus + 1);
    EXPECT_GE(id.size(), 16u) << env;
    EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << env;
}

TEST(PersistentCache, unusable_directories_turn_it_off_and_the_library_still_works) {
    const std::string base = fresh_dir("dirs");
    ASSERT_EQ(::mkdir(base.c_str(), 0700), 0);
    const std::string real = base + "/real", link = base + "/link", file = base + "/file",
                      open_dir = base + "/open", ro = base + "/ro";
    ASSERT_EQ(::mkdir(real.c_str(), 0700), 0);
    ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
    write_all(file, "x");
    ASSERT_EQ(::mkdir(open_dir.c_str(), 0700), 0);
    ASSERT_EQ(::chmod(open_dir.c_str(), 0777), 0);
    ASSERT_EQ(::mkdir(ro.c_str(), 0500), 0);
    struct {
        std::string dir, says;
    } cases[] = {{link, "symbolic link"},
                 {file, "not a directory"},
                 {open_dir, "writable by other"},
                 {"", "turned off"}};
    for (const auto &c : cases) {
        cache_dir_scope scope(c.dir);
        const auto status = persistent_cache_status();
        EXPECT_FALSE(status.enabled) << c.dir;
        EXPECT_NE(status.reason.find(c.says), std::string::npos) << status.reason;
        runtime::persistent_store("test", "k", "v"); // nothing happens, nothing throws
        EXPECT_FALSE(runtime::persistent_load("test", "k"));
    }
    EXPECT_TRUE(entries(real).empty()) << "nothing written through the link";
    if (::geteuid() != 0) { // root writes anywhere
        cache_dir_scope scope(ro);
        EXPECT_FALSE(persistent_cache_status().enabled);
    }
    { // a directory whose mode admits root but which takes no files (it said
      // "enabled" and every store failed)
        cache_dir_scope scope("/proc");
        const auto status = persistent_cache_status();
        EXPECT_FALSE(status.enabled);
        EXPECT_NE(status.reason.find("/proc"), std::string::npos) << status.reason;
    }
    { // a cache that cannot store (here: read-only after it was opened) reports and goes on
        const std::string later_ro = base + "/later_ro";
        cache_dir_scope scope(later_ro);
        ASSERT_TRUE(persistent_cache_status().enabled);
        ::chmod(later_ro.c_str(), 0500);
        conv_layer layer;
        clear_tuning_decisions();
        EXPECT_NO_THROW(tune(layer.pd()));
        ::chmod(later_ro.c_str(), 0700);
    }
    clear_tuning_decisions();
}

TEST(PersistentCache, processes_storing_at_once_leave_it_valid_and_the_cap_evicts) {
    const std::string dir = fresh_dir("race");
    cache_dir_scope scope(dir);
    ASSERT_TRUE(persistent_cache_status().enabled);
    std::vector<pid_t> kids;
    for (int k = 0; k < 4; ++k) {
        const pid_t pid = ::fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) { // the same keys, each with its own payload size
            for (int i = 0; i < 40; ++i)
                runtime::persistent_store("race", "key" + std::to_string(i % 10),
                                          std::string(1000 + 100 * k, char('a' + k)));
            ::_exit(0);
        }
        kids.push_back(pid);
    }
    for (pid_t pid : kids) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    const auto check = check_persistent_cache();
    EXPECT_EQ(check.valid, 10u);
    EXPECT_EQ(check.removed, 0u);
    for (int i = 0; i < 10; ++i) {
        const auto v = runtime::persistent_load("race", "key" + std::to_string(i));
        ASSERT_TRUE(v.has_value());
        EXPECT_EQ(v->find_first_not_of(v->front()), std::string::npos)
                << "one writer's whole payload";
    }
    // The cap: 1 MiB of 300 KiB entries keeps the newest few.
    ::setenv("QSP_CACHE_MAX_MB", "1", 1);
    for (int i = 0; i < 8; ++i)
        runtime::persistent_store("big", "big" + std::to_string(i), std::string(300 << 10, 'b'));
    ::unsetenv("QSP_CACHE_MAX_MB");
    EXPECT_LE(persistent_cache_status().bytes, size_t(1) << 20);
    EXPECT_TRUE(runtime::persistent_load("big", "big7").has_value()) << "the newest stays";
    EXPECT_FALSE(runtime::persistent_load("big", "big0").has_value()) << "the oldest went";
}

} // namespace qsp::test

namespace qsp::test {

// A FIFO planted at an entry's name blocked every load of that key forever
// (the open waits for a writer); now it is a miss, and check / clear report
// and remove it. The load runs in a child process so that a regression fails
// the test by timeout instead of hanging the suite.
TEST(PersistentCache, a_fifo_at_an_entry_name_neither_blocks_nor_survives_check) {
    const std::string dir = fresh_dir("fifo");
    cache_dir_scope scope(dir);
    const std::string key = "layer key", payload = "chosen=x\n";
    const std::string file = store_one(dir, key, payload);
    ASSERT_FALSE(file.empty());
    ASSERT_EQ(::unlink(file.c_str()), 0);
    ASSERT_EQ(::mkfifo(file.c_str(), 0600), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
        const bool loaded = runtime::persistent_load("test", key).has_value();
        ::_exit(loaded ? 1 : 0);
    }
    int status = 0;
    for (int waited_ms = 0; waited_ms < 10000; waited_ms += 10) {
        if (::waitpid(child, &status, WNOHANG) == child) break;
        ::usleep(10000);
    }
    if (::waitpid(child, &status, WNOHANG) == 0) {
        ::kill(child, SIGKILL);
        ::waitpid(child, &status, 0);
        FAIL() << "a load of a key whose entry is a FIFO did not return within 10 s";
    }
    ASSERT_TRUE(WIFEXITED(status));
    EXPECT_EQ(WEXITSTATUS(status), 0) << "a FIFO was read as an entry";

    const persistent_cache_check c = check_persistent_cache();
    ASSERT_EQ(c.problems.size(), 1u);
    EXPECT_NE(c.problems[0].find("not a regular file"), std::string::npos) << c.problems[0];
    EXPECT_EQ(c.removed, 1u);
    struct stat st {};
    EXPECT_NE(::lstat(file.c_str(), &st), 0) << "check removes it";

    ASSERT_EQ(::mkfifo(file.c_str(), 0600), 0);
    EXPECT_EQ(clear_persistent_cache(), 1u) << "clear removes it too";
    // and the key works again
    runtime::persistent_store("test", key, payload);
    EXPECT_EQ(runtime::persistent_load("test", key).value_or(""), payload);
}

// "Recently used" is marked through the descriptor that was read: an entry
// swapped for a link to an outside file between the read and the touch
// (the hook below does it at that moment) leaves the outside file's times
// alone; marking by path followed the link and changed them.
std::string swap_target; // the outside file the hook links the entry to

void swap_entry_for_link(const std::string &path) {
    ::unlink(path.c_str());
    ASSERT_EQ(::symlink(swap_target.c_str(), path.c_str()), 0);
}

TEST(PersistentCache, a_load_touches_the_entry_it_read_not_a_path) {
    const std::string dir = fresh_dir("touch");
    cache_dir_scope scope(dir);
    const std::string key = "layer key", payload = "chosen=x\n";
    const std::string file = store_one(dir, key, payload);
    ASSERT_FALSE(file.empty());
    const struct timespec old_times[2] = {{1000, 0}, {1000, 0}};
    ASSERT_EQ(::utimensat(AT_FDCWD, file.c_str(), old_times, 0), 0);
    ASSERT_TRUE(runtime::persistent_load("test", key).has_value());
    struct stat st {};
    ASSERT_EQ(::stat(file.c_str(), &st), 0);
    EXPECT_GT(st.st_mtim.tv_sec, 1000) << "the entry read is marked recently used";

    swap_target = fresh_dir("touch_outside");
    write_all(swap_target, "not ours");
    ASSERT_EQ(::utimensat(AT_FDCWD, swap_target.c_str(), old_times, 0), 0);
    runtime::set_persistent_load_hook_for_testing(swap_entry_for_link);
    const bool loaded = runtime::persistent_load("test", key).has_value();
    runtime::set_persistent_load_hook_for_testing(nullptr);
    EXPECT_TRUE(loaded) << "what was read was whole and valid";
    ASSERT_EQ(::stat(swap_target.c_str(), &st), 0);
    EXPECT_EQ(st.st_mtim.tv_sec, 1000) << "a file outside the cache was touched";
    ::unlink(swap_target.c_str());
}

TEST(PersistentCache, listings_in_several_threads_each_see_every_entry) {
    // Each listing reads the one opened directory through a description of
    // its own: threads listing at once must not share a read position.
    // (Enough entries that one listing takes several getdents calls.)
    const std::string dir = fresh_dir("listings");
    cache_dir_scope scope(dir);
    ASSERT_TRUE(persistent_cache_status().enabled);
    const size_t n = 3000;
    for (size_t i = 0; i < n; ++i)
        write_all(dir + "/entry-" + std::to_string(i) + ".qspc", "x");
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t)
        threads.emplace_back([&] {
            for (int r = 0; r < 10; ++r)
                wrong += persistent_cache_status().entries != n;
        });
    for (auto &t : threads)
        t.join();
    EXPECT_EQ(wrong.load(), 0);
}

TEST(PersistentCache, the_directory_is_opened_once_and_the_folders_above_it_checked) {
    { // swapped for a link to another folder after it was opened: entries
      // still go to (and come from) the directory that was checked
        const std::string dir = fresh_dir("swap"), moved = dir + ".moved",
                          other = fresh_dir("swap_other");
        std::system(("rm -rf '" + moved + "'").c_str());
        ASSERT_EQ(::mkdir(other.c_str(), 0700), 0);
        cache_dir_scope scope(dir);
        ASSERT_TRUE(persistent_cache_status().enabled);
        ASSERT_EQ(::rename(dir.c_str(), moved.c_str()), 0);
        ASSERT_EQ(::symlink(other.c_str(), dir.c_str()), 0);
        runtime::persistent_store("test", "k", "v");
        ASSERT_EQ(entries(moved).size(), 1u) << "stored into the directory that was checked";
        EXPECT_TRUE(entries(other).empty()) << "nothing written through the swapped-in link";
        write_all(other + "/" + entries(moved)[0].substr(moved.size() + 1), "forged");
        EXPECT_EQ(runtime::persistent_load("test", "k").value_or(""), "v");
        EXPECT_EQ(clear_persistent_cache(), 1u);
        EXPECT_TRUE(entries(moved).empty());
        EXPECT_EQ(entries(other).size(), 1u) << "clear removed nothing outside the cache";
    }
    const std::string base = fresh_dir("parents");
    ASSERT_EQ(::mkdir(base.c_str(), 0700), 0);
    { // a folder above it that others may write (and not sticky, unlike /tmp)
        const std::string open_parent = base + "/open";
        ASSERT_EQ(::mkdir(open_parent.c_str(), 0700), 0);
        ASSERT_EQ(::mkdir((open_parent + "/cache").c_str(), 0700), 0);
        ASSERT_EQ(::chmod(open_parent.c_str(), 0777), 0);
        cache_dir_scope scope(open_parent + "/cache");
        const auto status = persistent_cache_status();
        EXPECT_FALSE(status.enabled);
        EXPECT_NE(status.reason.find(open_parent + " (above the cache directory) is writable"),
                  std::string::npos)
                << status.reason;
        // reached through a link in a folder of ours: the link is resolved
        // and the real path checked
        ASSERT_EQ(::symlink(open_parent.c_str(), (base + "/via").c_str()), 0);
        cache_dir_scope via(base + "/via/cache");
        const auto linked = persistent_cache_status();
        EXPECT_FALSE(linked.enabled);
        EXPECT_NE(linked.reason.find(open_parent), std::string::npos) << linked.reason;
        ASSERT_EQ(::chmod(open_parent.c_str(), 01777), 0); // sticky, as /tmp
        cache_dir_scope sticky(base + "/via/cache");
        EXPECT_TRUE(persistent_cache_status().enabled) << persistent_cache_status().reason;
        runtime::persistent_store("test", "k", "v");
        EXPECT_EQ(entries(open_parent + "/cache").size(), 1u) << "stored in the real directory";
    }
    if (::geteuid() == 0) { // only root can give a folder to another user
        const std::string foreign = base + "/foreign";
        ASSERT_EQ(::mkdir(foreign.c_str(), 0755), 0);
        ASSERT_EQ(::mkdir((foreign + "/cache").c_str(), 0700), 0);
        ASSERT_EQ(::chown(foreign.c_str(), 65534, 65534), 0);
        cache_dir_scope scope(foreign + "/cache");
        const auto status = persistent_cache_status();
        EXPECT_FALSE(status.enabled);
        EXPECT_NE(
                status.reason.find(foreign + " (above the cache directory) belongs to user 65534"),
                std::string::npos)
                << status.reason;
    }
}

} // namespace qsp::test
