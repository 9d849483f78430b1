// The layout and quantization passes: every vector tier the CPU has against
// the portable tier, bit for bit, over odd sizes, all-zero and non-finite
// tensors. (Under an emulated AVX2-only CPU the AVX2 tier is what runs.)
#include <cstring>
#include <functional>

#include "jit/tile_abi.hpp"
#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/tile_layout.hpp"
#include "primitives/passes/width_planes.hpp"
#include "test_utils.hpp"

namespace qsp::test {

namespace {

bool cpu_has(cpu_isa isa) {
    return detected_cpu_isa() >= isa;
}

void expect_same_bits(float a, float b, const char *what) {
    EXPECT_EQ(std::memcmp(&a, &b, sizeof(float)), 0) << what << ": " << a << " vs " << b;
}

// A pass's tiers this CPU runs, by name: the dispatched one, the portable
// one (where given), then AVX2 and AVX-512 where the CPU has them.
template <typename fn_t>
std::vector<std::pair<const char *, fn_t *>> runnable_tiers(fn_t *dispatched, fn_t *portable,
                                                            fn_t *avx2, fn_t *avx512) {
    std::vector<std::pair<const char *, fn_t *>> tiers{{"dispatched", dispatched}};
    if (portable) tiers.push_back({"portable", portable});
    if (cpu_has(cpu_isa::avx2)) tiers.push_back({"avx2", avx2});
    if (cpu_has(cpu_isa::avx512_core)) tiers.push_back({"avx512", avx512});
    return tiers;
}

} // namespace

// The lanes of each tile row that the kernels read (tile_lanes): equal.
void expect_same_read_lanes(const std::vector<float> &got, const std::vector<float> &want,
                            int64_t batch, int64_t rows_per_tile, const char *what) {
    ASSERT_EQ(got.size(), want.size());
    for (int64_t t = 0; t < jit::tile_count(batch); ++t)
        for (int64_t r = 0; r < rows_per_tile; ++r)
            for (int64_t j = 0; j < detail::tile_lanes(batch, t); ++j) {
                const size_t i = static_cast<size_t>((t * rows_per_tile + r) * jit::tile_batch + j);
                ASSERT_EQ(got[i], want[i])
                        << what << ": tile " << t << " row " << r << " lane " << j;
            }
}

TEST(Passes, f32_tile_layout_tiers_match_portable) {
    std::mt19937 rng(4);
    for (int64_t batch : {1, 7, 15, 16, 17, 33, 63, 64, 65, 130})
        for (int64_t channels : {1, 3, 8, 9, 16, 17, 40}) {
            SCOPED_TRACE(std::to_string(batch) + "x" + std::to_string(channels));
            auto src = random_vector(static_cast<size_t>(batch * channels), rng);
            auto bias = random_vector(static_cast<size_t>(channels), rng);
            const auto n = static_cast<size_t>(jit::tiled_elems(batch, channels));
            std::vector<float> want(n, 9.f), want_out(src.size(), 2.f);
            detail::portable::pack_tiles(src.data(), batch, channels, want.data(), 2);
            detail::portable::unpack_tiles(want.data(), batch, channels, bias.data(),
                                           want_out.data(), 3, 1);
            std::vector<float> round_trip(src.size());
            detail::portable::unpack_tiles(want.data(), batch, channels, nullptr, round_trip.data(),
                                           1, 1);
            EXPECT_EQ(round_trip, src);
            // bias per group of `inner` channels (Conv2d: per output channel)
            std::vector<float> inner_out(src.size()), inner_want(src.size());
            detail::portable::unpack_tiles(want.data(), batch, channels, bias.data(),
                                           inner_want.data(), 1, 4);
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t c = 0; c < channels; ++c)
                    ASSERT_EQ(inner_want[b * channels + c], src[b * channels + c] + bias[c / 4]);
            struct tier {
                cpu_isa isa;
                detail::pack_tiles_fn *pack;
                detail::unpack_tiles_fn *unpack;
            };
            for (const tier &t :
                 {tier{cpu_isa::avx2, detail::pack_tiles_avx2, detail::unpack_tiles_avx2},
                  tier{cpu_isa::avx512_core, detail::pack_tiles_avx512,
                       detail::unpack_tiles_avx512}}) {
                if (!cpu_has(t.isa)) continue;
                SCOPED_TRACE(to_string(t.isa));
                std::vector<float> got(n, 7.f), got_out(src.size(), 1.f);
                t.pack(src.data(), batch, channels, got.data(), 2);
                expect_same_read_lanes(got, want, batch, channels, "pack");
                t.unpack(want.data(), batch, channels, bias.data(), got_out.data(), 3, 1);
                EXPECT_EQ(got_out, want_out);
                t.unpack(want.data(), batch, channels, bias.data(), inner_out.data(), 2, 4);
                EXPECT_EQ(inner_out, inner_want);
            }
        }
}

TEST(Passes, quantization_tiers_match_portable) {
    std::mt19937 rng(21);
    // Without a multiplier the passes walk blocks of 4096: several blocks,
    // a partial last vector, the noise indexed across them.
    {
        const int64_t n = 3 * 4096 + 13;
        auto x = random_vector(static_cast<size_t>(n), rng, -2.f, 3.f);
        std::vector<int8_t> want(n), got(n);
        const float s = detail::portable::quantize_stochastic(x.data(), n, nullptr, 1, 1, 5,
                                                              want.data(), 2);
        if (cpu_has(cpu_isa::avx2)) {
            expect_same_bits(
                    detail::quantize_stochastic_avx2(x.data(), n, nullptr, 1, 1, 5, got.data(), 3),
                    s, "avx2 stochastic, no multiplier");
            EXPECT_EQ(got, want);
        }
        if (cpu_has(cpu_isa::avx512_core)) {
            expect_same_bits(detail::quantize_stochastic_avx512(x.data(), n, nullptr, 1, 1, 5,
                                                                got.data(), 3),
                             s, "avx512 stochastic, no multiplier");
            EXPECT_EQ(got, want);
        }
    }
    for (int64_t rows : {1, 3, 17})
        for (int64_t cols : {1, 7, 8, 15, 16, 33, 100}) {
            SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
            for (int variant = 0; variant < 4; ++variant) {
                auto x = random_vector(static_cast<size_t>(rows * cols), rng, -2.f, 3.f);
                if (variant == 1) std::fill(x.begin(), x.end(), 0.f);
                if (variant == 2) x[x.size() / 2] = std::nanf("");
                if (variant == 3) x[0] = INFINITY;
                auto mult = random_vector(static_cast<size_t>(cols), rng, 0.1f, 2.f);
                const int64_t n = rows * cols;
                const bool finite = variant < 2;
                std::vector<int8_t> want_rne(n), want_sr(n);
                const float s_rne =
                        detail::portable::quantize_rne(x.data(), n, want_rne.data(), nullptr, 2);
                // max |x| given (as a writer of x finds it): the same scale and
                // integers on every tier, the pass finding it skipped
                const float known = detail::portable::abs_max(x.data(), n);
                for (auto *tier : {detail::quantize_rne, detail::portable::quantize_rne}) {
                    std::vector<int8_t> got(n, 5);
                    expect_same_bits(tier(x.data(), n, got.data(), &known, 3), s_rne,
                                     "rne scale, maximum given");
                    EXPECT_EQ(got, want_rne);
                    // and used: twice the maximum, half the integers' range
                    const float doubled = 2 * known;
                    tier(x.data(), n, got.data(), &doubled, 2);
                    for (int8_t v : got)
                        if (finite) ASSERT_LE(std::abs(static_cast<int>(v)), 64);
                }
                const float s_sr = detail::portable::quantize_stochastic(
                        x.data(), n, mult.data(), cols, 1, 99, want_sr.data(), 1);
                // Conv2d's layout: one multiplier per plane of `cols` (3 channels)
                auto mult_planes = random_vector(3, rng, 0.1f, 2.f);
                std::vector<int8_t> want_planes(n);
                const float s_planes = detail::portable::quantize_stochastic(
                        x.data(), n, mult_planes.data(), 3, cols, 77, want_planes.data(), 2);
                if (cols > 1 && cpu_has(cpu_isa::avx2)) {
                    std::vector<int8_t> got(n);
                    expect_same_bits(detail::quantize_stochastic_avx2(x.data(), n,
                                                                      mult_planes.data(), 3, cols,
                                                                      77, got.data(), 3),
                                     s_planes, "avx2 per-plane scale");
                    if (finite) EXPECT_EQ(got, want_planes);
                }
                if (cols > 1 && cpu_has(cpu_isa::avx512_core)) {
                    std::vector<int8_t> got(n);
                    expect_same_bits(detail::quantize_stochastic_avx512(x.data(), n,
                                                                        mult_planes.data(), 3, cols,
                                                                        77, got.data(), 3),
                                     s_planes, "avx512 per-plane scale");
                    if (finite) EXPECT_EQ(got, want_planes);
                }
                // a vector tier of quantize_weights (rows only) against the portable one
                auto expect_weights_match = [&](auto tier) {
                    auto dense = random_sparse_dense(rows, cols, 0.5, rng);
                    auto w = csr_weights::from_dense(dense.data(), rows, cols);
                    std::vector<int8_t> qa(w.values.size() + 1), qb(w.values.size() + 1);
                    std::vector<float> wa(rows), wb(rows);
                    tier(w.pattern.row_ptr(), rows, w.values.data(), qa.data(), wa.data(), 2);
                    detail::portable::quantize_weights(w.pattern, w.values.data(), qb.data(),
                                                       wb.data(), 2);
                    EXPECT_EQ(qa, qb);
                    EXPECT_EQ(std::memcmp(wa.data(), wb.data(), 4 * rows), 0);
                };
                if (cpu_has(cpu_isa::avx2)) {
                    std::vector<int8_t> got(n);
                    expect_same_bits(detail::quantize_rne_avx2(x.data(), n, got.data(), &known, 2),
                                     s_rne, "avx2 rne scale");
                    if (finite) EXPECT_EQ(got, want_rne);
                    expect_same_bits(detail::quantize_stochastic_avx2(x.data(), n, mult.data(),
                                                                      cols, 1, 99, got.data(), 3),
                                     s_sr, "avx2 stochastic scale");
                    if (finite) EXPECT_EQ(got, want_sr);
                    expect_weights_match(detail::quantize_weights_avx2);
                }
                if (cpu_has(cpu_isa::avx512_core)) {
                    std::vector<int8_t> got(n);
                    expect_same_bits(
                            detail::quantize_rne_avx512(x.data(), n, got.data(), nullptr, 2), s_rne,
                            "avx512 rne scale");
                    if (finite) EXPECT_EQ(got, want_rne);
                    expect_same_bits(detail::quantize_stochastic_avx512(x.data(), n, mult.data(),
                                                                        cols, 1, 99, got.data(), 3),
                                     s_sr, "avx512 stochastic scale");
                    if (finite) EXPECT_EQ(got, want_sr);
                    expect_weights_match(detail::quantize_weights_avx512);
                }
            }
        }
}

// The s8 backward's two roundings of dY in one pass: the integers and scales
// of the two separate calls (the statement), both multiplier layouts and
// none, zero / NaN / Inf tensors, on the vector tiers and the dispatcher;
// rows of whole vectors, tails, and tensors past one 4096-element block;
// with the maxima found by the pass or given from per-channel maxima.
TEST(Passes, stochastic_pair_matches_two_quantizations) {
    std::mt19937 rng(33);
    for (int64_t rows : {1, 3, 17})
        for (int64_t cols : {1, 7, 8, 15, 16, 33, 4099}) {
            SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
            const int64_t n = rows * cols;
            for (int variant = 0; variant < 4; ++variant) {
                auto x = random_vector(static_cast<size_t>(n), rng, -2.f, 3.f);
                if (variant == 1) std::fill(x.begin(), x.end(), 0.f);
                if (variant == 2) x[x.size() / 2] = std::nanf("");
                if (variant == 3) x[0] = -INFINITY;
                const auto mult_cols = random_vector(static_cast<size_t>(cols), rng, 0.1f, 2.f);
                const auto mult_planes = random_vector(3, rng, 0.1f, 2.f);
                struct layout {
                    const float *mult;
                    int64_t channels, inner;
                };
                for (layout l : {layout{mult_cols.data(), cols, 1},
                                 layout{mult_planes.data(), 3, cols}, layout{nullptr, 1, 1}}) {
                    SCOPED_TRACE(l.mult == nullptr ? "no multiplier"
                                 : l.inner == 1    ? "multiplier per column"
                                                   : "multiplier per plane");
                    // keys sharing one hash (bit 0 apart, as a training step's
                    // two streams; either half for either copy) and keys not
                    const std::pair<uint32_t, uint32_t> keys[] = {{5, 4}, {4, 5}, {5, 6}};
                    for (const auto [key, plain_key] : keys) {
                        SCOPED_TRACE("keys " + std::to_string(key) + ", "
                                     + std::to_string(plain_key));
                        std::vector<int8_t> want(n), want_plain(n);
                        const float s = detail::portable::quantize_stochastic(
                                x.data(), n, l.mult, l.channels, l.inner, key, want.data(), 1);
                        const float s_plain = detail::portable::quantize_stochastic(
                                x.data(), n, nullptr, 1, 1, plain_key, want_plain.data(), 2);
                        std::vector<detail::quantize_stochastic_pair_fn *> tiers{
                                detail::quantize_stochastic_pair,
                                detail::portable::quantize_stochastic_pair};
                        if (cpu_has(cpu_isa::avx2) && cols > 1)
                            tiers.push_back(detail::quantize_stochastic_pair_avx2);
                        if (cpu_has(cpu_isa::avx512_core) && cols > 1)
                            tiers.push_back(detail::quantize_stochastic_pair_avx512);
                        // the maxima as a writer of x finds them: per channel of the
                        // multiplier's layout (one channel without a multiplier)
                        std::vector<float> channel_max(static_cast<size_t>(l.channels), 0.f);
                        for (int64_t i = 0; i < n; ++i) {
                            float &m = channel_max[static_cast<size_t>((i / l.inner) % l.channels)];
                            m = std::isnan(m) || std::isnan(x[i]) ? NAN
                                                                  : std::max(m, std::fabs(x[i]));
                        }
                        detail::stochastic_maxima known{};
                        ASSERT_TRUE(detail::pair_maxima_from_channels(channel_max.data(), l.mult,
                                                                      l.channels, known));
                        for (auto *tier : tiers)
                            for (const detail::stochastic_maxima *given :
                                 {static_cast<const detail::stochastic_maxima *>(nullptr),
                                  static_cast<const detail::stochastic_maxima *>(&known)}) {
                                SCOPED_TRACE(given ? "maxima given" : "maxima found");
                                std::vector<int8_t> got(n, 9), got_plain(n, 9);
                                const auto scales =
                                        tier(x.data(), n, l.mult, l.channels, l.inner, key,
                                             got.data(), plain_key, got_plain.data(), given, 3);
                                expect_same_bits(scales.scaled, s, "scaled");
                                expect_same_bits(scales.plain, s_plain, "plain");
                                EXPECT_EQ(got, want);
                                EXPECT_EQ(got_plain, want_plain);
                            }
                        // the plain rounding alone from its maximum (a backward-weights
                        // alone given its gradient's channel maxima): every tier
                        if (!l.mult) {
                            std::vector<detail::quantize_stochastic_plain_from_max_fn *> plain{
                                    detail::quantize_stochastic_plain_from_max,
                                    detail::portable::quantize_stochastic_plain_from_max};
                            if (cpu_has(cpu_isa::avx2))
                                plain.push_back(detail::quantize_stochastic_plain_from_max_avx2);
                            if (cpu_has(cpu_isa::avx512_core))
                                plain.push_back(detail::quantize_stochastic_plain_from_max_avx512);
                            for (auto *tier : plain) {
                                std::vector<int8_t> got(n, 9);
                                expect_same_bits(
                                        tier(x.data(), n, plain_key, known.plain, got.data(), 3),
                                        s_plain, "plain from its maximum");
                                EXPECT_EQ(got, want_plain);
                            }
                        }
                        // given maxima are used, not found again: twice the true
                        // ones halve the integers' range
                        const detail::stochastic_maxima doubled{2 * known.scaled, 2 * known.plain};
                        if (variant == 0) {
                            std::vector<int8_t> got(n), got_plain(n);
                            detail::quantize_stochastic_pair(x.data(), n, l.mult, l.channels,
                                                             l.inner, 5, got.data(), 6,
                                                             got_plain.data(), &doubled, 2);
                            int peak = 0;
                            for (int8_t v : got_plain)
                                peak = std::max(peak, std::abs(static_cast<int>(v)));
                            EXPECT_LE(peak, 64);
                        }
                    }
                }
            }
        }
}

// Channel maxima give the pair's maxima, except through an infinite
// multiplier (0 * inf is NaN for a zero element, not for its channel's
// maximum).
TEST(Passes, pair_maxima_from_channel_maxima) {
    const float channel_max[3] = {1.f, 2.f, 0.f};
    detail::stochastic_maxima m{};
    const float mult[3] = {0.5f, 3.f, 7.f};
    ASSERT_TRUE(detail::pair_maxima_from_channels(channel_max, mult, 3, m));
    EXPECT_EQ(m.scaled, 6.f);
    EXPECT_EQ(m.plain, 2.f);
    ASSERT_TRUE(detail::pair_maxima_from_channels(channel_max, nullptr, 3, m));
    EXPECT_EQ(m.scaled, 2.f);
    const float with_nan[3] = {1.f, NAN, 0.f};
    ASSERT_TRUE(detail::pair_maxima_from_channels(with_nan, mult, 3, m));
    EXPECT_TRUE(std::isnan(m.scaled) && std::isnan(m.plain));
    const float infinite[3] = {0.5f, INFINITY, 1.f};
    EXPECT_FALSE(detail::pair_maxima_from_channels(channel_max, infinite, 3, m));
}

// The vector tiers add columns in int16 lanes for up to 256 rows at a time:
// 600 rows of -128 and of 127 (sums -76800 and 76200) reach past int16 in
// every block but the last, and each tier must widen in time.
TEST(Passes, column_sums_s8_past_int16) {
    const int64_t batch = 600;
    for (int64_t channels : {1, 63, 64, 65, 130, 200})
        for (int8_t v : {int8_t(-128), int8_t(127)}) {
            SCOPED_TRACE(std::to_string(channels) + " columns of " + std::to_string(v));
            std::vector<int8_t> x(static_cast<size_t>(batch * channels), v);
            const std::vector<int32_t> want(channels, static_cast<int32_t>(batch * v));
            const auto tiers = runnable_tiers<detail::column_sums_s8_fn>(
                    detail::column_sums_s8, detail::portable::column_sums_s8,
                    detail::column_sums_s8_avx2, detail::column_sums_s8_avx512);
            for (auto [name, tier] : tiers)
                for (int threads : {1, 3}) {
                    std::vector<int32_t> sums(channels, 5);
                    tier(x.data(), batch, channels, sums.data(), threads);
                    EXPECT_EQ(sums, want) << name << ", " << threads << " threads";
                }
        }
}

TEST(Passes, s8_tile_passes_match_portable) {
    std::mt19937 rng(5);
    for (int64_t batch : {1, 15, 16, 17, 64, 65, 130})
        for (int64_t channels : {1, 3, 4, 5, 16, 17, 63, 64, 65, 100}) {
            SCOPED_TRACE(std::to_string(batch) + "x" + std::to_string(channels));
            const int64_t n = batch * channels, tiles = jit::tile_count(batch);
            std::vector<int8_t> xq(static_cast<size_t>(n));
            for (auto &v : xq)
                v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            auto x = random_vector(static_cast<size_t>(n), rng);
            std::vector<int32_t> sums(channels), want_sums(channels);
            detail::portable::column_sums_s8(xq.data(), batch, channels, want_sums.data(), 2);
            detail::column_sums_s8(xq.data(), batch, channels, sums.data(), 3);
            EXPECT_EQ(sums, want_sums);
            if (cpu_has(cpu_isa::avx2)) {
                std::fill(sums.begin(), sums.end(), -1);
                detail::column_sums_s8_avx2(xq.data(), batch, channels, sums.data(), 3);
                EXPECT_EQ(sums, want_sums) << "avx2";
            }
            if (cpu_has(cpu_isa::avx512_core)) {
                std::fill(sums.begin(), sums.end(), -1);
                detail::column_sums_s8_avx512(xq.data(), batch, channels, sums.data(), 3);
                EXPECT_EQ(sums, want_sums) << "avx512";
            }
            for (int64_t c = 0; c < channels; ++c) {
                int32_t s = 0;
                for (int64_t b = 0; b < batch; ++b)
                    s += xq[b * channels + c];
                ASSERT_EQ(want_sums[c], s);
            }
            // The dispatched passes (whatever tier runs here) against the portable ones.
            const size_t tile_bytes = static_cast<size_t>(tiles * channels * jit::tile_batch);
            const size_t quad_bytes =
                    static_cast<size_t>(tiles * ((channels + 3) / 4) * 4 * jit::tile_batch);
            std::vector<uint8_t> g(tile_bytes, 1), g_want(tile_bytes, 2);
            expect_same_bits(detail::quantize_stochastic_to_s8_tiles(x.data(), batch, channels, 7,
                                                                     g.data(), nullptr, 2),
                             detail::portable::quantize_stochastic_to_s8_tiles(
                                     x.data(), batch, channels, 7, g_want.data(), nullptr, 1),
                             "G1 scale");
            EXPECT_EQ(g, g_want);
            // max |x| given: the same tiles and scale, x read once; a wrong
            // maximum makes other tiles (it is used, not checked)
            {
                float peak = 0.f;
                for (float v : x)
                    peak = std::max(peak, std::fabs(v));
                std::vector<uint8_t> g_known(tile_bytes, 3);
                expect_same_bits(detail::quantize_stochastic_to_s8_tiles(
                                         x.data(), batch, channels, 7, g_known.data(), &peak, 2),
                                 detail::portable::quantize_stochastic_to_s8_tiles(
                                         x.data(), batch, channels, 7, g_want.data(), nullptr, 1),
                                 "G1 scale, maximum given");
                EXPECT_EQ(g_known, g_want);
                const float doubled = 2 * peak;
                if (peak > 0.f) {
                    detail::quantize_stochastic_to_s8_tiles(x.data(), batch, channels, 7,
                                                            g_known.data(), &doubled, 2);
                    EXPECT_NE(g_known, g_want);
                }
            }
            std::vector<int8_t> t_want(tile_bytes, 2);
            detail::portable::pack_s8_tiles(xq.data(), batch, channels, t_want.data(), nullptr, 1);
            {
                // every tier this CPU runs, with the column sums or without
                const auto tiers = runnable_tiers<detail::pack_s8_tiles_fn>(
                        detail::pack_s8_tiles, detail::portable::pack_s8_tiles,
                        detail::pack_s8_tiles_avx2, detail::pack_s8_tiles_avx512);
                for (auto [name, tier] : tiers)
                    for (bool with_sums : {false, true}) {
                        SCOPED_TRACE(std::string(name) + (with_sums ? " with column sums" : ""));
                        std::vector<int8_t> t(tile_bytes, 1);
                        std::vector<int32_t> packed_sums(channels, -7);
                        tier(xq.data(), batch, channels, t.data(),
                             with_sums ? packed_sums.data() : nullptr, 2);
                        EXPECT_EQ(t, t_want);
                        if (with_sums)
                            EXPECT_EQ(packed_sums, want_sums);
                        else
                            EXPECT_EQ(packed_sums, std::vector<int32_t>(channels, -7));
                    }
            }
            // G1's tiles from its plain int8 (the fused backward's way) are
            // those quantized from dY: q + 128 at each element, 128 in the
            // padding; every tier where this CPU runs it.
            {
                std::vector<int8_t> g1(static_cast<size_t>(n));
                detail::portable::quantize_stochastic(x.data(), n, nullptr, 1, 1, 7, g1.data(), 1);
                std::vector<detail::shift_to_s8_tiles_fn *> tiers{
                        detail::shift_to_s8_tiles, detail::portable::shift_to_s8_tiles};
                if (cpu_has(cpu_isa::avx2)) tiers.push_back(detail::shift_to_s8_tiles_avx2);
                if (cpu_has(cpu_isa::avx512_core))
                    tiers.push_back(detail::shift_to_s8_tiles_avx512);
                for (auto *tier : tiers) {
                    std::vector<uint8_t> shifted(tile_bytes, 3);
                    tier(g1.data(), batch, channels, shifted.data(), 2);
                    EXPECT_EQ(shifted, g_want);
                }
                for (int64_t b = 0; b < tiles * jit::tile_batch; ++b)
                    for (int64_t c = 0; c < channels; ++c) {
                        const int64_t tile = b / jit::tile_batch, j = b % jit::tile_batch;
                        const int q = b < batch ? g1[static_cast<size_t>(b * channels + c)] : 0;
                        ASSERT_EQ(g_want[static_cast<size_t>((tile * channels + c) * jit::tile_batch
                                                             + j)],
                                  q + 128);
                    }
            }
            std::vector<uint8_t> q_want(quad_bytes, 2);
            detail::portable::pack_quad_tiles(xq.data(), batch, channels, q_want.data(), 1);
            std::vector<detail::pack_quad_tiles_fn *> quad_tiers{detail::pack_quad_tiles};
            if (cpu_has(cpu_isa::avx2)) quad_tiers.push_back(detail::pack_quad_tiles_avx2);
            if (cpu_has(cpu_isa::avx512_core)) quad_tiers.push_back(detail::pack_quad_tiles_avx512);
            for (auto *tier : quad_tiers) {
                std::vector<uint8_t> q(quad_bytes, 1);
                tier(xq.data(), batch, channels, q.data(), 2);
                EXPECT_EQ(q, q_want);
            }
            std::vector<int32_t> acc(static_cast<size_t>(tiles * channels * jit::tile_batch));
            for (auto &v : acc)
                v = static_cast<int32_t>(rng() % 200001) - 100000;
            std::vector<int32_t> corr(channels);
            for (auto &v : corr)
                v = static_cast<int32_t>(rng() % 1001) - 500;
            auto scale = random_vector(static_cast<size_t>(channels), rng, 0.001f, 0.1f);
            auto bias = random_vector(static_cast<size_t>(channels), rng);
            std::vector<float> y(static_cast<size_t>(n), 1.f), y_want(static_cast<size_t>(n), 2.f);
            detail::unpack_s32_tiles(acc.data(), batch, channels, corr.data(), scale.data(),
                                     bias.data(), y.data(), 2, 1);
            detail::portable::unpack_s32_tiles(acc.data(), batch, channels, corr.data(),
                                               scale.data(), bias.data(), y_want.data(), 1, 1);
            EXPECT_EQ(y, y_want);
            detail::unpack_s32_tiles(acc.data(), batch, channels, corr.data(), scale.data(),
                                     nullptr, y.data(), 2, 1);
            detail::portable::unpack_s32_tiles(acc.data(), batch, channels, corr.data(),
                                               scale.data(), nullptr, y_want.data(), 1, 1);
            EXPECT_EQ(y, y_want);
        }
}

TEST(Passes, s32_unpack_per_output_channel_matches_portable) {
    std::mt19937 rng(9);
    for (int64_t batch : {1, 17, 64, 70})
        for (int64_t inner : {1, 3, 20}) {
            SCOPED_TRACE("batch " + std::to_string(batch) + " inner " + std::to_string(inner));
            const int64_t oc = 5, channels = oc * inner, tiles = jit::tile_count(batch);
            std::vector<int32_t> acc(static_cast<size_t>(tiles * channels * 64));
            for (auto &v : acc)
                v = static_cast<int32_t>(rng() % 200001) - 100000;
            std::vector<int32_t> corr(oc);
            for (auto &v : corr)
                v = static_cast<int32_t>(rng() % 1001) - 500;
            auto scale = random_vector(static_cast<size_t>(oc), rng, 0.001f, 0.1f);
            auto bias = random_vector(static_cast<size_t>(oc), rng);
            std::vector<float> want(static_cast<size_t>(batch * channels)), got(want.size());
            detail::portable::unpack_s32_tiles(acc.data(), batch, channels, corr.data(),
                                               scale.data(), bias.data(), want.data(), 1, inner);
            for (int64_t b = 0; b < batch; ++b)
                for (int64_t ch = 0; ch < channels; ++ch) {
                    const int64_t o = ch / inner;
                    const int32_t a =
                            acc[static_cast<size_t>((b / 64 * channels + ch) * 64 + b % 64)];
                    ASSERT_EQ(want[b * channels + ch], float(a - corr[o]) * scale[o] + bias[o]);
                }
            const auto tiers = runnable_tiers<detail::unpack_s32_tiles_fn>(
                    detail::unpack_s32_tiles, nullptr, detail::unpack_s32_tiles_avx2,
                    detail::unpack_s32_tiles_avx512);
            for (auto [name, tier] : tiers)
                for (const float *b : {static_cast<const float *>(bias.data()),
                                       static_cast<const float *>(nullptr)}) {
                    SCOPED_TRACE(std::string(name) + (b ? " with bias" : ""));
                    detail::portable::unpack_s32_tiles(acc.data(), batch, channels, corr.data(),
                                                       scale.data(), b, want.data(), 1, inner);
                    std::fill(got.begin(), got.end(), -3.f);
                    tier(acc.data(), batch, channels, corr.data(), scale.data(), b, got.data(), 2,
                         inner);
                    EXPECT_EQ(got, want);
                }
        }
}

// The Conv2d passes (pixel-major rows): the portable tier against their
// definition, the dispatched tier (AVX-512 where the CPU has it) against it.
TEST(Passes, conv_tiles_match_the_definition_on_every_tier) {
    std::mt19937 rng(10);
    for (int64_t batch : {1, 17, 64, 70})
        for (auto [c, h, w] :
             {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 5, 7}, {5, 4, 17}, {8, 2, 33}})
            for (auto pad : {detail::spatial_pad{0, 0, 0, 0}, detail::spatial_pad{1, 2, 3, 1}}) {
                SCOPED_TRACE(std::to_string(batch) + "x" + std::to_string(c) + "x"
                             + std::to_string(h) + "x" + std::to_string(w) + " pad "
                             + std::to_string(pad.top));
                const int64_t hp = h + pad.top + pad.bottom, wp = w + pad.left + pad.right;
                const int64_t tiles = jit::tile_count(batch), px = h * w;
                auto at = [&](int64_t y, int64_t xx) {
                    const int64_t iy = y - pad.top, ix = xx - pad.left;
                    return iy >= 0 && iy < h && ix >= 0 && ix < w ? iy * w + ix : int64_t(-1);
                };
                // f32 pack
                auto src = random_vector(static_cast<size_t>(batch * c * px), rng);
                const int64_t rows = hp * wp * c;
                std::vector<float> want(static_cast<size_t>(tiles * rows * 64), 7.f);
                detail::portable::pack_conv_tiles(src.data(), batch, c, h, w, pad, want.data(), 2);
                for (int64_t b = 0; b < batch; ++b)
                    for (int64_t y = 0; y < hp; ++y)
                        for (int64_t xx = 0; xx < wp; ++xx)
                            for (int64_t ch = 0; ch < c; ++ch) {
                                const int64_t s = at(y, xx);
                                ASSERT_EQ(want[static_cast<size_t>(
                                                  ((b / 64) * rows + (y * wp + xx) * c + ch) * 64
                                                  + b % 64)],
                                          s < 0 ? 0.f : src[(b * c + ch) * px + s]);
                            }
                std::vector<float> got(want.size(), 3.f);
                detail::pack_conv_tiles(src.data(), batch, c, h, w, pad, got.data(), 3);
                expect_same_read_lanes(got, want, batch, rows, "pack_conv_tiles");
                if (cpu_has(cpu_isa::avx2)) {
                    std::vector<float> tier_got(want.size(), 3.f);
                    detail::pack_conv_tiles_avx2(src.data(), batch, c, h, w, pad, tier_got.data(),
                                                 2);
                    expect_same_read_lanes(tier_got, want, batch, rows, "pack_conv_tiles_avx2");
                }
                // f32 unpack (no padding: rows = pixels x channels)
                auto y_tiles = random_vector(static_cast<size_t>(tiles * px * c * 64), rng);
                auto bias = random_vector(static_cast<size_t>(c), rng);
                std::vector<float> out_want(static_cast<size_t>(batch * c * px)),
                        out_got(out_want.size());
                detail::portable::unpack_conv_tiles(y_tiles.data(), batch, c, px, bias.data(),
                                                    out_want.data(), 1);
                for (int64_t b = 0; b < batch; ++b)
                    for (int64_t ch = 0; ch < c; ++ch)
                        for (int64_t p = 0; p < px; ++p)
                            ASSERT_EQ(out_want[(b * c + ch) * px + p],
                                      y_tiles[static_cast<size_t>(
                                              ((b / 64) * px * c + p * c + ch) * 64 + b % 64)]
                                              + bias[ch]);
                detail::unpack_conv_tiles(y_tiles.data(), batch, c, px, bias.data(), out_got.data(),
                                          2);
                EXPECT_EQ(out_got, out_want);
                if (cpu_has(cpu_isa::avx2)) {
                    for (const float *b :
                         std::initializer_list<const float *>{bias.data(), nullptr}) {
                        std::vector<float> tier_got(out_want.size(), 3.f), no_bias(out_want.size());
                        detail::portable::unpack_conv_tiles(y_tiles.data(), batch, c, px, b,
                                                            no_bias.data(), 1);
                        detail::unpack_conv_tiles_avx2(y_tiles.data(), batch, c, px, b,
                                                       tier_got.data(), 3);
                        EXPECT_EQ(tier_got, no_bias) << "unpack_conv_tiles_avx2, bias " << !!b;
                    }
                }
                // int8 packs
                std::vector<int8_t> xq(static_cast<size_t>(batch * c * px));
                for (auto &v : xq)
                    v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
                // word tiles, per batch lane one 4-byte word: quads hold the
                // bytes x + 128 of channels 4q..4q+3, pairs the u16 x + 128
                // of channels 2q, 2q+1; every tier as the portable pass
                auto check_word_tiles =
                        [&](int per_word, detail::pack_conv_quad_tiles_fn *portable_pack,
                            const std::vector<detail::pack_conv_quad_tiles_fn *> &tiers,
                            const char *what) {
                            const int64_t words = (c + per_word - 1) / per_word,
                                          wrows = hp * wp * words, slot = 4 / per_word;
                            std::vector<uint8_t> want(static_cast<size_t>(tiles * wrows * 256), 1);
                            portable_pack(xq.data(), batch, c, h, w, pad, want.data(), 2);
                            for (int64_t b = 0; b < batch; ++b)
                                for (int64_t y = 0; y < hp; ++y)
                                    for (int64_t xx = 0; xx < wp; ++xx)
                                        for (int64_t ch = 0; ch < words * per_word; ++ch) {
                                            const int64_t s = at(y, xx);
                                            const int v = s < 0 || ch >= c
                                                                  ? 0
                                                                  : xq[(b * c + ch) * px + s];
                                            const size_t i = static_cast<size_t>(
                                                    (((b / 64) * wrows + (y * wp + xx) * words
                                                      + ch / per_word)
                                                             * 64
                                                     + b % 64)
                                                            * 4
                                                    + slot * (ch % per_word));
                                            ASSERT_EQ(want[i], v + 128) << what;
                                            for (int64_t z = 1; z < slot; ++z)
                                                ASSERT_EQ(want[i + z], 0) << what;
                                        }
                            for (auto *tier : tiers) {
                                std::vector<uint8_t> got(want.size(), 2);
                                tier(xq.data(), batch, c, h, w, pad, got.data(), 3);
                                for (int64_t t = 0; t < tiles; ++t)
                                    for (int64_t r = 0; r < wrows; ++r)
                                        for (int64_t j = 0; j < detail::tile_lanes(batch, t) * 4;
                                             ++j) {
                                            const size_t i =
                                                    static_cast<size_t>((t * wrows + r) * 256 + j);
                                            ASSERT_EQ(got[i], want[i])
                                                    << what << " tile " << t << " row " << r;
                                        }
                            }
                        };
                ASSERT_NO_FATAL_FAILURE(check_word_tiles(4, detail::portable::pack_conv_quad_tiles,
                                                         {detail::pack_conv_quad_tiles}, "quad"));
                std::vector<detail::pack_conv_pair_tiles_fn *> pair_tiers{
                        detail::pack_conv_pair_tiles};
                if (cpu_has(cpu_isa::avx512_core))
                    pair_tiers.push_back(detail::pack_conv_pair_tiles_avx512);
                ASSERT_NO_FATAL_FAILURE(check_word_tiles(2, detail::portable::pack_conv_pair_tiles,
                                                         pair_tiers, "pair"));
                std::vector<int8_t> swant(static_cast<size_t>(tiles * rows * 64), 1);
                detail::portable::pack_conv_s8_tiles(xq.data(), batch, c, h, w, pad, swant.data(),
                                                     nullptr, 2);
                for (int64_t b = 0; b < tiles * 64; ++b)
                    for (int64_t y = 0; y < hp; ++y)
                        for (int64_t xx = 0; xx < wp; ++xx)
                            for (int64_t ch = 0; ch < c; ++ch) {
                                const int64_t s = at(y, xx);
                                ASSERT_EQ(swant[static_cast<size_t>(
                                                  ((b / 64) * rows + (y * wp + xx) * c + ch) * 64
                                                  + b % 64)],
                                          s < 0 || b >= batch ? 0 : xq[(b * c + ch) * px + s]);
                            }
                // the batch's sum of each (channel, pixel), with the pack or alone
                std::vector<int32_t> sums_want(static_cast<size_t>(c * px));
                for (int64_t i = 0; i < c * px; ++i)
                    for (int64_t b = 0; b < batch; ++b)
                        sums_want[static_cast<size_t>(i)] += xq[b * c * px + i];
                std::vector<int32_t> sums(sums_want.size(), -1);
                detail::column_sums_s8(xq.data(), batch, c * px, sums.data(), 3);
                EXPECT_EQ(sums, sums_want);
                const auto s8_tiers = runnable_tiers<detail::pack_conv_s8_tiles_fn>(
                        detail::pack_conv_s8_tiles, detail::portable::pack_conv_s8_tiles,
                        detail::pack_conv_s8_tiles_avx2, detail::pack_conv_s8_tiles_avx512);
                for (auto [name, tier] : s8_tiers)
                    for (bool with_sums : {false, true}) {
                        SCOPED_TRACE(std::string(name) + (with_sums ? " with plane sums" : ""));
                        std::vector<int8_t> sgot(swant.size(), 2);
                        std::fill(sums.begin(), sums.end(), -1);
                        tier(xq.data(), batch, c, h, w, pad, sgot.data(),
                             with_sums ? sums.data() : nullptr, 3);
                        EXPECT_EQ(sgot, swant);
                        if (with_sums) EXPECT_EQ(sums, sums_want);
                    }
                // int32 unpack, correction per channel and per (channel, pixel)
                std::vector<int32_t> acc(static_cast<size_t>(tiles * px * c * 64));
                for (auto &v : acc)
                    v = static_cast<int32_t>(rng() % 200001) - 100000;
                std::vector<int32_t> corr(static_cast<size_t>(c * px));
                for (auto &v : corr)
                    v = static_cast<int32_t>(rng() % 1001) - 500;
                auto scale = random_vector(static_cast<size_t>(c), rng, 0.001f, 0.1f);
                // the forward's (per channel), backward-data's (per pixel, one
                // scale) and an inner of 3 (runs crossing a 16-pixel block)
                for (auto [corr_inner, scale_inner] :
                     {std::pair{px, px}, std::pair{int64_t(1), px}, std::pair{int64_t(3), px},
                      std::pair{int64_t(1), c * px}}) {
                    SCOPED_TRACE("inner " + std::to_string(corr_inner) + ", "
                                 + std::to_string(scale_inner));
                    std::vector<float> w32(static_cast<size_t>(batch * c * px)), g32(w32.size());
                    detail::portable::unpack_conv_s32_tiles(acc.data(), batch, c, px, corr.data(),
                                                            corr_inner, scale.data(), scale_inner,
                                                            bias.data(), w32.data(), 2);
                    for (int64_t b = 0; b < batch; ++b)
                        for (int64_t ch = 0; ch < c; ++ch)
                            for (int64_t p = 0; p < px; ++p) {
                                const int32_t a = acc[static_cast<size_t>(
                                        ((b / 64) * px * c + p * c + ch) * 64 + b % 64)];
                                ASSERT_EQ(w32[(b * c + ch) * px + p],
                                          float(a - corr[(ch * px + p) / corr_inner])
                                                          * scale[(ch * px + p) / scale_inner]
                                                  + bias[ch]);
                            }
                    detail::unpack_conv_s32_tiles(acc.data(), batch, c, px, corr.data(), corr_inner,
                                                  scale.data(), scale_inner, bias.data(),
                                                  g32.data(), 3);
                    EXPECT_EQ(g32, w32);
                }
            }
}

// The s8 SDDMM's dY: every byte of the destination written, g + 128 in the
// image, zeros past each row and past each channel's rows (the kernels'
// vectors read them: garbage there would add into the weight gradient),
// on every tier.
TEST(Passes, width_dy_u8_rows_and_channels_are_zero_padded) {
    std::mt19937 rng(21);
    for (auto [h, w, row_bytes, channel_bytes] :
         {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 1, 1, 1},
          {3, 5, 5, 64},
          {14, 14, 16, 256},
          {7, 7, 64, 448},
          {5, 3, 9, 47},
          {3, 100, 130, 400},
          {2, 33, 33, 66}}) {
        SCOPED_TRACE(std::to_string(h) + "x" + std::to_string(w) + " rows of "
                     + std::to_string(row_bytes) + ", channels of "
                     + std::to_string(channel_bytes));
        const int64_t batch = 2, c = 3;
        std::vector<int8_t> g(static_cast<size_t>(batch * c * h * w));
        for (auto &v : g)
            v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
        // the dispatched tier, and each tier by name where this CPU runs it
        const auto tiers = runnable_tiers<detail::pack_width_dy_u8_fn>(
                detail::pack_width_dy_u8, detail::portable::pack_width_dy_u8,
                detail::pack_width_dy_u8_avx2, detail::pack_width_dy_u8_avx512);
        for (auto [name, tier] : tiers) {
            SCOPED_TRACE(name);
            std::vector<uint8_t> dy(static_cast<size_t>(batch * c * channel_bytes), 0xab);
            tier(g.data(), batch, c, h, w, row_bytes, channel_bytes, dy.data(), 2);
            for (int64_t p = 0; p < batch * c; ++p)
                for (int64_t i = 0; i < channel_bytes; ++i) {
                    const int64_t r = i / row_bytes, x = i % row_bytes;
                    const int want =
                            r < h && x < w ? g[static_cast<size_t>((p * h + r) * w + x)] + 128 : 0;
                    ASSERT_EQ(dy[static_cast<size_t>(p * channel_bytes + i)], want)
                            << p << " " << i;
                }
        }
    }
}

// The width planes (jit/width_abi.hpp) against their definition: every
// position written, the image where it belongs (column phases included),
// zeros / x = 0 elsewhere; the AVX-512 tier bit for bit; the finite check.
TEST(Passes, width_planes_match_the_definition_on_every_tier) {
    std::mt19937 rng(12);
    for (auto [c, h, w] :
         {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {3, 5, 7}, {6, 4, 17}, {5, 2, 33}})
        for (int64_t phases : {1, 2, 3})
            for (auto [pad, slack] : {std::pair{detail::spatial_pad{0, 0, 0, 0}, int64_t(5)},
                                      std::pair{detail::spatial_pad{1, 2, 3, 1}, int64_t(5)},
                                      std::pair{detail::spatial_pad{0, 0, 0, 0}, int64_t(0)}}) {
                SCOPED_TRACE(std::to_string(c) + "x" + std::to_string(h) + "x" + std::to_string(w)
                             + " phases " + std::to_string(phases) + " pad "
                             + std::to_string(pad.top) + " slack " + std::to_string(slack));
                const int64_t batch = 2, wp = w + pad.left + pad.right;
                detail::width_plane plane;
                plane.rows = h + pad.top + pad.bottom;
                plane.phases = phases;
                // slack: columns past the image (none: a phase as short as 1)
                plane.phase_len = (wp + phases - 1) / phases + slack;
                auto src = random_vector(static_cast<size_t>(batch * c * h * w), rng);
                std::vector<int8_t> xq(src.size());
                for (auto &v : xq)
                    v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
                auto value = [&](int64_t b, int64_t ch, int64_t r, int64_t col) -> int64_t {
                    const int64_t y = r - pad.top, x = col - pad.left;
                    if (ch >= c || y < 0 || y >= h || x < 0 || x >= w) return -1;
                    return ((b * c + ch) * h + y) * w + x;
                };
                const int64_t size = plane.size(), quads = (c + 3) / 4;
                std::vector<float> f_want(static_cast<size_t>(batch * c * size), 7.f);
                std::vector<uint32_t> q_want(static_cast<size_t>(batch * quads * size), 7u);
                EXPECT_TRUE(detail::portable::pack_width_planes(src.data(), batch, c, h, w, pad,
                                                                plane, f_want.data(), 2));
                detail::portable::pack_width_quads(xq.data(), batch, c, h, w, pad, plane,
                                                   q_want.data(), 2);
                std::vector<int8_t> i8_got(static_cast<size_t>(batch * c * size), 7);
                detail::pack_width_planes(xq.data(), batch, c, h, w, pad, plane, i8_got.data(), 2);
                const int64_t pairs = (c + 1) / 2;
                std::vector<uint32_t> p_want(static_cast<size_t>(batch * pairs * size), 7u);
                detail::portable::pack_width_pairs(xq.data(), batch, c, h, w, pad, plane,
                                                   p_want.data(), 2);
                for (int64_t b = 0; b < batch; ++b)
                    for (int64_t r = 0; r < plane.rows; ++r)
                        for (int64_t e = 0; e < plane.row_len(); ++e) {
                            // element e of the row is column (e % len) * phases + e / len
                            const int64_t col =
                                    (e % plane.phase_len) * phases + e / plane.phase_len;
                            for (int64_t ch = 0; ch < c; ++ch) {
                                const int64_t s = col < wp ? value(b, ch, r, col) : -1;
                                ASSERT_EQ(f_want[static_cast<size_t>((b * c + ch) * size
                                                                     + r * plane.row_len() + e)],
                                          s < 0 ? 0.f : src[s]);
                                ASSERT_EQ(i8_got[static_cast<size_t>((b * c + ch) * size
                                                                     + r * plane.row_len() + e)],
                                          s < 0 ? 0 : xq[s]);
                            }
                            // word q of `per` channels (x + 128, `bits` each) at this position
                            auto word = [&](int64_t q, int per, int bits) {
                                uint32_t w = 0;
                                for (int k = 0; k < per; ++k) {
                                    const int64_t s = col < wp ? value(b, per * q + k, r, col) : -1;
                                    w |= static_cast<uint32_t>((s < 0 ? 0 : xq[s]) + 128)
                                         << (bits * k);
                                }
                                return w;
                            };
                            for (int64_t q = 0; q < quads; ++q)
                                ASSERT_EQ(q_want[static_cast<size_t>((b * quads + q) * size
                                                                     + r * plane.row_len() + e)],
                                          word(q, 4, 8));
                            for (int64_t q = 0; q < pairs; ++q)
                                ASSERT_EQ(p_want[static_cast<size_t>((b * pairs + q) * size
                                                                     + r * plane.row_len() + e)],
                                          word(q, 2, 16));
                        }
                // The dispatching entry points (AVX-512 where the CPU and the
                // plane allow) write the same, and see a NaN or an Inf.
                std::vector<float> f_got(f_want.size(), 3.f);
                std::vector<uint32_t> q_got(q_want.size(), 3u);
                EXPECT_TRUE(detail::pack_width_planes(src.data(), batch, c, h, w, pad, plane,
                                                      f_got.data(), 3));
                detail::pack_width_quads(xq.data(), batch, c, h, w, pad, plane, q_got.data(), 3);
                EXPECT_EQ(f_got, f_want);
                EXPECT_EQ(q_got, q_want);
                std::vector<uint32_t> p_got(p_want.size(), 3u);
                detail::pack_width_pairs(xq.data(), batch, c, h, w, pad, plane, p_got.data(), 3);
                EXPECT_EQ(p_got, p_want);
                // Each vector tier by name where this CPU runs it (the
                // dispatcher above takes only the best).
                struct f32_tier {
                    cpu_isa isa;
                    detail::pack_width_planes_fn *fn;
                };
                std::vector<f32_tier> tiers{{cpu_isa::ref, detail::portable::pack_width_planes}};
                if (phases <= 2 && cpu_has(cpu_isa::avx2))
                    tiers.push_back({cpu_isa::avx2, detail::pack_width_planes_avx2});
                if (phases == 1 && cpu_has(cpu_isa::avx512_core))
                    tiers.push_back({cpu_isa::avx512_core, detail::pack_width_planes_avx512});
                for (const f32_tier &t : tiers) {
                    SCOPED_TRACE(to_string(t.isa));
                    std::vector<float> tier_got(f_want.size(), 3.f);
                    EXPECT_TRUE(t.fn(src.data(), batch, c, h, w, pad, plane, tier_got.data(), 2));
                    EXPECT_EQ(tier_got, f_want);
                    // a NaN or an Inf anywhere: first, middle (a whole
                    // vector on wide rows) and last element of the image
                    for (float bad : {NAN, INFINITY, -INFINITY})
                        for (size_t at : {size_t{0}, src.size() / 2, src.size() - 1}) {
                            auto dirty = src;
                            dirty[at] = bad;
                            EXPECT_FALSE(t.fn(dirty.data(), batch, c, h, w, pad, plane,
                                              tier_got.data(), 1 + static_cast<int>(at % 2)));
                            EXPECT_FALSE(detail::pack_width_planes(dirty.data(), batch, c, h, w,
                                                                   pad, plane, f_got.data(), 2));
                        }
                }
            }
}

// The BatchNorm passes' AVX2 tier against the portable one, bit for bit:
// statistics and range, the apply (plain, with the int8 copy, with a
// residual, channels without a usable step), ReLU bits, both gradient
// sums and the gradient apply (f32 and int8 sources, masked or not, the
// residual's gradient), over planes of 1, 7, 49, 63 and 196 elements (mask
// bytes straddling planes) and a plane past one 32768-element chunk, with a
// NaN in one case.
TEST(Passes, batch_norm_avx2_tier_matches_portable) {
    if (!cpu_has(cpu_isa::avx2)) GTEST_SKIP() << "no AVX2 on this CPU";
    std::mt19937 rng(41);
    struct shape {
        int64_t batch, channels, spatial;
    };
    for (const shape sh : {shape{1, 1, 1}, shape{3, 2, 7}, shape{5, 3, 49}, shape{2, 5, 63},
                           shape{4, 3, 196}, shape{1, 2, 8 * 4096 + 13}})
        for (int variant = 0; variant < 2; ++variant) {
            SCOPED_TRACE(std::to_string(sh.batch) + "x" + std::to_string(sh.channels) + "x"
                         + std::to_string(sh.spatial) + (variant ? " with a NaN" : ""));
            const detail::channel_planes s{sh.batch, sh.channels, sh.spatial};
            const int64_t n = s.elements(), c = s.channels;
            const auto uc = static_cast<size_t>(c), un = static_cast<size_t>(n);
            auto x = random_vector(un, rng, -2.f, 3.f);
            if (variant) x[un / 2] = std::nanf("");
            const auto residual = random_vector(un, rng);
            const auto dz = random_vector(un, rng);
            const auto scale = random_vector(uc, rng, 0.5f, 2.f);
            const auto shift = random_vector(uc, rng);
            auto inv = random_vector(uc, rng, 10.f, 40.f);
            inv[0] = 0.f; // a channel without a usable step: its copy is zeros
            // as the entry point gives a channel holding a NaN (its mean is NaN)
            if (variant) inv[static_cast<size_t>((n / 2 / s.spatial) % c)] = 0.f;
            const auto mean = random_vector(uc, rng, -0.1f, 0.1f);

            std::vector<double> m[2], v[2];
            std::vector<detail::channel_range> r[2];
            for (int t = 0; t < 2; ++t) {
                m[t].assign(uc, 0), v[t].assign(uc, 0), r[t].assign(uc, {0, 0});
                (t ? detail::channel_statistics_avx2 : detail::portable::channel_statistics)(
                        x.data(), s, m[t].data(), v[t].data(), r[t].data(), 2);
            }
            for (size_t i = 0; i < uc; ++i) {
                EXPECT_EQ(std::memcmp(&m[0][i], &m[1][i], sizeof(double)), 0) << "mean " << i;
                EXPECT_EQ(std::memcmp(&v[0][i], &v[1][i], sizeof(double)), 0) << "var " << i;
                expect_same_bits(r[0][i].lowest, r[1][i].lowest, "lowest");
                expect_same_bits(r[0][i].highest, r[1][i].highest, "highest");
                // the range's definition: the channel's extremes, a NaN skipped
                float lowest = INFINITY, highest = -INFINITY;
                for (int64_t b = 0; b < s.batch; ++b)
                    for (int64_t e = 0; e < s.spatial; ++e) {
                        const float x_e = x[static_cast<size_t>(
                                (b * c + static_cast<int64_t>(i)) * s.spatial + e)];
                        if (x_e != x_e) continue;
                        lowest = std::min(lowest, x_e), highest = std::max(highest, x_e);
                    }
                EXPECT_EQ(r[0][i].lowest, lowest) << "channel " << i;
                EXPECT_EQ(r[0][i].highest, highest) << "channel " << i;
            }

            // apply: every combination of keep and residual, with the ReLU,
            // then each with dst written only as its rounding (quantized):
            // the rounding of the dst the first written run made
            std::vector<float> written[4];
            std::vector<std::pair<const char *, detail::scale_shift_relu_fn *>> apply_tiers{
                    {"portable", detail::portable::scale_shift_relu},
                    {"avx2", detail::scale_shift_relu_avx2}};
            if (cpu_has(cpu_isa::avx512_core))
                apply_tiers.push_back({"avx512", detail::scale_shift_relu_avx512});
            const size_t tn = apply_tiers.size();
            for (int with = 0; with < 8; ++with) {
                const bool keep = with & 1, add = with & 2, quantized = with & 4;
                std::vector<std::vector<float>> dst(tn);
                std::vector<std::vector<uint8_t>> bits(tn);
                std::vector<std::vector<int8_t>> q(tn), rounded(tn);
                std::vector<float> found(tn, -1.f); // max |dst| the pass found
                const auto abs_max_of = [](const std::vector<float> &v) { // NaN sticks
                    float peak = 0.f;
                    for (float e : v)
                        peak = std::isnan(e) || std::isnan(peak) ? NAN
                                                                 : std::max(peak, std::fabs(e));
                    return peak;
                };
                const float peak = quantized ? abs_max_of(written[with & 3]) : 0.f;
                const quant_scale qs = quant_scale_from_abs_max(peak);
                for (size_t t = 0; t < tn; ++t) {
                    dst[t].assign(un, -7.f), bits[t].assign((un + 7) / 8, 0xAA);
                    q[t].assign(un, 99), rounded[t].assign(un, 99);
                    const detail::centered_s8_writer w{q[t].data(), mean.data(), inv.data()};
                    const detail::quantized_s8_writer r{rounded[t].data(), qs};
                    apply_tiers[t].second(x.data(), s, scale.data(), shift.data(),
                                          add ? residual.data() : nullptr,
                                          quantized ? nullptr : dst[t].data(), bits[t].data(),
                                          keep ? &w : nullptr, quantized ? &r : nullptr, &found[t],
                                          3);
                }
                std::vector<int8_t> expected(un);
                for (size_t i = 0; quantized && i < un; ++i)
                    expected[i] = qs.usable ? static_cast<int8_t>(
                                          std::nearbyint(written[with & 3][i] * qs.inv))
                                            : int8_t{0};
                for (size_t t = 0; t < tn; ++t) {
                    SCOPED_TRACE(testing::Message()
                                 << apply_tiers[t].first << ", keep " << keep << " residual " << add
                                 << " quantized " << quantized);
                    EXPECT_EQ(std::memcmp(dst[0].data(), dst[t].data(), un * sizeof(float)), 0)
                            << "apply dst";
                    EXPECT_EQ(bits[0], bits[t]) << "relu bits";
                    EXPECT_EQ(q[0], q[t]) << "int8 copy";
                    expect_same_bits(found[t], quantized ? peak : abs_max_of(dst[0]), "max |dst|");
                    if (quantized) {
                        EXPECT_EQ(rounded[t], expected) << "quantized dst";
                        EXPECT_EQ(dst[t], std::vector<float>(un, -7.f)) << "dst written";
                    }
                }
                if (!quantized) written[with] = dst[0];
            }
            // a scale understating the output (a caller's wrong statistics):
            // every tier clamps to +-127, a NaN to -127, none wraps
            {
                float finite_peak = 0.f;
                for (float v : written[0])
                    if (v == v) finite_peak = std::max(finite_peak, std::fabs(v));
                const quant_scale under = quant_scale_from_abs_max(finite_peak / 2);
                std::vector<int8_t> expected(un);
                for (size_t i = 0; i < un; ++i) {
                    const float v = written[0][i] * under.inv;
                    expected[i] = v != v ? int8_t{-127}
                                         : static_cast<int8_t>(std::nearbyint(
                                                 std::min(std::max(v, -127.f), 127.f)));
                }
                for (size_t t = 0; t < tn && under.usable; ++t) {
                    std::vector<int8_t> rounded(un, 99);
                    std::vector<uint8_t> bits((un + 7) / 8);
                    const detail::quantized_s8_writer r{rounded.data(), under};
                    apply_tiers[t].second(x.data(), s, scale.data(), shift.data(), nullptr, nullptr,
                                          bits.data(), nullptr, &r, nullptr, 2);
                    EXPECT_EQ(rounded, expected) << apply_tiers[t].first << ": understated scale";
                }
            }

            // backward, from the f32 source and from an int8 copy
            std::vector<int8_t> copy(un);
            for (auto &b : copy)
                b = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            const auto step = random_vector(uc, rng, 0.01f, 0.1f);
            std::vector<uint8_t> mask((un + 7) / 8);
            for (auto &b : mask)
                b = static_cast<uint8_t>(rng());
            const auto a = random_vector(uc, rng), b = random_vector(uc, rng),
                       k = random_vector(uc, rng);
            for (int from_s8 = 0; from_s8 < 2; ++from_s8)
                for (const uint8_t *bits : {static_cast<const uint8_t *>(mask.data()),
                                            static_cast<const uint8_t *>(nullptr)}) {
                    detail::centered_source src;
                    if (from_s8)
                        src.values = copy.data(), src.step = step.data();
                    else
                        src.src = x.data(), src.mean = mean.data();
                    std::vector<double> sg[2], sgc[2];
                    std::vector<float> ds[2], dr[2], dmax[2];
                    for (int t = 0; t < 2; ++t) {
                        sg[t].assign(uc, 0), sgc[t].assign(uc, 0);
                        (t ? detail::masked_gradient_sums_avx2
                           : detail::portable::masked_gradient_sums)(
                                dz.data(), bits, src, s, sg[t].data(), sgc[t].data(), 2);
                        ds[t].assign(un, 5.f), dr[t].assign(un, 5.f), dmax[t].assign(uc, -1.f);
                        (t ? detail::masked_gradient_apply_avx2
                           : detail::portable::masked_gradient_apply)(
                                dz.data(), bits, src, s, a.data(), b.data(), k.data(), ds[t].data(),
                                dr[t].data(), dmax[t].data(), 3);
                    }
                    SCOPED_TRACE(std::string(from_s8 ? "int8 source" : "f32 source")
                                 + (bits ? ", masked" : ""));
                    EXPECT_EQ(std::memcmp(sg[0].data(), sg[1].data(), uc * sizeof(double)), 0);
                    EXPECT_EQ(std::memcmp(sgc[0].data(), sgc[1].data(), uc * sizeof(double)), 0);
                    if (cpu_has(cpu_isa::avx512_core)) {
                        std::vector<double> sg512(uc, 0), sgc512(uc, 0);
                        detail::masked_gradient_sums_avx512(dz.data(), bits, src, s, sg512.data(),
                                                            sgc512.data(), 3);
                        EXPECT_EQ(std::memcmp(sg[0].data(), sg512.data(), uc * sizeof(double)), 0)
                                << "avx512 sums";
                        EXPECT_EQ(std::memcmp(sgc[0].data(), sgc512.data(), uc * sizeof(double)), 0)
                                << "avx512 centered sums";
                    }
                    // the sums' definition, in double (the masked g, times src - mean)
                    for (int64_t ch = 0; ch < c; ++ch) {
                        double want = 0, want_centered = 0;
                        for (int64_t nb = 0; nb < s.batch; ++nb)
                            for (int64_t e = 0; e < s.spatial; ++e) {
                                const int64_t i = (nb * c + ch) * s.spatial + e;
                                if (bits && !((bits[i / 8] >> (i % 8)) & 1)) continue;
                                const double x_c =
                                        from_s8 ? copy[static_cast<size_t>(i)]
                                                          * static_cast<double>(
                                                                  step[static_cast<size_t>(ch)])
                                                : static_cast<double>(x[static_cast<size_t>(i)])
                                                          - mean[static_cast<size_t>(ch)];
                                want += dz[static_cast<size_t>(i)];
                                want_centered += dz[static_cast<size_t>(i)] * x_c;
                            }
                        const auto at = static_cast<size_t>(ch);
                        if (std::isnan(want_centered)) continue; // the NaN variant's channel
                        EXPECT_NEAR(sg[0][at], want, 1e-4 * (1 + std::fabs(want)));
                        EXPECT_NEAR(sgc[0][at], want_centered,
                                    1e-4 * (1 + std::fabs(want_centered)));
                    }
                    EXPECT_EQ(std::memcmp(ds[0].data(), ds[1].data(), un * sizeof(float)), 0);
                    EXPECT_EQ(std::memcmp(dr[0].data(), dr[1].data(), un * sizeof(float)), 0);
                    // the channel maxima: of what was written, NaN-sticky, on both tiers
                    for (int64_t c = 0; c < s.channels; ++c) {
                        float want = 0.f;
                        bool nan = false;
                        for (int64_t n = 0; n < s.batch; ++n)
                            for (int64_t i = 0; i < s.spatial; ++i) {
                                const float v = ds[0][(n * s.channels + c) * s.spatial + i];
                                nan |= std::isnan(v);
                                want = std::max(want, std::fabs(v));
                            }
                        if (nan) want = std::nanf("");
                        for (int t = 0; t < 2; ++t)
                            expect_same_bits(dmax[t][c], want, "channel abs max");
                    }
                }
        }
}

// The s8 pair of roundings of a BatchNorm's dY computed chunk by chunk
// (quantize_pair_from_gradient) against the pair of the dY the apply pass
// writes, on every tier the CPU has, with the maxima found without writing
// dY: planes of 1, 7, 49 (mask bytes straddling planes, runs shorter than a
// vector) and one past a 32768-element chunk, from an f32 source and an
// int8 copy, masked and not, a NaN in one case (an unusable scale: zeros).
TEST(Passes, pair_from_batch_norm_gradient_matches_the_written_gradient) {
    std::mt19937 rng(43);
    struct shape {
        int64_t batch, channels, spatial;
    };
    const auto tiers = runnable_tiers<detail::quantize_pair_from_gradient_fn>(
            detail::quantize_pair_from_gradient, detail::portable::quantize_pair_from_gradient,
            detail::quantize_pair_from_gradient_avx2, detail::quantize_pair_from_gradient_avx512);
    const auto apply_tiers = runnable_tiers<detail::masked_gradient_apply_fn>(
            detail::masked_gradient_apply, nullptr, detail::masked_gradient_apply_avx2,
            detail::masked_gradient_apply_avx512);
    for (const shape sh : {shape{1, 1, 1}, shape{3, 2, 7}, shape{5, 3, 49}, shape{2, 5, 63},
                           shape{1, 2, 8 * 4096 + 13}})
        for (int variant = 0; variant < 4; ++variant) {
            const bool masked = variant & 1, with_nan = variant & 2;
            SCOPED_TRACE(std::to_string(sh.batch) + "x" + std::to_string(sh.channels) + "x"
                         + std::to_string(sh.spatial) + (masked ? " masked" : "")
                         + (with_nan ? " with a NaN" : ""));
            const detail::channel_planes s{sh.batch, sh.channels, sh.spatial};
            const auto uc = static_cast<size_t>(s.channels), un = static_cast<size_t>(s.elements());
            auto dz = random_vector(un, rng);
            if (with_nan) dz[un / 3] = std::nanf("");
            std::vector<int8_t> copy(un);
            for (auto &b : copy)
                b = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
            std::vector<uint8_t> mask((un + 7) / 8);
            for (auto &b : mask)
                b = static_cast<uint8_t>(rng());
            const auto step = random_vector(uc, rng, 0.01f, 0.1f), a = random_vector(uc, rng),
                       b = random_vector(uc, rng), k = random_vector(uc, rng),
                       mult = random_vector(uc, rng, 0.001f, 0.02f);
            const auto x = random_vector(un, rng), mean = random_vector(uc, rng);
            for (int from_s8 = 0; from_s8 < 2; ++from_s8) {
                detail::batch_norm_gradient g;
                g.diff_dst = dz.data(), g.bits = masked ? mask.data() : nullptr, g.shape = s;
                if (from_s8)
                    g.src.values = copy.data(), g.src.step = step.data();
                else
                    g.src.src = x.data(), g.src.mean = mean.data();
                g.a = a.data(), g.b = b.data(), g.k = k.data();
                // the written dY (and the masked gradient), its maxima, and its pair: the
                // portable tier's, every other tier's the same bits, the maxima also
                // without dY written
                std::vector<float> dy(un), dr(un), written_max(uc);
                detail::portable::masked_gradient_apply(g.diff_dst, g.bits, g.src, s, g.a, g.b, g.k,
                                                        dy.data(), dr.data(), written_max.data(),
                                                        2);
                for (auto [name, apply] : apply_tiers) {
                    SCOPED_TRACE(name);
                    std::vector<float> tier_dy(un, 5.f), tier_dr(un, 5.f), tier_max(uc, -1.f),
                            computed_max(uc, -1.f);
                    apply(g.diff_dst, g.bits, g.src, s, g.a, g.b, g.k, tier_dy.data(),
                          tier_dr.data(), tier_max.data(), 3);
                    EXPECT_EQ(std::memcmp(tier_dy.data(), dy.data(), un * sizeof(float)), 0);
                    EXPECT_EQ(std::memcmp(tier_dr.data(), dr.data(), un * sizeof(float)), 0);
                    apply(g.diff_dst, g.bits, g.src, s, g.a, g.b, g.k, nullptr, nullptr,
                          computed_max.data(), 1);
                    for (size_t c = 0; c < uc; ++c) {
                        expect_same_bits(tier_max[c], written_max[c], "maxima");
                        expect_same_bits(computed_max[c], written_max[c], "maxima without dY");
                    }
                }
                detail::stochastic_maxima known{};
                ASSERT_TRUE(detail::pair_maxima_from_channels(written_max.data(), mult.data(),
                                                              s.channels, known));
                std::vector<int8_t> want_q(un), want_plain(un);
                const auto scales = detail::quantize_stochastic_pair(
                        dy.data(), s.elements(), mult.data(), s.channels, s.spatial, 11,
                        want_q.data(), 10, want_plain.data(), &known, 2);
                // keys bit 0 apart: a step's two streams, one hash for both
                const detail::stochastic_pair_rounding r{quant_scale_from_abs_max(known.scaled),
                                                         quant_scale_from_abs_max(known.plain), 11,
                                                         10};
                expect_same_bits(r.scaled.scale, scales.scaled, "scaled scale");
                expect_same_bits(r.plain.scale, scales.plain, "plain scale");
                for (auto [name, tier] : tiers)
                    for (int threads : {1, 3}) {
                        SCOPED_TRACE(std::string(name) + (from_s8 ? " int8 copy" : " f32 source")
                                     + " threads " + std::to_string(threads));
                        std::vector<int8_t> q(un, 99), plain(un, 99);
                        tier(g, mult.data(), r, q.data(), plain.data(), threads);
                        EXPECT_EQ(q, want_q);
                        EXPECT_EQ(plain, want_plain);
                    }
            }
        }
}

// Backward-data's column phases interleaved into whole rows: every column
// from its phase, rows outside the row phase untouched; two phases of
// stride 2 (in either order, odd and even widths, short rows) and three of
// stride 3.
TEST(Passes, interleave_width_phases_writes_each_column_from_its_phase) {
    std::mt19937 rng(8);
    const int64_t batch = 2, channels = 3, h = 5, h0 = 1, sh = 2, n_h = 2;
    for (int64_t sw : {2, 3})
        for (int64_t w : {1, 2, 3, 7, 8, 9, 28, 29, 31, 32, 33, 64, 65})
            for (bool reversed : {false, true}) {
                SCOPED_TRACE("sw " + std::to_string(sw) + " w " + std::to_string(w)
                             + (reversed ? " phases reversed" : ""));
                std::vector<std::vector<float>> values;
                std::vector<detail::width_phase_rows> phases;
                for (int64_t w0 = 0; w0 < std::min(sw, w); ++w0) {
                    const int64_t n_w = (w - w0 + sw - 1) / sw;
                    values.push_back(
                            random_vector(static_cast<size_t>(batch * channels * n_h * n_w), rng));
                }
                for (int64_t w0 = 0; w0 < std::min(sw, w); ++w0)
                    phases.push_back(
                            {values[static_cast<size_t>(w0)].data(), w0, (w - w0 + sw - 1) / sw});
                if (reversed) std::reverse(phases.begin(), phases.end());
                const size_t n = static_cast<size_t>(batch * channels * h * w);
                std::vector<float> want(n, -3.f);
                for (const auto &f : phases)
                    for (int64_t p = 0; p < batch * channels; ++p)
                        for (int64_t a = 0; a < n_h; ++a)
                            for (int64_t j = 0; j < f.n_w; ++j)
                                want[static_cast<size_t>((p * h + h0 + a * sh) * w + f.w0
                                                         + j * sw)] =
                                        f.values[(p * n_h + a) * f.n_w + j];
                // the dispatched tier (AVX-512 or AVX2 for stride 2 where the
                // CPU has them), the portable, and the AVX2 tier by name
                std::vector<detail::interleave_width_phases_fn *> tiers{
                        detail::interleave_width_phases, detail::portable::interleave_width_phases};
                if (sw == 2 && phases.size() == 2 && cpu_has(cpu_isa::avx2))
                    tiers.push_back(detail::interleave_width_phases_avx2);
                for (auto *tier : tiers) {
                    std::vector<float> got(n, -3.f);
                    tier(phases.data(), static_cast<int64_t>(phases.size()), batch, channels, n_h,
                         h, w, h0, sh, sw, got.data(), 2);
                    EXPECT_EQ(std::memcmp(got.data(), want.data(), n * sizeof(float)), 0);
                }
            }
}

// The flat SpMM's output: each plane's n_h rows of n_w columns taken from
// rows row_len apart (the lanes past n_w dropped), planes plane_stride
// apart; every tier the CPU has, the portable one, 1-3 threads, rows of 1
// to 33 columns (the AVX-512 tier's masks past 16 and 32).
TEST(Passes, unflatten_width_rows_keeps_each_rows_columns) {
    std::mt19937 rng(9);
    int threads = 1;
    for (int64_t n_w : {1, 3, 7, 16, 17, 33})
        for (int64_t n_h : {1, 5}) {
            const int64_t planes = 5, row_len = n_w + 2, stride = n_h * row_len + 3;
            SCOPED_TRACE("n_w " + std::to_string(n_w) + " n_h " + std::to_string(n_h));
            const auto flat = random_vector(static_cast<size_t>(planes * stride), rng);
            const size_t n = static_cast<size_t>(planes * n_h * n_w);
            std::vector<float> want(n);
            for (int64_t p = 0; p < planes; ++p)
                for (int64_t a = 0; a < n_h; ++a)
                    for (int64_t j = 0; j < n_w; ++j)
                        want[static_cast<size_t>((p * n_h + a) * n_w + j)] =
                                flat[static_cast<size_t>(p * stride + a * row_len + j)];
            std::vector<detail::unflatten_width_rows_fn *> tiers{
                    detail::unflatten_width_rows, detail::portable::unflatten_width_rows};
            if (cpu_has(cpu_isa::avx512_core)) tiers.push_back(detail::unflatten_width_rows_avx512);
            for (auto *tier : tiers) {
                std::vector<float> got(n + 16, -3.f); // and nothing written past the planes
                tier(flat.data(), planes, n_h, n_w, row_len, stride, got.data(), threads);
                EXPECT_EQ(std::memcmp(got.data(), want.data(), n * sizeof(float)), 0);
                for (size_t i = n; i < got.size(); ++i)
                    EXPECT_EQ(got[i], -3.f);
                threads = threads % 3 + 1;
            }
        }
}

} // namespace qsp::test
