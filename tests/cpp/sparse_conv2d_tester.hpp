// SparseConv2dTester: a training step of a sparse Conv2d (training_step.hpp)
// on every ISA tier the CPU has (only the full ISA when an implementation
// is forced): f32 against a naive dense direct convolution in double, s8 bit
// for bit against the reference implementation. Takes .scheme(),
// .implementation() and .fused() like the Linear tester.
#pragma once

#include <string>

#include "training_step.hpp"

namespace qsp::test {

class SparseConv2dTester {
public:
    SparseConv2dTester &batch(int64_t v) {
        n_ = v;
        return *this;
    }
    SparseConv2dTester &channels(int64_t in, int64_t out) {
        c_ = in;
        oc_ = out;
        return *this;
    }
    SparseConv2dTester &image(int64_t h, int64_t w) {
        h_ = h;
        w_ = w;
        return *this;
    }
    SparseConv2dTester &kernel(int64_t kh, int64_t kw) {
        g_.kernel_h = kh;
        g_.kernel_w = kw;
        return *this;
    }
    SparseConv2dTester &stride(int64_t sh, int64_t sw) {
        g_.stride_h = sh;
        g_.stride_w = sw;
        return *this;
    }
    SparseConv2dTester &padding(int64_t t, int64_t l, int64_t b, int64_t r) {
        g_.pad_top = t;
        g_.pad_left = l;
        g_.pad_bottom = b;
        g_.pad_right = r;
        return *this;
    }
    SparseConv2dTester &dilation(int64_t dh, int64_t dw) {
        g_.dilation_h = dh;
        g_.dilation_w = dw;
        return *this;
    }
    SparseConv2dTester &groups(int64_t g) {
        g_.groups = g;
        return *this;
    }
    SparseConv2dTester &sparsity(double v) {
        sparsity_ = v;
        return *this;
    }
    SparseConv2dTester &threads(int v) {
        threads_ = v;
        return *this;
    }
    SparseConv2dTester &seed(unsigned v) {
        seed_ = v;
        return *this;
    }
    SparseConv2dTester &scheme(quant_scheme v) {
        scheme_ = v;
        return *this;
    }
    SparseConv2dTester &implementation(const std::string &v) {
        implementation_ = v;
        return *this;
    }
    SparseConv2dTester &fused(bool v) {
        fused_ = v;
        return *this;
    }

    std::string describe() const {
        return "N=" + std::to_string(n_) + " C=" + std::to_string(c_) + " OC=" + std::to_string(oc_)
               + " HxW=" + std::to_string(h_) + "x" + std::to_string(w_)
               + " k=" + std::to_string(g_.kernel_h) + "x" + std::to_string(g_.kernel_w)
               + " s=" + std::to_string(g_.stride_h) + "," + std::to_string(g_.stride_w)
               + " p=" + std::to_string(g_.pad_top) + "," + std::to_string(g_.pad_left) + ","
               + std::to_string(g_.pad_bottom) + "," + std::to_string(g_.pad_right)
               + " d=" + std::to_string(g_.dilation_h) + "," + std::to_string(g_.dilation_w)
               + " g=" + std::to_string(g_.groups) + " sparsity=" + std::to_string(sparsity_) + " "
               + to_string(scheme_) + " " + implementation_ + (fused_ ? " fused" : "");
    }

    void Test() const {
        SCOPED_TRACE(describe());
        std::mt19937 rng(seed_);
        const int64_t G = g_.groups, icg = c_ / G, ocg = oc_ / G, KH = g_.kernel_h,
                      KW = g_.kernel_w;
        const int64_t OH =
                (h_ + g_.pad_top + g_.pad_bottom - g_.dilation_h * (KH - 1) - 1) / g_.stride_h + 1;
        const int64_t OW =
                (w_ + g_.pad_left + g_.pad_right - g_.dilation_w * (KW - 1) - 1) / g_.stride_w + 1;
        const int64_t cols = icg * KH * KW;
        auto dense_w = random_sparse_dense(oc_, cols, sparsity_, rng);
        auto w = csr_weights::from_dense(dense_w.data(), oc_, cols);
        auto x = random_vector(static_cast<size_t>(n_ * c_ * h_ * w_), rng);
        auto dy = random_vector(static_cast<size_t>(n_ * oc_ * OH * OW), rng);
        auto b = random_vector(static_cast<size_t>(oc_), rng);

        const conv2d_layer layer{n_, c_, oc_, h_, w_, g_};
        step_options o;
        o.scheme = scheme_;
        o.implementation = implementation_;
        o.fused = fused_;
        o.threads = threads_;
        if (scheme_ == quant_scheme::s8) { // against the reference: no oracle needed
            expect_step_matches_on_every_tier(layer, w, x, dy, b, o, f32_oracle{});
            return;
        }
        // Naive dense direct convolution and its two gradients, in double.
        f32_oracle want;
        auto &[y_ref, y_mag, dx_ref, dx_mag, dw_ref, dw_mag, db_ref, db_mag] = want;
        y_ref.resize(dy.size());
        y_mag.resize(dy.size());
        dx_ref.resize(x.size());
        dx_mag.resize(x.size());
        std::vector<double> dwd(dense_w.size()), dwd_mag(dense_w.size());
        db_ref.resize(b.size());
        db_mag.resize(b.size());
        for (int64_t n = 0; n < n_; ++n)
            for (int64_t oc = 0; oc < oc_; ++oc)
                for (int64_t oh = 0; oh < OH; ++oh)
                    for (int64_t ow = 0; ow < OW; ++ow) {
                        const size_t yi = static_cast<size_t>(((n * oc_ + oc) * OH + oh) * OW + ow);
                        double acc = b[oc], mag = std::fabs(b[oc]);
                        db_ref[oc] += dy[yi];
                        db_mag[oc] += std::fabs(dy[yi]);
                        for (int64_t ic = 0; ic < icg; ++ic)
                            for (int64_t kh = 0; kh < KH; ++kh)
                                for (int64_t kw = 0; kw < KW; ++kw) {
                                    const int64_t ih =
                                            oh * g_.stride_h - g_.pad_top + kh * g_.dilation_h;
                                    const int64_t iw =
                                            ow * g_.stride_w - g_.pad_left + kw * g_.dilation_w;
                                    if (ih < 0 || ih >= h_ || iw < 0 || iw >= w_) continue;
                                    const size_t xi = static_cast<size_t>(
                                            ((n * c_ + (oc / ocg) * icg + ic) * h_ + ih) * w_ + iw);
                                    const size_t wi = static_cast<size_t>(
                                            oc * cols + (ic * KH + kh) * KW + kw);
                                    acc += double(x[xi]) * dense_w[wi];
                                    mag += std::fabs(double(x[xi]) * dense_w[wi]);
                                    dx_ref[xi] += double(dy[yi]) * dense_w[wi];
                                    dx_mag[xi] += std::fabs(double(dy[yi]) * dense_w[wi]);
                                    dwd[wi] += double(dy[yi]) * x[xi];
                                    dwd_mag[wi] += std::fabs(double(dy[yi]) * x[xi]);
                                }
                        y_ref[yi] = acc;
                        y_mag[yi] = mag;
                    }
        dw_ref.resize(w.values.size());
        dw_mag.resize(w.values.size());
        const int64_t *rp = w.pattern.row_ptr();
        const int32_t *ci = w.pattern.col_idx();
        for (int64_t r = 0; r < oc_; ++r)
            for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
                dw_ref[e] = dwd[r * cols + ci[e]];
                dw_mag[e] = dwd_mag[r * cols + ci[e]];
            }
        expect_step_matches_on_every_tier(layer, w, x, dy, b, o, want);
    }

private:
    int64_t n_ = 2, c_ = 3, oc_ = 4, h_ = 7, w_ = 7;
    conv2d_geometry g_{3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    double sparsity_ = 0.5;
    int threads_ = 2;
    unsigned seed_ = 3;
    quant_scheme scheme_ = quant_scheme::f32;
    std::string implementation_;
    bool fused_ = false;
};

} // namespace qsp::test
