// qsp-warmup: generates, tunes and records every kernel of a model's sparse
// layers ahead of a run, from a patterns file (written by `qsparseprop
// export-patterns` or qsparseprop.warmup.export_patterns), so a restarted or
// scaled-out job starts with the tuner's decisions in the persistent cache
// (QSP_CACHE_DIR). The same job as `qsparseprop warmup`, without Python.
//
//   qsp-warmup PATTERNS.json [--batch 32,64] [--threads 1,2] [--jobs N]
//   qsp-warmup --check | --clear
//   qsp-warmup --validate PATTERNS.json   (check the file only)
//
// A patterns file is input from outside: every field is checked, the CSR
// arrays go through csr_pattern::from_indices (which validates them), and
// any problem is an error naming the layer — nothing is built from it first.
#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <omp.h>
#include <oneapi/dnnl/dnnl.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include "qsparseprop/qsparseprop.hpp"
#include "tools/patterns_file.hpp"

namespace {

[[noreturn]] void usage_error(const std::string &what) {
    std::fprintf(stderr,
                 "qsp-warmup: %s\n"
                 "usage: qsp-warmup PATTERNS.json [--batch 32,64] [--threads 1,2] [--jobs N]\n"
                 "       qsp-warmup --validate PATTERNS.json\n"
                 "       qsp-warmup --check | --clear\n",
                 what.c_str());
    std::exit(2);
}

std::vector<int> int_list(const std::string &text, const char *flag, long max) {
    std::vector<int> out;
    size_t pos = 0;
    while (pos <= text.size()) {
        const size_t end = std::min(text.find(',', pos), text.size());
        const std::string item = text.substr(pos, end - pos);
        char *stop = nullptr;
        errno = 0;
        const long v = std::strtol(item.c_str(), &stop, 10);
        if (item.empty() || *stop != '\0' || errno != 0 || v < 1 || v > max)
            usage_error(std::string(flag) + " takes comma-separated integers in [1, "
                        + std::to_string(max) + "], got '" + text + "'");
        out.push_back(static_cast<int>(v));
        pos = end + 1;
    }
    return out;
}

// The largest patterns file read (as the Python reader's bound).
constexpr uint64_t max_patterns_file_bytes = uint64_t(4) << 30;

// The layers of a patterns file, every field validated (an error names the
// problem and the layer).
std::vector<qsp::tools::patterns_layer> load(const std::string &path) {
    // A regular file of a bounded size, checked on the open descriptor before
    // reading: a directory threw an uncaught ios_base::failure, /dev/zero read
    // until bad_alloc, a FIFO would block.
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) usage_error("cannot read " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        usage_error(path + ": not a regular file");
    }
    if (static_cast<uint64_t>(st.st_size) > max_patterns_file_bytes) {
        ::close(fd);
        usage_error(path + ": " + std::to_string(st.st_size)
                    + " bytes, more than a patterns file may hold ("
                    + std::to_string(max_patterns_file_bytes) + ")");
    }
    std::string text(static_cast<size_t>(st.st_size), '\0');
    size_t done = 0;
    while (done < text.size()) {
        const ssize_t n = ::read(fd, &text[done], text.size() - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        done += static_cast<size_t>(n);
    }
    ::close(fd);
    text.resize(done);
    try {
        return qsp::tools::parse_patterns(text); // everything validated before any work
    } catch (const std::invalid_argument &e) {
        usage_error(path + ": " + e.what());
    }
}

constexpr auto f32 = &qsp::plain_f32_desc;

// The implementation a descriptor created with attr.tune picked, noting in
// measured / from_cache what its tuning did.
std::string tuned(const qsp::primitive_desc_base &pd, bool &measured, bool &from_cache) {
    if (const qsp::tuning_result *r = pd.tuning()) {
        measured = measured || r->measured;
        from_cache = from_cache || r->from_persistent_cache;
    }
    return pd.impl_info_str();
}

struct result {
    std::string name, cls;
    int64_t batch = 0;
    int threads = 0;
    double ms = 0;
    bool measured = false, from_cache = false;
    std::string impls;
};

// Creates (and so tunes: attr.tune) the forward descriptor make_fwd()
// builds, then backward-data and backward-weights (make_bd / make_bw, given
// the forward as their hint); "fwd/bwd-data/bwd-weights", what was measured
// or read noted in r.
template <typename make_fwd_t, typename make_bd_t, typename make_bw_t>
std::string tune_directions(make_fwd_t make_fwd, make_bd_t make_bd, make_bw_t make_bw, result &r) {
    const auto fwd = make_fwd();
    const std::string f = tuned(fwd, r.measured, r.from_cache);
    const std::string bd = tuned(make_bd(fwd), r.measured, r.from_cache);
    const std::string bw = tuned(make_bw(fwd), r.measured, r.from_cache);
    return f + "/" + bd + "/" + bw;
}

result warm(const qsp::tools::patterns_layer &l, int64_t batch, int threads,
            const dnnl::engine &eng) {
    result r{l.name, l.cls, batch, threads};
    qsp::primitive_attr attr;
    attr.num_threads = threads;
    attr.vectorization = l.vectorization;
    attr.tune = true;
    const auto t0 = std::chrono::steady_clock::now();
    const auto bias_md = l.bias ? f32({l.out}) : dnnl::memory::desc();
    if (!l.conv) {
        const int64_t per_sample =
                std::accumulate(l.input_shape.begin() + 1, l.input_shape.end() - 1, int64_t(1),
                                std::multiplies<int64_t>());
        const int64_t rows = batch * per_sample;
        const auto src = f32({rows, l.in}), dst = f32({rows, l.out});
        auto make_fwd = [&] {
            return qsp::sparse_linear_forward::primitive_desc(eng, qsp::prop_kind::forward_training,
                                                              src, l.pattern, bias_md, dst,
                                                              l.scheme, attr);
        };
        r.impls = tune_directions(
                make_fwd,
                [&](const auto &hint) {
                    return qsp::sparse_linear_backward_data::primitive_desc(eng, src, l.pattern,
                                                                            dst, hint, attr);
                },
                [&](const auto &hint) {
                    return qsp::sparse_linear_backward_weights::primitive_desc(
                            eng, src, l.pattern, bias_md, dst, hint, attr);
                },
                r);
    } else {
        const auto hw = qsp::conv2d_output_hw(l.g, l.input_shape[2], l.input_shape[3]);
        const auto src = f32({batch, l.in, l.input_shape[2], l.input_shape[3]}),
                   dst = f32({batch, l.out, hw[0], hw[1]});
        auto make_fwd = [&] {
            return qsp::sparse_conv2d_forward::primitive_desc(eng, qsp::prop_kind::forward_training,
                                                              src, l.pattern, bias_md, dst, l.g,
                                                              l.scheme, attr);
        };
        r.impls = tune_directions(
                make_fwd,
                [&](const auto &hint) {
                    return qsp::sparse_conv2d_backward_data::primitive_desc(eng, src, l.pattern,
                                                                            dst, hint, attr);
                },
                [&](const auto &hint) {
                    return qsp::sparse_conv2d_backward_weights::primitive_desc(
                            eng, src, l.pattern, bias_md, dst, hint, attr);
                },
                r);
    }
    r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return r;
}

std::string cache_line() {
    const auto s = qsp::persistent_cache_status();
    if (!s.enabled) return "persistent cache: off (" + s.reason + ")";
    char buf[512];
    std::snprintf(buf, sizeof buf, "persistent cache: %s: %zu entries, %.1f MiB (cap %zu MiB)",
                  s.dir.c_str(), s.entries, static_cast<double>(s.bytes) / (1 << 20),
                  s.max_bytes >> 20);
    return buf;
}

} // namespace

int main(int argc, char **argv) {
    std::string patterns;
    std::vector<int> batches, threads;
    int jobs = 1;
    bool check = false, clear = false, validate = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            return argv[++i];
        };
        if (a == "--batch")
            batches = int_list(value(), "--batch", 1 << 20);
        else if (a == "--threads")
            threads = int_list(value(), "--threads", qsp::max_num_threads());
        else if (a == "--jobs")
            jobs = int_list(value(), "--jobs", 1024).front();
        else if (a == "--check")
            check = true;
        else if (a == "--validate")
            validate = true;
        else if (a == "--clear")
            clear = true;
        else if (a == "-h" || a == "--help")
            usage_error("help");
        else if (!a.empty() && a[0] == '-')
            usage_error("unknown option " + a);
        else if (patterns.empty())
            patterns = a;
        else
            usage_error("one patterns file only");
    }
    if (patterns.empty() && !check && !clear)
        usage_error("give a patterns file, --check or --clear");
    if (validate) { // read and check the file only: nothing is built or measured
        if (patterns.empty()) usage_error("--validate needs a patterns file");
        std::printf("%s: %zu layers, valid\n", patterns.c_str(), load(patterns).size());
        return 0;
    }
    const auto status = qsp::persistent_cache_status();
    if ((check || clear) && !status.enabled)
        usage_error("the persistent cache is off: " + status.reason);
    if (clear)
        std::printf("removed %zu entries from %s\n", qsp::clear_persistent_cache(),
                    status.dir.c_str());
    if (check) {
        const auto c = qsp::check_persistent_cache();
        for (const auto &p : c.problems)
            std::printf("removed: %s\n", p.c_str());
        std::printf("checked %s: %zu valid, %zu removed\n", status.dir.c_str(), c.valid, c.removed);
    }
    if (patterns.empty()) return 0;
    if (!status.enabled)
        std::fprintf(stderr, "warning: %s: decisions last only for this process\n",
                     cache_line().c_str());

    const std::vector<qsp::tools::patterns_layer> layers =
            load(patterns); // everything validated before any work
    if (threads.empty()) threads.push_back(omp_get_max_threads());
    struct unit {
        size_t layer;
        int64_t batch;
        int threads;
    };
    std::vector<unit> units;
    for (size_t i = 0; i < layers.size(); ++i)
        for (int64_t b : batches.empty() ? std::vector<int64_t>{layers[i].input_shape[0]}
                                         : std::vector<int64_t>(batches.begin(), batches.end()))
            for (int t : threads)
                units.push_back({i, b, t});

    const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    std::vector<result> results(units.size());
    std::atomic<size_t> next{0}, done{0};
    std::mutex print_mutex;
    bool failed = false;
    auto worker = [&] {
        for (size_t u; (u = next++) < units.size();) {
            try {
                results[u] = warm(layers[units[u].layer], units[u].batch, units[u].threads, eng);
            } catch (const std::exception &e) {
                std::lock_guard<std::mutex> lock(print_mutex);
                std::fprintf(stderr, "qsp-warmup: %s: %s\n", layers[units[u].layer].name.c_str(),
                             e.what());
                failed = true;
            }
            std::lock_guard<std::mutex> lock(print_mutex);
            std::fprintf(stderr, "\rwarming up: %zu/%zu", ++done, units.size());
        }
    };
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int j = 1; j < jobs; ++j)
        pool.emplace_back(worker);
    worker();
    for (auto &t : pool)
        t.join();
    std::fprintf(stderr, "\n");
    std::printf("%-28s %-22s %5s %3s %10s  %-6s %s\n", "layer", "class", "batch", "thr", "ms",
                "source", "implementations (fwd/bwd-data/bwd-weights)");
    for (const auto &r : results) {
        if (r.name.empty()) continue; // failed above
        std::printf("%-28.28s %-22s %5lld %3d %10.1f  %-6s %s\n", r.name.c_str(), r.cls.c_str(),
                    static_cast<long long>(r.batch), r.threads, r.ms,
                    r.measured ? "tuned" : (r.from_cache ? "cache" : "-"), r.impls.c_str());
    }
    std::printf("%zu layer shapes warmed in %.1f s; %s\n", units.size(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                cache_line().c_str());
    return failed ? 1 : 0;
}
