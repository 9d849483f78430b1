#include "primitives/sparse_jit/conv_layout.hpp"

#include <algorithm>
#include <array>

namespace qsp::detail {

bool conv_layout::tap_in_phase(int64_t p, int64_t k, int64_t d, int64_t s, int64_t &m) {
    const int64_t diff = p - k * d;
    if (diff % s != 0) return false;
    m = diff / s; // exact: truncation is harmless
    return true;
}

conv_layout::conv_layout(const conv2d_shape &s)
    : in_c(s.in_c), in_h(s.in_h), in_w(s.in_w), out_c(s.out_c), out_h(s.out_h), out_w(s.out_w),
      kh(s.g.kernel_h), kw(s.g.kernel_w), sh(s.g.stride_h), sw(s.g.stride_w), dh(s.g.dilation_h),
      dw(s.g.dilation_w), groups(s.g.groups), icg(s.in_c / s.g.groups), ocg(s.out_c / s.g.groups) {
    x_pad = spatial_pad{s.g.pad_top, s.g.pad_bottom, s.g.pad_left, s.g.pad_right};
    hp = in_h + x_pad.top + x_pad.bottom;
    wp = in_w + x_pad.left + x_pad.right;
    // Stride phases of the real input positions.
    auto first_of = [](int64_t pad, int64_t p, int64_t stride) {
        return pad
               + ((p - pad) % stride + stride)
                         % stride; // first padded coord >= pad, = p mod stride
    };
    for (int64_t ph = 0; ph < sh; ++ph)
        for (int64_t pw = 0; pw < sw; ++pw) {
            const int64_t fh = first_of(x_pad.top, ph, sh), fw = first_of(x_pad.left, pw, sw);
            if (fh >= x_pad.top + in_h || fw >= x_pad.left + in_w) continue;
            phase f;
            f.ph = ph;
            f.pw = pw;
            f.ih0 = fh - x_pad.top;
            f.iw0 = fw - x_pad.left;
            f.n_h = (x_pad.top + in_h - 1 - fh) / sh + 1;
            f.n_w = (x_pad.left + in_w - 1 - fw) / sw + 1;
            f.qh0 = (fh - ph) / sh;
            f.qw0 = (fw - pw) / sw;
            phases.push_back(f);
        }
    // dY padding: every tap of every phase reads inside the padded dY.
    int64_t top = 0, bottom = 0, left = 0, right = 0;
    for (const phase &f : phases) {
        for (int64_t k = 0; k < kh; ++k) {
            int64_t m;
            if (!tap_in_phase(f.ph, k, dh, sh, m)) continue;
            top = std::max(top, -(f.qh0 + m));
            bottom = std::max(bottom, f.qh0 + f.n_h - 1 + m - (out_h - 1));
        }
        for (int64_t k = 0; k < kw; ++k) {
            int64_t m;
            if (!tap_in_phase(f.pw, k, dw, sw, m)) continue;
            left = std::max(left, -(f.qw0 + m));
            right = std::max(right, f.qw0 + f.n_w - 1 + m - (out_w - 1));
        }
    }
    dy_pad = spatial_pad{top, bottom, left, right};
    ohp = out_h + top + bottom;
    owp = out_w + left + right;
}

int64_t conv_layout::x_row(int64_t oc, int64_t col) const {
    const tap t = decode(col);
    const int64_t ic = group_of_out(oc) * icg + t.ic;
    return (t.kh * dh * wp + t.kw * dw) * in_c + ic;
}

sparse_rows conv_layout::forward_rows(const csr_pattern &p) const {
    return csr_rows(p.row_ptr(), p.col_idx(), p.rows());
}

int64_t conv_layout::dy_row(const phase &f, int64_t c, int64_t channels, int64_t k_h,
                            int64_t k_w) const {
    int64_t mh = 0, mw = 0;
    tap_in_phase(f.ph, k_h, dh, sh, mh);
    tap_in_phase(f.pw, k_w, dw, sw, mw);
    return ((f.qh0 + mh + dy_pad.top) * owp + f.qw0 + mw + dy_pad.left) * channels + c;
}

conv_layout::scatter_rows conv_layout::forward_scatter(const csr_pattern &p, int per_word) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    const int64_t chans = (in_c + per_word - 1) / per_word, rows = chans * kh * kw;
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const tap t = decode(ci[e]);
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            const int64_t src = ((ic / per_word) * kh + t.kh) * kw + t.kw;
            triples.push_back({src, oc * per_word + ic % per_word, e});
        }
    scatter_rows out{rows_from_triples(rows, triples), {}};
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r / (kh * kw), k_h = (r / kw) % kh, k_w = r % kw;
        out.src_row.push_back((k_h * dh * wp + k_w * dw) * chans + c);
    }
    return out;
}

conv_layout::scatter_rows conv_layout::backward_data_scatter(const csr_pattern &p, const phase &f,
                                                             int per_word) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    const int64_t chans = (out_c + per_word - 1) / per_word, rows = chans * kh * kw;
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const tap t = decode(ci[e]);
            int64_t mh, mw;
            if (!tap_in_phase(f.ph, t.kh, dh, sh, mh) || !tap_in_phase(f.pw, t.kw, dw, sw, mw))
                continue;
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            const int64_t src = ((oc / per_word) * kh + t.kh) * kw + t.kw;
            triples.push_back({src, ic * per_word + oc % per_word, e});
        }
    scatter_rows out{rows_from_triples(rows, triples), {}};
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r / (kh * kw), k_h = (r / kw) % kh, k_w = r % kw;
        out.src_row.push_back(dy_row(f, c, chans, k_h, k_w)); // a row per word of channels
    }
    return out;
}

} // namespace qsp::detail
