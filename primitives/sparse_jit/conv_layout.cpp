#include "primitives/sparse_jit/conv_layout.hpp"

#include <algorithm>
#include <array>
#include <numeric>

namespace qsp::detail {

namespace {

int64_t ceil_div4(int64_t n) {
    return (n + 3) / 4;
}

// Sorts each row's entries by key (rows built in another order).
void sort_rows(sparse_rows &m) {
    for (int64_t r = 0; r < m.rows; ++r) {
        const int64_t b = m.row_ptr[r], e = m.row_ptr[r + 1];
        std::vector<int64_t> order(static_cast<size_t>(e - b));
        std::iota(order.begin(), order.end(), b);
        std::sort(order.begin(), order.end(),
                  [&](int64_t x, int64_t y) { return m.key[x] < m.key[y]; });
        std::vector<int64_t> keys, values;
        for (int64_t i : order) {
            keys.push_back(m.key[i]);
            values.push_back(m.value_index[i]);
        }
        std::copy(keys.begin(), keys.end(), m.key.begin() + b);
        std::copy(values.begin(), values.end(), m.value_index.begin() + b);
    }
}

} // namespace

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
    return (ic * hp + t.kh * dh) * wp + t.kw * dw;
}

sparse_rows conv_layout::forward_rows(const csr_pattern &p, bool s8_quads) const {
    sparse_rows m = csr_rows(p.row_ptr(), p.col_idx(), p.rows());
    if (!s8_quads) return m;
    const int64_t ic4 = ceil_div4(in_c);
    for (int64_t oc = 0; oc < m.rows; ++oc)
        for (int64_t e = m.row_ptr[oc]; e < m.row_ptr[oc + 1]; ++e) {
            const tap t = decode(m.key[e]);
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            m.key[e] = ((t.kh * kw + t.kw) * ic4 + ic / 4) * 4 + ic % 4;
        }
    sort_rows(m);
    return m;
}

int64_t conv_layout::forward_quad_row(int64_t quad) const {
    const int64_t ic4 = ceil_div4(in_c), k = quad / ic4, c4 = quad % ic4;
    return (c4 * hp + (k / kw) * dh) * wp + (k % kw) * dw;
}

sparse_rows conv_layout::backward_data_rows(const csr_pattern &p, const phase &f,
                                            bool s8_quads) const {
    // Bucket the entries by absolute input channel, keep the phase's taps.
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    const int64_t oc4 = ceil_div4(out_c);
    std::vector<std::vector<std::pair<int64_t, int64_t>>> per_ic(static_cast<size_t>(in_c));
    for (int64_t oc = 0; oc < out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const tap t = decode(ci[e]);
            int64_t mh, mw;
            if (!tap_in_phase(f.ph, t.kh, dh, sh, mh) || !tap_in_phase(f.pw, t.kw, dw, sw, mw))
                continue;
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            const int64_t key = s8_quads ? ((t.kh * kw + t.kw) * oc4 + oc / 4) * 4 + oc % 4
                                         : (oc * kh + t.kh) * kw + t.kw;
            per_ic[ic].emplace_back(key, e);
        }
    sparse_rows m;
    for (auto &row : per_ic) {
        std::sort(row.begin(), row.end());
        for (const auto &[key, e] : row)
            m.add(key, e);
        m.end_row();
    }
    return m;
}

void conv_layout::decode_backward_key(int64_t key, bool s8_quads, int64_t &oc, int64_t &k_h,
                                      int64_t &k_w) const {
    if (s8_quads) {
        const int64_t oc4 = ceil_div4(out_c), quad = key / 4;
        oc = (quad % oc4) * 4 + key % 4;
        k_h = (quad / oc4) / kw;
        k_w = (quad / oc4) % kw;
    } else {
        oc = key / (kh * kw);
        k_h = (key / kw) % kh;
        k_w = key % kw;
    }
}

int64_t conv_layout::dy_row(const phase &f, int64_t oc, int64_t k_h, int64_t k_w) const {
    int64_t mh = 0, mw = 0;
    tap_in_phase(f.ph, k_h, dh, sh, mh);
    tap_in_phase(f.pw, k_w, dw, sw, mw);
    return (oc * ohp + f.qh0 + mh + dy_pad.top) * owp + f.qw0 + mw + dy_pad.left;
}

int64_t conv_layout::backward_data_quad_row(const phase &f, int64_t quad) const {
    int64_t oc, k_h, k_w;
    decode_backward_key(quad * 4, true, oc, k_h, k_w);
    return dy_row(f, oc / 4, k_h, k_w); // quad tiles: one row per 4 channels
}

namespace {

// Rows from (source row, key, value index) triples: rows in source-row
// order, keys ascending within each.
sparse_rows rows_from(int64_t rows, std::vector<std::array<int64_t, 3>> &triples) {
    std::sort(triples.begin(), triples.end());
    sparse_rows m;
    size_t t = 0;
    for (int64_t r = 0; r < rows; ++r) {
        for (; t < triples.size() && triples[t][0] == r; ++t)
            m.add(triples[t][1], triples[t][2]);
        m.end_row();
    }
    return m;
}

} // namespace

conv_layout::scatter_rows conv_layout::forward_scatter(const csr_pattern &p, bool s8_quads) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    const int64_t chans = s8_quads ? ceil_div4(in_c) : in_c, rows = chans * kh * kw;
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const tap t = decode(ci[e]);
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            const int64_t src = ((s8_quads ? ic / 4 : ic) * kh + t.kh) * kw + t.kw;
            triples.push_back({src, s8_quads ? oc * 4 + ic % 4 : oc, e});
        }
    scatter_rows out{rows_from(rows, triples), {}};
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r / (kh * kw), k_h = (r / kw) % kh, k_w = r % kw;
        out.src_row.push_back((c * hp + k_h * dh) * wp + k_w * dw);
    }
    return out;
}

conv_layout::scatter_rows conv_layout::backward_data_scatter(const csr_pattern &p, const phase &f,
                                                             bool s8_quads) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    const int64_t chans = s8_quads ? ceil_div4(out_c) : out_c, rows = chans * kh * kw;
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const tap t = decode(ci[e]);
            int64_t mh, mw;
            if (!tap_in_phase(f.ph, t.kh, dh, sh, mh) || !tap_in_phase(f.pw, t.kw, dw, sw, mw))
                continue;
            const int64_t ic = group_of_out(oc) * icg + t.ic;
            const int64_t src = ((s8_quads ? oc / 4 : oc) * kh + t.kh) * kw + t.kw;
            triples.push_back({src, s8_quads ? ic * 4 + oc % 4 : ic, e});
        }
    scatter_rows out{rows_from(rows, triples), {}};
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t c = r / (kh * kw), k_h = (r / kw) % kh, k_w = r % kw;
        out.src_row.push_back(dy_row(f, c, k_h, k_w)); // quads: one row per 4 channels
    }
    return out;
}

} // namespace qsp::detail
