// XNNPACK-style tester: SparseLinearTester().batch(..).in(..).out(..)
// .sparsity(..).scheme(..).implementation(..).fused(..).Test() runs a
// training step (training_step.hpp) on every ISA tier the CPU has (only the
// full ISA when an implementation is forced): f32 against a naive dense
// computation in double, s8 bit for bit against the reference
// implementation (itself held to the scheme's integer model in
// test_s8_scheme.cpp).
#pragma once

#include <string>

#include "training_step.hpp"

namespace qsp::test {

class SparseLinearTester {
public:
    SparseLinearTester &batch(int64_t v) {
        batch_ = v;
        return *this;
    }
    SparseLinearTester &in(int64_t v) {
        in_ = v;
        return *this;
    }
    SparseLinearTester &out(int64_t v) {
        out_ = v;
        return *this;
    }
    SparseLinearTester &sparsity(double v) {
        sparsity_ = v;
        return *this;
    }
    SparseLinearTester &threads(int v) {
        threads_ = v;
        return *this;
    }
    SparseLinearTester &bias(bool v) {
        bias_ = v;
        return *this;
    }
    SparseLinearTester &seed(unsigned v) {
        seed_ = v;
        return *this;
    }
    SparseLinearTester &scheme(quant_scheme v) {
        scheme_ = v;
        return *this;
    }
    SparseLinearTester &implementation(const std::string &v) {
        implementation_ = v;
        return *this;
    }
    SparseLinearTester &fused(bool v) {
        fused_ = v;
        return *this;
    }

    void Test() const {
        SCOPED_TRACE("B=" + std::to_string(batch_) + " K=" + std::to_string(in_)
                     + " N=" + std::to_string(out_) + " sparsity=" + std::to_string(sparsity_)
                     + " threads=" + std::to_string(threads_) + " " + to_string(scheme_) + " "
                     + implementation_ + (fused_ ? " fused" : ""));
        std::mt19937 rng(seed_);
        const int64_t B = batch_, K = in_, N = out_;
        auto dense_w = random_sparse_dense(N, K, sparsity_, rng);
        auto w = csr_weights::from_dense(dense_w.data(), N, K);
        auto x = random_vector(static_cast<size_t>(B * K), rng);
        auto dy = random_vector(static_cast<size_t>(B * N), rng);
        auto b = random_vector(static_cast<size_t>(N), rng);

        const linear_layer layer{B, K, N};
        step_options o;
        o.scheme = scheme_;
        o.implementation = implementation_;
        o.fused = fused_;
        o.threads = threads_;
        o.bias = bias_;
        if (scheme_ == quant_scheme::s8) { // against the reference: no oracle needed
            expect_step_matches_on_every_tier(layer, w, x, dy, b, o, f32_oracle{});
            return;
        }
        // Naive dense oracle in double.
        const size_t ny = static_cast<size_t>(B * N), nx = static_cast<size_t>(B * K),
                     nw = static_cast<size_t>(w.pattern.nnz());
        f32_oracle want;
        auto &[y_ref, y_mag, dx_ref, dx_mag, dw_ref, dw_mag, db_ref, db_mag] = want;
        y_ref.resize(ny);
        y_mag.resize(ny);
        dx_ref.resize(nx);
        dx_mag.resize(nx);
        for (int64_t i = 0; i < B; ++i)
            for (int64_t n = 0; n < N; ++n) {
                double acc = bias_ ? b[n] : 0, mag = bias_ ? std::fabs(b[n]) : 0;
                for (int64_t k = 0; k < K; ++k) {
                    acc += double(x[i * K + k]) * dense_w[n * K + k];
                    mag += std::fabs(double(x[i * K + k]) * dense_w[n * K + k]);
                }
                y_ref[i * N + n] = acc;
                y_mag[i * N + n] = mag;
            }
        for (int64_t i = 0; i < B; ++i)
            for (int64_t k = 0; k < K; ++k) {
                double acc = 0, mag = 0;
                for (int64_t n = 0; n < N; ++n) {
                    acc += double(dy[i * N + n]) * dense_w[n * K + k];
                    mag += std::fabs(double(dy[i * N + n]) * dense_w[n * K + k]);
                }
                dx_ref[i * K + k] = acc;
                dx_mag[i * K + k] = mag;
            }
        dw_ref.resize(nw);
        dw_mag.resize(nw);
        const int64_t *rp = w.pattern.row_ptr();
        const int32_t *ci = w.pattern.col_idx();
        for (int64_t n = 0; n < N; ++n)
            for (int64_t e = rp[n]; e < rp[n + 1]; ++e) {
                double acc = 0, mag = 0;
                for (int64_t i = 0; i < B; ++i) {
                    acc += double(dy[i * N + n]) * x[i * K + ci[e]];
                    mag += std::fabs(double(dy[i * N + n]) * x[i * K + ci[e]]);
                }
                dw_ref[e] = acc;
                dw_mag[e] = mag;
            }
        db_ref.resize(static_cast<size_t>(N));
        db_mag.resize(static_cast<size_t>(N));
        for (int64_t n = 0; n < N; ++n)
            for (int64_t i = 0; i < B; ++i) {
                db_ref[n] += dy[i * N + n];
                db_mag[n] += std::fabs(dy[i * N + n]);
            }
        expect_step_matches_on_every_tier(layer, w, x, dy, b, o, want);
    }

private:
    int64_t batch_ = 4, in_ = 8, out_ = 8;
    double sparsity_ = 0.9;
    int threads_ = 2;
    bool bias_ = true;
    unsigned seed_ = 1;
    quant_scheme scheme_ = quant_scheme::f32;
    std::string implementation_;
    bool fused_ = false;
};

} // namespace qsp::test
