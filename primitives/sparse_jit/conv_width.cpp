#include "primitives/sparse_jit/conv_width.hpp"

#include <algorithm>
#include <array>

namespace qsp::detail {

int width_split::chunk_vectors(int64_t c) const {
    return static_cast<int>(std::min(chunk, vectors - c * chunk));
}

int width_split::tail(int64_t c) const {
    return c == chunks() - 1 ? static_cast<int>(width % lanes) : 0;
}

width_split split_width(int64_t width, int64_t lanes, int max_vectors) {
    width_split s;
    s.width = width;
    s.lanes = lanes;
    s.vectors = (width + lanes - 1) / lanes;
    // At most half the registers per row, so a step takes two rows or more;
    // chunks of equal size.
    const int64_t max_chunk = std::max(1, max_vectors / 2);
    const int64_t chunks = (s.vectors + max_chunk - 1) / max_chunk;
    s.chunk = (s.vectors + chunks - 1) / chunks;
    return s;
}

namespace {

int64_t round_up(int64_t v, int64_t align) {
    return (v + align - 1) / align * align;
}

} // namespace

width_plane conv_width::x_plane(int64_t read_lanes, int64_t align) const {
    width_plane p;
    p.rows = l.hp;
    p.phases = l.sw;
    const int64_t last_start = (l.kw - 1) * l.dw / l.sw; // the largest tap start in a phase
    p.phase_len = round_up(std::max((l.wp + l.sw - 1) / l.sw, last_start + read_lanes), align);
    return p;
}

width_plane conv_width::flat_x_plane(int64_t read_lanes) const {
    width_plane p;
    p.phase_len = l.wp;
    const int64_t reach = (l.kh - 1) * l.dh * l.wp + (l.kw - 1) * l.dw + read_lanes;
    p.rows = std::max(l.hp, (reach + l.wp - 1) / l.wp);
    return p;
}

int64_t conv_width::x_tap(const width_plane &plane, int64_t tap) const {
    return plane.at(tap / l.kw * l.dh, tap % l.kw * l.dw);
}

sparse_rows conv_width::forward_rows(const csr_pattern &p) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < l.out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const conv_layout::tap t = l.decode(ci[e]);
            const int64_t ic = l.group_of_out(oc) * l.icg + t.ic;
            triples.push_back({oc, key(ic, t.kh * l.kw + t.kw, taps), e});
        }
    return rows_from_triples(l.out_c, triples);
}

width_plane conv_width::dy_plane(const std::vector<int64_t> &read_lanes, int64_t align) const {
    width_plane p;
    p.rows = l.ohp;
    p.phases = 1;
    p.phase_len = l.owp;
    for (size_t i = 0; i < l.phases.size(); ++i) {
        const conv_layout::phase &f = l.phases[i];
        for (int64_t k = 0; k < l.kw; ++k) {
            int64_t m;
            if (conv_layout::tap_in_phase(f.pw, k, l.dw, l.sw, m))
                p.phase_len = std::max(p.phase_len, f.qw0 + m + l.dy_pad.left + read_lanes[i]);
        }
    }
    p.phase_len = round_up(p.phase_len, align);
    return p;
}

width_plane conv_width::flat_dy_plane(const conv_layout::phase &f, int64_t read_lanes) const {
    width_plane p;
    p.rows = l.ohp;
    p.phase_len = l.owp;
    int64_t reach = p.size();
    for (int64_t tap = 0; tap < taps; ++tap)
        reach = std::max(reach, dy_tap(p, f, tap) + read_lanes);
    p.rows = (reach + p.phase_len - 1) / p.phase_len;
    return p;
}

int64_t conv_width::dy_tap(const width_plane &plane, const conv_layout::phase &f,
                           int64_t tap) const {
    int64_t mh = 0, mw = 0;
    conv_layout::tap_in_phase(f.ph, tap / l.kw, l.dh, l.sh, mh);
    conv_layout::tap_in_phase(f.pw, tap % l.kw, l.dw, l.sw, mw);
    return plane.at(f.qh0 + mh + l.dy_pad.top, f.qw0 + mw + l.dy_pad.left);
}

sparse_rows conv_width::backward_data_rows(const csr_pattern &p,
                                           const conv_layout::phase &f) const {
    const int64_t *rp = p.row_ptr();
    const int32_t *ci = p.col_idx();
    std::vector<std::array<int64_t, 3>> triples;
    for (int64_t oc = 0; oc < l.out_c; ++oc)
        for (int64_t e = rp[oc]; e < rp[oc + 1]; ++e) {
            const conv_layout::tap t = l.decode(ci[e]);
            int64_t mh, mw;
            if (!conv_layout::tap_in_phase(f.ph, t.kh, l.dh, l.sh, mh)
                || !conv_layout::tap_in_phase(f.pw, t.kw, l.dw, l.sw, mw))
                continue;
            const int64_t ic = l.group_of_out(oc) * l.icg + t.ic;
            triples.push_back({ic, key(oc, t.kh * l.kw + t.kw, taps), e});
        }
    return rows_from_triples(l.in_c, triples);
}

} // namespace qsp::detail
