// Shared helpers of the C++ tests: random sparse weights with forced empty
// and full rows, dnnl memory wrappers, and tolerance checks.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <oneapi/dnnl/dnnl.hpp>

#include "qsparseprop/qsparseprop.hpp"

namespace qsp::test {

inline std::vector<float> random_vector(size_t n, std::mt19937 &rng, float lo = -1.f,
                                        float hi = 1.f) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto &x : v)
        x = d(rng);
    return v;
}

// rows x cols dense matrix with about `sparsity` zeros; when rows >= 3 and the
// sparsity is strictly between 0 and 1, row 0 is forced empty and row 1 full,
// the two edges a row-wise kernel must get right.
inline std::vector<float> random_sparse_dense(int64_t rows, int64_t cols, double sparsity,
                                              std::mt19937 &rng) {
    std::uniform_real_distribution<float> val(-1.f, 1.f);
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            bool keep = u(rng) >= sparsity;
            if (rows >= 3 && sparsity > 0 && sparsity < 1)
                keep = r == 0 ? false : r == 1 ? true : keep;
            float x = val(rng);
            if (x == 0.f) x = 0.5f; // a kept weight must not be an accidental zero
            w[r * cols + c] = keep ? x : 0.f;
        }
    return w;
}

inline dnnl::memory wrap(const dnnl::engine &eng, const dnnl::memory::desc &md, const void *data) {
    return dnnl::memory(md, eng, const_cast<void *>(data));
}

constexpr auto f32_desc = &plain_f32_desc;

inline dnnl::memory seed_memory(const dnnl::engine &eng, std::vector<int32_t> &storage,
                                uint64_t seed) {
    storage = {static_cast<int32_t>(static_cast<uint32_t>(seed)),
               static_cast<int32_t>(static_cast<uint32_t>(seed >> 32))};
    return dnnl::memory(rounding_seed_desc(), eng, storage.data());
}

// |got - want| <= rel * magnitude + abs, where magnitude is the sum of
// |terms| of the reduction (so cancellation does not make the check brittle).
inline void expect_close(const std::vector<float> &got, const std::vector<double> &want,
                         const std::vector<double> &magnitude, double rel, const char *what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    int reported = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double tol = rel * magnitude[i] + 1e-6;
        if (!(std::fabs(got[i] - want[i]) <= tol) && reported++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i]
                          << " (tol " << tol << ")";
    }
}

// fn() throws std::invalid_argument whose message contains `needle` (the
// refusal names the argument and the rule).
template <typename fn_t> void expect_refusal(fn_t fn, const std::string &needle) {
    try {
        fn();
        ADD_FAILURE() << "expected a refusal mentioning '" << needle << "'";
    } catch (const std::invalid_argument &e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
}

// A 3x3 convolution keeping the image's size (stride 1, padding 1 on every
// side).
inline conv2d_geometry same_3x3() {
    conv2d_geometry g;
    g.kernel_h = g.kernel_w = 3;
    g.pad_top = g.pad_left = g.pad_bottom = g.pad_right = 1;
    return g;
}

// A cap the tests run under: an ISA level and, at avx2, whether the tier's
// int8 kernels use AVX-VNNI (their dot products and word forms differ).
struct isa_level {
    cpu_isa isa;
    bool avx_vnni = false;
    operator cpu_isa() const { return isa; }
};
inline std::string to_string(isa_level l) {
    return std::string(qsp::to_string(l.isa))
           + (l.isa == cpu_isa::avx2 && l.avx_vnni ? "+avx_vnni" : "");
}
// Every ISA level up to the detected one, so each test runs on each tier;
// avx2 twice where the CPU has AVX-VNNI (without it, as on Zen 3 and
// Haswell, and with it).
inline std::vector<isa_level> isa_levels() {
    std::vector<isa_level> out;
    for (int i = 0; i <= static_cast<int>(detected_cpu_isa()); ++i) {
        const auto isa = static_cast<cpu_isa>(i);
        out.push_back({isa, isa > cpu_isa::avx2});
        if (isa == cpu_isa::avx2 && cpu_has_avx_vnni()) out.push_back({isa, true});
    }
    return out;
}

// "jit:<isa>:pattern" -> "jit:<isa>": backward-weights (the SDDMM) has no
// pattern-specialised form; other names stay.
inline std::string generic_sibling(const std::string &impl) {
    const std::string suffix = ":pattern";
    if (impl.size() > suffix.size()
        && impl.compare(impl.size() - suffix.size(), suffix.size(), suffix) == 0)
        return impl.substr(0, impl.size() - suffix.size());
    return impl;
}

struct isa_cap_guard {
    explicit isa_cap_guard(cpu_isa isa) { set_max_cpu_isa(isa); }
    explicit isa_cap_guard(isa_level l) { set_max_cpu_isa(l.isa, l.avx_vnni); }
    ~isa_cap_guard() { set_max_cpu_isa(cpu_isa::avx512_core_vnni); }
};

// oneDNN's int8 is exact only with VNNI or AMX (elsewhere the library
// refuses it; see the test below).
inline bool onednn_has_vnni() {
    using isa = dnnl::cpu_isa;
    const isa e = dnnl::get_effective_cpu_isa();
    for (isa v : {isa::avx2_vnni, isa::avx2_vnni_2, isa::avx512_core_vnni, isa::avx512_core_bf16,
                  isa::avx512_core_fp16, isa::avx512_core_amx, isa::avx512_core_amx_fp16})
        if (e == v) return true;
    return false;
}

} // namespace qsp::test
