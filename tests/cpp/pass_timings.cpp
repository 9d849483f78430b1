// Timings of the layout and quantization passes, tier against tier, at the
// main job's CNN sizes (batch 128; 24 x 28 x 28, 48 x 14 x 14, 96 x 7 x 7).
// Not a test (ctest does not run it): the passes are internal, so it lives
// with the tests, which may include them. Each line times one pass on each
// tier the CPU has and prints the ratio to the best tier; calls are
// interleaved round by round and the medians reported. Noisy machines:
// read the ratios.
//
//   build/tests/cpp/qsp_pass_timings [--rounds 21] [--threads 2]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "primitives/passes/batch_norm.hpp"
#include "primitives/passes/conv_tiles.hpp"
#include "primitives/passes/quantize.hpp"
#include "primitives/passes/width_planes.hpp"
#include "qsparseprop/runtime.hpp"

namespace {

using namespace qsp;
using namespace qsp::detail;

struct candidate {
    std::string name;
    std::function<void()> run;
};

// Medians over `rounds` rounds of one call each, the candidates interleaved.
void compare(const char *what, std::vector<candidate> cands, int rounds) {
    std::vector<std::vector<double>> ms(cands.size());
    for (auto &c : cands) // warm-up
        c.run();
    for (int r = 0; r < rounds; ++r)
        for (size_t i = 0; i < cands.size(); ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            cands[i].run();
            ms[i].push_back(
                    std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                            .count());
        }
    std::vector<double> med;
    for (auto &v : ms) {
        std::sort(v.begin(), v.end());
        med.push_back(v[v.size() / 2]);
    }
    std::printf("%-44s", what);
    for (size_t i = 0; i < cands.size(); ++i)
        std::printf("  %s %.3f ms (%.2fx)", cands[i].name.c_str(), med[i], med[i] / med[0]);
    std::printf("\n");
}

struct sizes {
    int64_t batch, channels, side;
};

} // namespace

int main(int argc, char **argv) {
    int rounds = 21, threads = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!std::strcmp(argv[i], "--rounds")) rounds = std::max(1, std::atoi(argv[i + 1]));
        if (!std::strcmp(argv[i], "--threads")) threads = std::max(1, std::atoi(argv[i + 1]));
    }
    const cpu_isa isa = detected_cpu_isa();
    const bool avx2 = isa >= cpu_isa::avx2, avx512 = isa >= cpu_isa::avx512_core;
    std::printf("pass timings: isa=%s threads=%d rounds=%d (each tier's ratio to the first)\n",
                to_string(isa), threads, rounds);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (const sizes sz : {sizes{128, 24, 28}, sizes{128, 48, 14}, sizes{128, 96, 7}}) {
        const int64_t B = sz.batch, C = sz.channels, H = sz.side, S = H * H, n = B * C * S;
        std::printf("-- %ld x %ld x %ld x %ld\n", static_cast<long>(B), static_cast<long>(C),
                    static_cast<long>(H), static_cast<long>(H));
        std::vector<int8_t> xq(static_cast<size_t>(n));
        for (auto &v : xq)
            v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
        const spatial_pad pad{1, 1, 1, 1};
        const int64_t tiles = tile_count(B), rows = (H + 2) * (H + 2) * C;
        std::vector<int8_t> t8(static_cast<size_t>(tiles * rows * 64));
        std::vector<int32_t> sums(static_cast<size_t>(C * S));

        // f32 X (or dY) into the width kernels' padded planes (stride 1)
        std::vector<float> xf(static_cast<size_t>(n));
        for (auto &v : xf)
            v = normal(rng);
        width_plane planes1;
        planes1.rows = H + 2;
        planes1.phase_len = H + 4; // a C3-like kernel reads 16 columns from 2
        std::vector<float> padded(static_cast<size_t>(B * C * planes1.size()));
        std::vector<candidate> f32_planes;
        if (avx512)
            f32_planes.push_back({"avx512", [&] {
                                      pack_width_planes_avx512(xf.data(), B, C, H, H, pad, planes1,
                                                               padded.data(), threads);
                                  }});
        if (avx2)
            f32_planes.push_back({"avx2", [&] {
                                      pack_width_planes_avx2(xf.data(), B, C, H, H, pad, planes1,
                                                             padded.data(), threads);
                                  }});
        f32_planes.push_back({"portable", [&] {
                                  portable::pack_width_planes(xf.data(), B, C, H, H, pad, planes1,
                                                              padded.data(), threads);
                              }});
        compare("f32 width planes", f32_planes, rounds);

        // s8 X as channel pairs (u16 each) into width planes: the SpMM
        // source on AVX2 without VNNI; stride 1, then stride 2's phases
        for (int64_t phases : {1, 2}) {
            width_plane pair_plane;
            pair_plane.rows = H + 2;
            pair_plane.phases = phases;
            pair_plane.phase_len = (H + 2 + phases - 1) / phases + 4;
            std::vector<uint32_t> pair_words(
                    static_cast<size_t>(B * ((C + 1) / 2) * pair_plane.size()));
            std::vector<candidate> pairs;
            if (avx2)
                pairs.push_back({"avx2", [&] {
                                     pack_width_pairs_avx2(xq.data(), B, C, H, H, pad, pair_plane,
                                                           pair_words.data(), threads);
                                 }});
            pairs.push_back({"portable", [&] {
                                 portable::pack_width_pairs(xq.data(), B, C, H, H, pad, pair_plane,
                                                            pair_words.data(), threads);
                             }});
            compare(phases == 1 ? "width pairs" : "width pairs, stride 2", pairs, rounds);
        }

        // dY's u8 rows of the flat s8 SDDMM: rows at the padded width, each
        // channel padded to 64-byte vectors
        {
            const int64_t row_bytes = H + 2, channel_bytes = (H * row_bytes + 63) / 64 * 64;
            std::vector<uint8_t> dy_rows(static_cast<size_t>(B * C * channel_bytes));
            std::vector<candidate> rows;
            if (avx512)
                rows.push_back({"avx512", [&] {
                                    pack_width_dy_u8_avx512(xq.data(), B, C, H, H, row_bytes,
                                                            channel_bytes, dy_rows.data(), threads);
                                }});
            if (avx2)
                rows.push_back({"avx2", [&] {
                                    pack_width_dy_u8_avx2(xq.data(), B, C, H, H, row_bytes,
                                                          channel_bytes, dy_rows.data(), threads);
                                }});
            rows.push_back({"portable", [&] {
                                portable::pack_width_dy_u8(xq.data(), B, C, H, H, row_bytes,
                                                           channel_bytes, dy_rows.data(), threads);
                            }});
            compare("dY u8 rows, flat", rows, rounds);
        }

        // backward-weights' s8 tiles of X with the batch's plane sums
        std::vector<candidate> pack;
        if (avx512)
            pack.push_back({"avx512+sums", [&] {
                                pack_conv_s8_tiles_avx512(xq.data(), B, C, H, H, pad, t8.data(),
                                                          sums.data(), threads);
                            }});
        if (avx2)
            pack.push_back({"avx2+sums", [&] {
                                pack_conv_s8_tiles_avx2(xq.data(), B, C, H, H, pad, t8.data(),
                                                        sums.data(), threads);
                            }});
        pack.push_back({"portable+sums", [&] {
                            portable::pack_conv_s8_tiles(xq.data(), B, C, H, H, pad, t8.data(),
                                                         sums.data(), threads);
                        }});
        compare("conv s8 tiles + plane sums", pack, rounds);

        // dY's u8 tiles (G1 + 128) of backward-weights, as [batch x C*S]
        std::vector<uint8_t> g_tiles(static_cast<size_t>(tiles * n / B * 64));
        std::vector<candidate> shift;
        if (avx512)
            shift.push_back({"avx512", [&] {
                                 shift_to_s8_tiles_avx512(xq.data(), B, n / B, g_tiles.data(),
                                                          threads);
                             }});
        if (avx2)
            shift.push_back({"avx2", [&] {
                                 shift_to_s8_tiles_avx2(xq.data(), B, n / B, g_tiles.data(),
                                                        threads);
                             }});
        shift.push_back({"portable", [&] {
                             portable::shift_to_s8_tiles(xq.data(), B, n / B, g_tiles.data(),
                                                         threads);
                         }});
        compare("dY's u8 tiles", shift, rounds);

        // s8 X as channel quads (u8 each) into width planes: the SpMM source
        // with VNNI; stride 1, then stride 2's phases
        for (int64_t phases : {1, 2}) {
            width_plane plane;
            plane.rows = H + 2;
            plane.phases = phases;
            plane.phase_len = (H + 2 + phases - 1) / phases + 4;
            std::vector<uint32_t> quads(static_cast<size_t>(B * ((C + 3) / 4) * plane.size()));
            compare(phases == 1 ? "width quads" : "width quads, stride 2",
                    {{"dispatched",
                      [&] {
                          pack_width_quads(xq.data(), B, C, H, H, pad, plane, quads.data(),
                                           threads);
                      }},
                     {"portable",
                      [&] {
                          portable::pack_width_quads(xq.data(), B, C, H, H, pad, plane,
                                                     quads.data(), threads);
                      }}},
                    rounds);
        }
        // stride 2: diff_src's rows from two phases
        const int64_t half = (H + 1) / 2, n_h = H / 2;
        std::vector<float> even(static_cast<size_t>(B * C * n_h * half)),
                odd(static_cast<size_t>(B * C * n_h * (H / 2))), out(static_cast<size_t>(n));
        const width_phase_rows phases[2] = {{even.data(), 0, half}, {odd.data(), 1, H / 2}};
        std::vector<candidate> zips;
        if (avx512)
            zips.push_back({"avx512", [&] {
                                interleave_width_phases_avx512(phases, 2, B, C, n_h, H, H, 0, 2, 2,
                                                               out.data(), threads);
                            }});
        if (avx2)
            zips.push_back({"avx2", [&] {
                                interleave_width_phases_avx2(phases, 2, B, C, n_h, H, H, 0, 2, 2,
                                                             out.data(), threads);
                            }});
        zips.push_back({"portable", [&] {
                            portable::interleave_width_phases(phases, 2, B, C, n_h, H, H, 0, 2, 2,
                                                              out.data(), threads);
                        }});
        compare("diff_src rows from 2 phases", zips, rounds);

        // BatchNorm's statistics with each channel's range (the int8 block's)
        std::vector<float> dz(static_cast<size_t>(n)), dy(static_cast<size_t>(n));
        for (auto &v : dz)
            v = normal(rng);
        std::vector<double> mean(C), var(C);
        std::vector<channel_range> range(C);
        std::vector<candidate> stats;
        if (avx2)
            stats.push_back({"avx2", [&] {
                                 channel_statistics_avx2(dz.data(), {B, C, S}, mean.data(),
                                                         var.data(), range.data(), threads);
                             }});
        stats.push_back({"portable", [&] {
                             portable::channel_statistics(dz.data(), {B, C, S}, mean.data(),
                                                          var.data(), range.data(), threads);
                         }});
        compare("BatchNorm statistics + range", stats, rounds);

        // BatchNorm's backward apply, and the s8 pair of its dY: written then
        // read, or computed where it is rounded
        std::vector<uint8_t> bits(static_cast<size_t>((n + 7) / 8));
        for (auto &v : bits)
            v = static_cast<uint8_t>(rng());
        const std::vector<float> a(C, 1.1f), b(C, 0.2f), k(C, 0.01f), step(C, 0.05f),
                mult(C, 0.01f);
        std::vector<float> maxima(C);
        batch_norm_gradient g;
        g.diff_dst = dz.data(), g.bits = bits.data(), g.shape = {B, C, S};
        g.src.values = xq.data(), g.src.step = step.data();
        g.a = a.data(), g.b = b.data(), g.k = k.data();
        std::vector<double> sum_g(C), sum_g_centered(C);
        const auto sums_of = [&](masked_gradient_sums_fn *tier) {
            return [&, tier] {
                tier(dz.data(), bits.data(), g.src, g.shape, sum_g.data(), sum_g_centered.data(),
                     threads);
            };
        };
        std::vector<candidate> gradient_sums;
        if (avx512) gradient_sums.push_back({"avx512", sums_of(masked_gradient_sums_avx512)});
        if (avx2) gradient_sums.push_back({"avx2", sums_of(masked_gradient_sums_avx2)});
        gradient_sums.push_back({"portable", sums_of(portable::masked_gradient_sums)});
        compare("BatchNorm backward sums", gradient_sums, rounds);
        std::vector<candidate> apply;
        if (avx512)
            apply.push_back({"avx512", [&] {
                                 masked_gradient_apply_avx512(
                                         dz.data(), bits.data(), g.src, g.shape, a.data(), b.data(),
                                         k.data(), dy.data(), nullptr, maxima.data(), threads);
                             }});
        if (avx2)
            apply.push_back({"avx2", [&] {
                                 masked_gradient_apply_avx2(dz.data(), bits.data(), g.src, g.shape,
                                                            a.data(), b.data(), k.data(), dy.data(),
                                                            nullptr, maxima.data(), threads);
                             }});
        apply.push_back({"portable", [&] {
                             portable::masked_gradient_apply(
                                     dz.data(), bits.data(), g.src, g.shape, a.data(), b.data(),
                                     k.data(), dy.data(), nullptr, maxima.data(), threads);
                         }});
        compare("BatchNorm backward apply (+ maxima)", apply, rounds);
        stochastic_maxima known{};
        pair_maxima_from_channels(maxima.data(), mult.data(), C, known);
        const stochastic_pair_rounding r{quant_scale_from_abs_max(known.scaled),
                                         quant_scale_from_abs_max(known.plain), 3, 2};
        std::vector<int8_t> q(static_cast<size_t>(n)), q_plain(static_cast<size_t>(n));
        compare("dY's s8 pair: written+read / computed",
                {{"written",
                  [&] {
                      masked_gradient_apply(dz.data(), bits.data(), g.src, g.shape, a.data(),
                                            b.data(), k.data(), dy.data(), nullptr, maxima.data(),
                                            threads);
                      quantize_stochastic_pair(dy.data(), n, mult.data(), C, S, 3, q.data(), 2,
                                               q_plain.data(), &known, threads);
                  }},
                 {"computed",
                  [&] {
                      masked_gradient_apply(dz.data(), bits.data(), g.src, g.shape, a.data(),
                                            b.data(), k.data(), nullptr, nullptr, maxima.data(),
                                            threads);
                      quantize_pair_from_gradient(g, mult.data(), r, q.data(), q_plain.data(),
                                                  threads);
                  }}},
                rounds);
    }
    return 0;
}
