// Kernel-level A/B of sparse Linear implementations through the public C++
// API: per shape and sparsity, forward, backward-data and backward-weights of
// each named implementation (forced with primitive_attr::implementation; a
// "...:pattern" one runs backward-weights on its generic sibling), rounds
// interleaved, medians of the kernel time (inside the kernels' parallel
// regions) and of the whole primitive (qsp::profile_info).
//
//   build/benchmarks/qsp_linear_kernel_ab [--scheme f32|s8] [--shapes L1,L3]
//       [--sparsities 0.8,0.9] [--rounds 30] [--flush] [impl ...]
//
// A shape is a name (L1-L4, the bench's) or batch x in x out ("256x96x3072":
// an experiment's own, say the same rows and entries with a source that
// fits L1).
//
// Default implementations: the tier's generic kernels and the layer's
// specialised code (jit:<isa>, jit:<isa>:pattern). --flush streams 32 MiB
// through the cache before each call (what a call meets inside a network).
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <qsparseprop/qsparseprop.hpp>

namespace {

constexpr auto f32 = &qsp::plain_f32_desc;

std::vector<std::string> split(const std::string &s) {
    std::vector<std::string> out;
    std::stringstream in(s);
    for (std::string item; std::getline(in, item, ',');)
        if (!item.empty()) out.push_back(item);
    return out;
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
}

void flush_caches() {
    static std::vector<float> junk(size_t(8) << 20);
    for (float &j : junk)
        j += 1.f;
}

int usage(const char *why) {
    std::fprintf(stderr,
                 "qsp_linear_kernel_ab: %s\nusage: qsp_linear_kernel_ab [--scheme f32|s8] "
                 "[--shapes L1,L2,L3,L4,BxINxOUT] [--sparsities 0.8,0.9,0.95,0.98] [--rounds N] "
                 "[--flush] [implementation ...]\n",
                 why);
    return 2;
}

} // namespace

int main(int argc, char **argv) {
    using namespace qsp;
    std::map<std::string, std::array<int64_t, 3>> shapes{{"L1", {256, 768, 3072}},
                                                         {"L2", {256, 3072, 768}},
                                                         {"L3", {128, 4096, 4096}},
                                                         {"L4", {64, 512, 1000}}};
    std::string scheme_name = "f32";
    std::vector<std::string> names = {"L1", "L2", "L3", "L4"}, impls;
    std::vector<double> sparsities = {0.8, 0.9, 0.95, 0.98};
    int rounds = 30;
    bool flush = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
        if (a == "--scheme") {
            scheme_name = value();
        } else if (a == "--shapes") {
            names = split(value());
        } else if (a == "--sparsities") {
            sparsities.clear();
            for (const auto &s : split(value()))
                sparsities.push_back(std::atof(s.c_str()));
        } else if (a == "--rounds") {
            rounds = std::atoi(value().c_str());
        } else if (a == "--flush") {
            flush = true;
        } else if (a.rfind("--", 0) == 0) {
            return usage(("unknown option " + a).c_str());
        } else {
            impls.push_back(a);
        }
    }
    if (scheme_name != "f32" && scheme_name != "s8") return usage("--scheme is f32 or s8");
    if (rounds < 1) return usage("--rounds must be >= 1");
    for (const auto &n : names) {
        if (shapes.count(n)) continue;
        long long b = 0, k = 0, o = 0;
        char tail = 0;
        if (std::sscanf(n.c_str(), "%lldx%lldx%lld%c", &b, &k, &o, &tail) != 3 || b < 1 || k < 1
            || o < 1)
            return usage(("unknown shape " + n + " (a name, or batch x in x out: 256x768x3072)")
                                 .c_str());
        shapes[n] = {b, k, o};
    }
    const quant_scheme scheme = scheme_name == "s8" ? quant_scheme::s8 : quant_scheme::f32;
    const cpu_isa isa = effective_cpu_isa();
    if (impls.empty()) {
        if (isa == cpu_isa::ref)
            return usage("this CPU runs the reference only: nothing to compare");
        const std::string jit = std::string("jit:")
                                + (isa == cpu_isa::avx2 ? "avx2"
                                   : scheme == quant_scheme::f32 || isa == cpu_isa::avx512_core
                                           ? "avx512_core"
                                           : "avx512_core_vnni");
        impls = {jit, jit + ":pattern"};
    }
    std::printf("qsp_linear_kernel_ab: isa=%s scheme=%s threads=2 rounds=%d flush=%d\n",
                to_string(isa), scheme_name.c_str(), rounds, int(flush));
    std::printf("%-5s %5s %-32s %10s %10s %10s %10s %10s %10s\n", "shape", "sp", "implementation",
                "fwd kern", "fwd total", "bd kern", "bd total", "bw kern", "bw total");
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    set_profiling(true);
    for (const auto &name : names)
        for (double sp : sparsities) {
            const auto [B, K, N] = shapes.at(name);
            std::mt19937 rng(1);
            std::uniform_real_distribution<float> u(-1.f, 1.f), p01(0.f, 1.f);
            std::vector<float> dense(static_cast<size_t>(N * K));
            for (float &v : dense)
                v = p01(rng) < sp ? 0.f : u(rng);
            const auto pattern = csr_pattern::from_dense(dense.data(), N, K);
            std::vector<float> values;
            for (float v : dense)
                if (v != 0.f) values.push_back(v);
            std::vector<float> x(static_cast<size_t>(B * K)), dy(static_cast<size_t>(B * N)),
                    y(dy.size()), dx(x.size());
            for (float &v : x)
                v = u(rng);
            for (float &v : dy)
                v = u(rng);
            struct run {
                sparse_linear_forward::primitive_desc fwd_pd;
                sparse_linear_forward fwd;
                sparse_linear_backward_data bd;
                sparse_linear_backward_weights bw;
                std::vector<uint8_t> workspace;
                std::vector<double> fk, ft, bk, bt, wk, wt;
            };
            std::vector<run> runs;
            for (const auto &impl : impls) {
                primitive_attr attr;
                attr.num_threads = 2;
                attr.implementation = impl;
                try {
                    sparse_linear_forward::primitive_desc f(eng, prop_kind::forward_training,
                                                            f32({B, K}), pattern, f32({B, N}),
                                                            scheme, attr);
                    sparse_linear_backward_data::primitive_desc b(eng, f32({B, K}), pattern,
                                                                  f32({B, N}), f, attr);
                    primitive_attr w_attr = attr;
                    const std::string suffix = ":pattern";
                    if (impl.size() > suffix.size()
                        && impl.compare(impl.size() - suffix.size(), suffix.size(), suffix) == 0)
                        w_attr.implementation = impl.substr(0, impl.size() - suffix.size());
                    sparse_linear_backward_weights::primitive_desc w(eng, f32({B, K}), pattern,
                                                                     dnnl::memory::desc(),
                                                                     f32({B, N}), f, w_attr);
                    runs.push_back({f,
                                    sparse_linear_forward(f),
                                    sparse_linear_backward_data(b),
                                    sparse_linear_backward_weights(w),
                                    std::vector<uint8_t>(f.workspace_desc().get_size()),
                                    {},
                                    {},
                                    {},
                                    {},
                                    {},
                                    {}});
                } catch (const std::exception &e) {
                    std::fprintf(stderr, "%s: %s\n", impl.c_str(), e.what());
                    return 1;
                }
            }
            std::vector<int32_t> seed{1, 2};
            for (int round = -3; round < rounds; ++round) // 3 warm-up rounds
                for (run &r : runs) {
                    exec_args fa{{DNNL_ARG_SRC, dnnl::memory(f32({B, K}), eng, x.data())},
                                 {DNNL_ARG_WEIGHTS,
                                  dnnl::memory(r.fwd_pd.weights_desc(), eng, values.data())},
                                 {DNNL_ARG_DST, dnnl::memory(f32({B, N}), eng, y.data())}};
                    if (scheme == quant_scheme::s8)
                        fa[DNNL_ARG_WORKSPACE] =
                                dnnl::memory(r.fwd_pd.workspace_desc(), eng, r.workspace.data());
                    exec_args ba{{DNNL_ARG_DIFF_DST, dnnl::memory(f32({B, N}), eng, dy.data())},
                                 {DNNL_ARG_WEIGHTS,
                                  dnnl::memory(r.fwd_pd.weights_desc(), eng, values.data())},
                                 {DNNL_ARG_DIFF_SRC, dnnl::memory(f32({B, K}), eng, dx.data())}};
                    if (scheme == quant_scheme::s8) { // s8 reads the forward's quantized weights
                        ba[QSP_ARG_ROUNDING_SEED] =
                                dnnl::memory(rounding_seed_desc(), eng, seed.data());
                        ba[DNNL_ARG_WORKSPACE] = fa[DNNL_ARG_WORKSPACE];
                    }
                    clear_profile();
                    if (flush) flush_caches();
                    r.fwd.execute(strm, fa);
                    if (flush) flush_caches();
                    r.bd.execute(strm, ba);
                    std::vector<float> dw(values.size());
                    exec_args wa{{DNNL_ARG_DIFF_DST, dnnl::memory(f32({B, N}), eng, dy.data())},
                                 {DNNL_ARG_DIFF_WEIGHTS,
                                  dnnl::memory(r.fwd_pd.weights_desc(), eng, dw.data())}};
                    if (scheme == quant_scheme::s8) {
                        wa[DNNL_ARG_WORKSPACE] =
                                dnnl::memory(r.fwd_pd.workspace_desc(), eng, r.workspace.data());
                        wa[QSP_ARG_ROUNDING_SEED] = ba[QSP_ARG_ROUNDING_SEED];
                    } else {
                        wa[DNNL_ARG_SRC] = dnnl::memory(f32({B, K}), eng, x.data());
                    }
                    if (flush) flush_caches();
                    r.bw.execute(strm, wa);
                    if (round < 0) continue;
                    for (const auto &e : profile_info()) {
                        if (e.direction == "forward") {
                            r.fk.push_back(e.kernel_ms);
                            r.ft.push_back(e.total_ms);
                        } else if (e.direction == "backward_data") {
                            r.bk.push_back(e.kernel_ms);
                            r.bt.push_back(e.total_ms);
                        } else if (e.direction == "backward_weights") {
                            r.wk.push_back(e.kernel_ms);
                            r.wt.push_back(e.total_ms);
                        }
                    }
                }
            for (size_t i = 0; i < runs.size(); ++i)
                std::printf("%-5s %5.2f %-32s %10.3f %10.3f %10.3f %10.3f %10.3f %10.3f\n",
                            name.c_str(), sp, impls[i].c_str(), median(runs[i].fk),
                            median(runs[i].ft), median(runs[i].bk), median(runs[i].bt),
                            median(runs[i].wk), median(runs[i].wt));
            if (runs.size() == 2)
                std::printf("%-5s %5.2f %-32s %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f\n",
                            name.c_str(), sp, "ratio_(first/second)",
                            median(runs[0].fk) / median(runs[1].fk),
                            median(runs[0].ft) / median(runs[1].ft),
                            median(runs[0].bk) / median(runs[1].bk),
                            median(runs[0].bt) / median(runs[1].bt),
                            median(runs[0].wk) / median(runs[1].wk),
                            median(runs[0].wt) / median(runs[1].wt));
        }
    return 0;
}
