// Dispatch over the tiers, and the portable tier of the width plane packs.
// Planes with column phases (a horizontal stride) take the portable loop,
// one phase at a time (write_phased_row), except the AVX2 f32 pack's two.
#include "primitives/passes/width_planes.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "primitives/passes/pass_tiers.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::detail {

namespace {

// dst plane (n, c) from rows of the source: fill(row pointer, padded row)
// writes the whole padded row `row_len` long.
template <typename T, typename fill_t>
void for_planes(int64_t planes, const width_plane &plane, T *dst, int num_threads, fill_t fill) {
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t r = 0; r < plane.rows; ++r)
            fill(dst + p * plane.size() + r * plane.row_len(), p, r);
}

// Where the image columns go in each column phase of a padded row: phase ph
// holds padded columns ph + phases * j, image column x = ph + phases * j - left
// for j in [first[ph], end[ph]). Computed once per pass: three divisions per
// phase and row cost more than moving the row (S2, 28 columns: ~1.5 ms of a
// 23 ms forward).
struct phase_spans {
    std::vector<int64_t> first, end;
    phase_spans(const width_plane &plane, int64_t left, int64_t w)
        : first(static_cast<size_t>(plane.phases)), end(static_cast<size_t>(plane.phases)) {
        const int64_t s = plane.phases;
        for (int64_t ph = 0; ph < s; ++ph) {
            const int64_t lo = left - ph, hi = left + w - ph; // x >= 0, x < w
            const int64_t j1 = std::min(plane.phase_len, hi > 0 ? (hi + s - 1) / s : 0);
            end[static_cast<size_t>(ph)] = j1;
            first[static_cast<size_t>(ph)] = std::min(j1, lo > 0 ? (lo + s - 1) / s : 0);
        }
    }
};

// The padded row `row` of a plane with column phases: padded column c holds
// value(c - left) for image columns 0 <= c - left < w, `zero` elsewhere, at
// its phase position. Per phase a run of zeros, the image columns the phase
// takes, zeros (plane.at() per element, an integer division each, cost more
// than the kernel it fed).
template <typename T, typename value_t>
void write_phased_row(T *row, const width_plane &plane, const phase_spans &spans, int64_t left,
                      T zero, value_t value) {
    const int64_t s = plane.phases;
    for (int64_t ph = 0; ph < s; ++ph) {
        T *out = row + ph * plane.phase_len;
        const int64_t j0 = spans.first[static_cast<size_t>(ph)],
                      j1 = spans.end[static_cast<size_t>(ph)];
        std::fill(out, out + j0, zero);
        for (int64_t j = j0, x = ph + s * j0 - left; j < j1; ++j, x += s)
            out[j] = value(x);
        std::fill(out + j1, out + plane.phase_len, zero);
    }
}

template <typename T, typename U, typename convert_t>
void pack_rows(const U *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
               const spatial_pad &pad, const width_plane &plane, T *dst, T zero, int num_threads,
               convert_t convert) {
    const phase_spans spans(plane, pad.left, w);
    for_planes(batch * channels, plane, dst, num_threads, [&](T *row, int64_t p, int64_t r) {
        const int64_t y = r - pad.top;
        if (y < 0 || y >= h) {
            std::fill(row, row + plane.row_len(), zero);
            return;
        }
        const U *in = src + (p * h + y) * w;
        write_phased_row(row, plane, spans, pad.left, zero,
                         [&](int64_t x) { return convert(in[x]); });
    });
}

} // namespace

bool pack_width_planes(const float *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                       const spatial_pad &pad, const width_plane &plane, float *dst,
                       int num_threads) {
    static constexpr pass_tier<pack_width_planes_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_width_planes_avx512},
            {cpu_isa::avx2, pack_width_planes_avx2},
            {cpu_isa::ref, portable::pack_width_planes}};
    // two column phases (stride 2): AVX2's pack takes them, AVX-512's not
    static constexpr pass_tier<pack_width_planes_fn> two_phase_tiers[] = {
            {cpu_isa::avx2, pack_width_planes_avx2}, {cpu_isa::ref, portable::pack_width_planes}};
    pack_width_planes_fn *pack =
            plane.phases == 2 ? best_tier(two_phase_tiers) : best_tier(tiers, plane.phases == 1);
    return pack(src, batch, channels, h, w, pad, plane, dst, num_threads);
}

bool portable::pack_width_planes(const float *src, int64_t batch, int64_t channels, int64_t h,
                                 int64_t w, const spatial_pad &pad, const width_plane &plane,
                                 float *dst, int num_threads) {
    const int64_t planes = batch * channels, row_len = plane.row_len();
    const phase_spans spans(plane, pad.left, w);
    uint32_t seen = 0; // bit 31 set once an exponent field was all ones (NaN or Inf)
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static) reduction(| : seen)
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t r = 0; r < plane.rows; ++r) {
            float *row = dst + p * plane.size() + r * row_len;
            const int64_t y = r - pad.top;
            if (y < 0 || y >= h) {
                std::fill(row, row + row_len, 0.f);
                continue;
            }
            const float *in = src + (p * h + y) * w;
            if (plane.phases == 1) {
                std::fill(row, row + pad.left, 0.f);
                uint32_t s = 0;
                for (int64_t x = 0; x < w; ++x) {
                    uint32_t bits;
                    std::memcpy(&bits, in + x, 4);
                    s |= (bits & 0x7f800000u) + 0x00800000u; // carries into bit 31 iff all ones
                    row[pad.left + x] = in[x];
                }
                seen |= s;
                std::fill(row + pad.left + w, row + row_len, 0.f);
                continue;
            }
            uint32_t s = 0;
            write_phased_row(row, plane, spans, pad.left, 0.f, [&](int64_t x) {
                uint32_t bits;
                std::memcpy(&bits, in + x, 4);
                s |= (bits & 0x7f800000u) + 0x00800000u;
                return in[x];
            });
            seen |= s;
        }
    return (seen & 0x80000000u) == 0;
}

void pack_width_planes(const int8_t *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                       const spatial_pad &pad, const width_plane &plane, int8_t *dst,
                       int num_threads) {
    if (plane.phases != 1) {
        pack_rows(src, batch, channels, h, w, pad, plane, dst, int8_t(0), num_threads,
                  [](int8_t v) { return v; });
        return;
    }
    // Without column phases a row is zeros, the image row, zeros: three
    // block moves (the element loop above measured ~15 % of a C1 s8 step).
    const int64_t row_len = plane.row_len(), right = row_len - pad.left - w;
    for_planes(batch * channels, plane, dst, num_threads, [&](int8_t *row, int64_t p, int64_t r) {
        const int64_t y = r - pad.top;
        if (y < 0 || y >= h) {
            std::memset(row, 0, static_cast<size_t>(row_len));
            return;
        }
        std::memset(row, 0, static_cast<size_t>(pad.left));
        std::memcpy(row + pad.left, src + (p * h + y) * w, static_cast<size_t>(w));
        std::memset(row + pad.left + w, 0, static_cast<size_t>(right));
    });
}

void pack_width_quads(const int8_t *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                      const spatial_pad &pad, const width_plane &plane, uint32_t *dst,
                      int num_threads) {
    static constexpr pass_tier<pack_width_quads_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_width_quads_avx512},
            {cpu_isa::ref, portable::pack_width_quads}};
    best_tier(tiers, plane.phases <= 2)(src, batch, channels, h, w, pad, plane, dst, num_threads);
}

void pack_width_pairs(const int8_t *src, int64_t batch, int64_t channels, int64_t h, int64_t w,
                      const spatial_pad &pad, const width_plane &plane, uint32_t *dst,
                      int num_threads) {
    static constexpr pass_tier<pack_width_pairs_fn> tiers[] = {
            {cpu_isa::avx2, pack_width_pairs_avx2}, {cpu_isa::ref, portable::pack_width_pairs}};
    best_tier(tiers, plane.phases <= 2)(src, batch, channels, h, w, pad, plane, dst, num_threads);
}

void portable::pack_width_pairs(const int8_t *src, int64_t batch, int64_t channels, int64_t h,
                                int64_t w, const spatial_pad &pad, const width_plane &plane,
                                uint32_t *dst, int num_threads) {
    const int64_t pairs = (channels + 1) / 2, row_len = plane.row_len();
    constexpr uint32_t zero = 0x00800080u; // two x = 0 as u16 (x + 128)
    const phase_spans spans(plane, pad.left, w);
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * pairs; ++p)
        for (int64_t r = 0; r < plane.rows; ++r) {
            uint32_t *row = dst + p * plane.size() + r * row_len;
            const int64_t y = r - pad.top;
            if (y < 0 || y >= h) {
                std::fill(row, row + row_len, zero);
                continue;
            }
            const int64_t b = p / pairs, c = 2 * (p % pairs);
            const int8_t *lo = src + ((b * channels + c) * h + y) * w;
            const int8_t *hi = c + 1 < channels ? lo + h * w : nullptr; // a missing channel: 0
            auto word = [&](int64_t x) {
                return static_cast<uint32_t>(lo[x] + 128)
                       | static_cast<uint32_t>((hi ? hi[x] : 0) + 128) << 16;
            };
            if (plane.phases == 1 && hi) { // the common case, a loop the compiler vectorises
                std::fill(row, row + pad.left, zero);
                uint32_t *out = row + pad.left;
                for (int64_t x = 0; x < w; ++x)
                    out[x] = static_cast<uint32_t>(lo[x] + 128)
                             | static_cast<uint32_t>(hi[x] + 128) << 16;
                std::fill(out + w, row + row_len, zero);
                continue;
            }
            write_phased_row(row, plane, spans, pad.left, zero, word);
        }
}

void portable::pack_width_quads(const int8_t *src, int64_t batch, int64_t channels, int64_t h,
                                int64_t w, const spatial_pad &pad, const width_plane &plane,
                                uint32_t *dst, int num_threads) {
    const int64_t quads = (channels + 3) / 4, row_len = plane.row_len();
    constexpr uint32_t zero = 0x80808080u; // four x = 0 as u8 (x + 128)
    const phase_spans spans(plane, pad.left, w);
    static const int8_t zeros_row[1] = {0};
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * quads; ++p)
        for (int64_t r = 0; r < plane.rows; ++r) {
            uint32_t *row = dst + p * plane.size() + r * row_len;
            const int64_t y = r - pad.top;
            if (y < 0 || y >= h) {
                std::fill(row, row + row_len, zero);
                continue;
            }
            const int64_t b = p / quads, q = p % quads;
            // the 4 channel rows (a missing channel reads 0 from every column)
            const int8_t *in[4];
            int64_t step[4];
            for (int k = 0; k < 4; ++k) {
                const bool real = 4 * q + k < channels;
                in[k] = real ? src + ((b * channels + 4 * q + k) * h + y) * w : zeros_row;
                step[k] = real ? 1 : 0;
            }
            auto word = [&](int64_t x) {
                return (static_cast<uint32_t>(static_cast<uint8_t>(in[0][x * step[0]]))
                        | static_cast<uint32_t>(static_cast<uint8_t>(in[1][x * step[1]])) << 8
                        | static_cast<uint32_t>(static_cast<uint8_t>(in[2][x * step[2]])) << 16
                        | static_cast<uint32_t>(static_cast<uint8_t>(in[3][x * step[3]])) << 24)
                       ^ zero;
            };
            if (plane.phases == 1) {
                std::fill(row, row + pad.left, zero);
                for (int64_t x = 0; x < w; ++x)
                    row[pad.left + x] = word(x);
                std::fill(row + pad.left + w, row + row_len, zero);
                continue;
            }
            write_phased_row(row, plane, spans, pad.left, zero, word);
        }
}

void pack_width_dy_u8(const int8_t *g, int64_t batch, int64_t channels, int64_t h, int64_t w,
                      int64_t row_bytes, int64_t channel_bytes, uint8_t *dst, int num_threads) {
    static constexpr pass_tier<pack_width_dy_u8_fn> tiers[] = {
            {cpu_isa::avx512_core, pack_width_dy_u8_avx512},
            {cpu_isa::avx2, pack_width_dy_u8_avx2},
            {cpu_isa::ref, portable::pack_width_dy_u8}};
    best_tier(tiers)(g, batch, channels, h, w, row_bytes, channel_bytes, dst, num_threads);
}

void portable::pack_width_dy_u8(const int8_t *g, int64_t batch, int64_t channels, int64_t h,
                                int64_t w, int64_t row_bytes, int64_t channel_bytes, uint8_t *dst,
                                int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p) {
        uint8_t *plane = dst + p * channel_bytes;
        for (int64_t r = 0; r < h; ++r) {
            const int8_t *in = g + (p * h + r) * w;
            uint8_t *out = plane + r * row_bytes;
            for (int64_t x = 0; x < w; ++x)
                out[x] = static_cast<uint8_t>(in[x] + 128);
            std::memset(out + w, 0, static_cast<size_t>(row_bytes - w));
        }
        std::memset(plane + h * row_bytes, 0, static_cast<size_t>(channel_bytes - h * row_bytes));
    }
}

void interleave_width_phases(const width_phase_rows *phases, int64_t count, int64_t batch,
                             int64_t channels, int64_t n_h, int64_t h, int64_t w, int64_t h0,
                             int64_t sh, int64_t sw, float *out, int num_threads) {
    static constexpr pass_tier<interleave_width_phases_fn> tiers[] = {
            {cpu_isa::avx512_core, interleave_width_phases_avx512},
            {cpu_isa::avx2, interleave_width_phases_avx2},
            {cpu_isa::ref, portable::interleave_width_phases}};
    const bool even_odd = sw == 2 && count == 2 && phases[0].w0 + phases[1].w0 == 1;
    best_tier(tiers, even_odd)(phases, count, batch, channels, n_h, h, w, h0, sh, sw, out,
                               num_threads);
}

void portable::interleave_width_phases(const width_phase_rows *phases, int64_t count, int64_t batch,
                                       int64_t channels, int64_t n_h, int64_t h, int64_t w,
                                       int64_t h0, int64_t sh, int64_t sw, float *out,
                                       int num_threads) {
#pragma omp parallel for collapse(2) num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < batch * channels; ++p)
        for (int64_t a = 0; a < n_h; ++a) {
            float *row = out + (p * h + h0 + a * sh) * w;
            for (int64_t k = 0; k < count; ++k) {
                const width_phase_rows &f = phases[k];
                const float *in = f.values + (p * n_h + a) * f.n_w;
                float *o = row + f.w0;
                for (int64_t j = 0; j < f.n_w; ++j)
                    o[j * sw] = in[j];
            }
        }
}

void unflatten_width_rows(const float *flat, int64_t planes, int64_t n_h, int64_t n_w,
                          int64_t row_len, int64_t plane_stride, float *out, int num_threads) {
    static constexpr pass_tier<unflatten_width_rows_fn> tiers[] = {
            {cpu_isa::avx512_core, unflatten_width_rows_avx512},
            {cpu_isa::ref, portable::unflatten_width_rows}};
    best_tier(tiers)(flat, planes, n_h, n_w, row_len, plane_stride, out, num_threads);
}

void portable::unflatten_width_rows(const float *flat, int64_t planes, int64_t n_h, int64_t n_w,
                                    int64_t row_len, int64_t plane_stride, float *out,
                                    int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < planes; ++p)
        for (int64_t a = 0; a < n_h; ++a)
            std::memcpy(out + (p * n_h + a) * n_w, flat + p * plane_stride + a * row_len,
                        static_cast<size_t>(n_w) * sizeof(float));
}

} // namespace qsp::detail
