// The generator base: generated code runs, and its pages are never
// writable and executable at the same time.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "jit/jit_generator.hpp"

namespace qsp::test {

namespace {

class return_constant_kernel : public jit::jit_generator {
public:
    explicit return_constant_kernel(int value)
        : jit_generator("return_constant", 4096), value_(value) {}

private:
    void generate() override {
        mov(eax, value_);
        ret();
    }
    int value_;
};

// Permissions ("r-xp", ...) of the mapping that holds addr.
std::string permissions_of(const void *addr) {
    std::ifstream maps("/proc/self/maps");
    std::string line;
    const auto a = reinterpret_cast<uintptr_t>(addr);
    while (std::getline(maps, line)) {
        uintptr_t lo, hi;
        char perms[8] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %7s", &lo, &hi, perms) == 3 && a >= lo && a < hi)
            return perms;
    }
    return "";
}

} // namespace

TEST(JitGenerator, generated_code_runs_and_is_never_writable_and_executable) {
    return_constant_kernel k(42);
    const void *entry = k.create_kernel();
    EXPECT_EQ(k.entry<int (*)()>()(), 42);
    const std::string perms = permissions_of(entry);
    ASSERT_EQ(perms.size(), 4u) << "code page not found in /proc/self/maps";
    EXPECT_EQ(perms[0], 'r');
    EXPECT_EQ(perms[1], '-') << "code is writable: " << perms;
    EXPECT_EQ(perms[2], 'x');
    EXPECT_THROW(k.create_kernel(), std::logic_error);
}

TEST(JitGenerator, dump_writes_the_code_for_objdump) {
    const std::string dir = ::testing::TempDir();
    setenv("QSP_JIT_DUMP", "1", 1);
    setenv("QSP_JIT_DUMP_DIR", dir.c_str(), 1);
    return_constant_kernel k(7);
    k.create_kernel();
    unsetenv("QSP_JIT_DUMP");
    bool found = false;
    for (int i = 0; i < 16 && !found; ++i) {
        std::ifstream f(dir + "/qsp_jit_return_constant." + std::to_string(i) + ".bin",
                        std::ios::binary);
        if (!f) continue;
        std::stringstream bytes;
        bytes << f.rdbuf();
        found = bytes.str() == std::string(reinterpret_cast<const char *>(k.code()), k.code_size());
    }
    EXPECT_TRUE(found);
}

} // namespace qsp::test

#include "jit/jit_uni_sddmm_kernel.hpp"
#include "jit/jit_uni_sddmm_width_kernel.hpp"
#include "jit/jit_uni_spmm_kernel.hpp"
#include "jit/jit_uni_spmm_scatter_kernel.hpp"
#include "jit/jit_uni_spmm_width_kernel.hpp"

namespace qsp::test {

namespace {

// Every parameter set the generators accept (generating code needs no
// AVX-512; only running it does).
std::vector<jit::sparse_kernel_params> every_kernel_params(bool sddmm) {
    std::vector<jit::sparse_kernel_params> out;
    for (cpu_isa isa : {cpu_isa::avx2, cpu_isa::avx512_core, cpu_isa::avx512_core_vnni})
        for (jit::sparse_dtype dt : {jit::sparse_dtype::f32, jit::sparse_dtype::s8})
            for (bool avx_vnni : {false, true}) {
                if (avx_vnni && (isa != cpu_isa::avx2 || dt != jit::sparse_dtype::s8)) continue;
                const int max_vec = sddmm && dt == jit::sparse_dtype::s8
                                            ? 1
                                            : jit::tile_batch / jit::vector_lanes(isa);
                for (int nv = 1; nv <= max_vec; ++nv) {
                    out.push_back(jit::sparse_kernel_params{isa, dt, nv, avx_vnni});
                    if (!sddmm && isa != cpu_isa::avx512_core_vnni && dt == jit::sparse_dtype::s8
                        && !avx_vnni) {
                        out.push_back(out.back());
                        out.back().word = jit::s8_word::entry_pair;
                    }
                }
            }
    return out;
}

void expect_sealed(const jit::jit_generator &k) {
    const std::string perms = permissions_of(k.code());
    ASSERT_EQ(perms.size(), 4u) << k.name();
    EXPECT_EQ(perms.substr(0, 3), "r-x") << k.name();
    EXPECT_GT(k.code_size(), 0u) << k.name();
}

} // namespace

// Every real kernel variant, not only the test kernel: sealed RX, never W+X.
TEST(JitGenerator, every_kernel_variant_is_never_writable_and_executable) {
    int variants = 0;
    for (const auto &p : every_kernel_params(false)) {
        SCOPED_TRACE("spmm " + p.str());
        expect_sealed(*jit::spmm_kernel(p));
        ++variants;
    }
    for (const auto &p : every_kernel_params(true)) {
        SCOPED_TRACE("sddmm " + p.str());
        expect_sealed(*jit::sddmm_kernel(p));
        ++variants;
    }
    EXPECT_EQ(variants, (4 + 8 + 4 + 8 + 4 + 4 + 8 + 8 + 4) + (8 + 1 + 4 + 1 + 4 + 1 + 1));
}

// The width kernels at their most rows for every vector count, with a
// masked tail where the tier masks: the code of a block for each row count
// below n_rows grows as n_rows^2, and must still fit the code buffer.
TEST(JitGenerator, width_kernels_at_their_most_rows_are_generated) {
    for (cpu_isa isa : {cpu_isa::avx2, cpu_isa::avx512_core, cpu_isa::avx512_core_vnni})
        for (jit::sparse_dtype dt : {jit::sparse_dtype::f32, jit::sparse_dtype::s8})
            for (bool avx_vnni : {false, true}) {
                if (avx_vnni && (isa != cpu_isa::avx2 || dt != jit::sparse_dtype::s8)) continue;
                const bool s8 = dt == jit::sparse_dtype::s8;
                const bool pairs = s8 && !avx_vnni && isa != cpu_isa::avx512_core_vnni;
                const auto words =
                        pairs ? std::vector<jit::s8_word>{jit::s8_word::quad, jit::s8_word::pair}
                              : std::vector<jit::s8_word>{jit::s8_word::quad};
                jit::sparse_kernel_params p{isa, dt, 1, avx_vnni};
                p.row_step = 4096;
                for (auto word : words) {
                    p.word = word;
                    p.tail = 0;
                    const int most = jit::spmm_width_max_accumulators(isa, dt, avx_vnni, word);
                    for (p.n_vec = 1; p.n_vec <= most; ++p.n_vec) {
                        p.n_rows = std::min(jit::width_max_rows, most / p.n_vec);
                        p.tail = 3;
                        SCOPED_TRACE("spmm_width " + p.str());
                        ASSERT_NO_THROW(expect_sealed(*jit::spmm_width_kernel(p)));
                        // aligned sources: a block per row count for each shift
                        if (isa < cpu_isa::avx512_core || s8) continue;
                        jit::sparse_kernel_params aligned = p;
                        aligned.shifts = jit::vector_lanes(isa);
                        SCOPED_TRACE("spmm_width " + aligned.str());
                        ASSERT_NO_THROW(expect_sealed(*jit::spmm_width_kernel(aligned)));
                    }
                }
                p.word = jit::s8_word::quad;
                const int most = jit::sddmm_width_max_dy_vectors(isa, dt, avx_vnni);
                for (p.n_vec = 1; p.n_vec <= most; ++p.n_vec) {
                    p.n_rows = std::min(jit::width_max_rows, most / p.n_vec);
                    p.tail = s8 ? 0 : 3;
                    SCOPED_TRACE("sddmm_width " + p.str());
                    ASSERT_NO_THROW(expect_sealed(*jit::sddmm_width_kernel(p)));
                    // aligned sources (f32): the last vector's 3 real lanes
                    // in it at every shift they allow (14, AVX2 6)
                    if (s8) continue;
                    jit::sparse_kernel_params aligned = p;
                    aligned.shifts = jit::vector_lanes(isa) - p.tail + 1;
                    SCOPED_TRACE("sddmm_width " + aligned.str());
                    ASSERT_NO_THROW(expect_sealed(*jit::sddmm_width_kernel(aligned)));
                }
            }
}

// The code cache is keyed by every generator parameter: the same
// parameters give the same code, any other parameter other code.
TEST(JitGenerator, code_cache_keys_on_every_parameter) {
    const jit::sparse_kernel_params base{cpu_isa::avx2, jit::sparse_dtype::s8, 2, false};
    EXPECT_EQ(jit::spmm_kernel(base), jit::spmm_kernel(base));
    for (auto change : std::vector<std::function<void(jit::sparse_kernel_params &)>>{
                 [](jit::sparse_kernel_params &p) { p.isa = cpu_isa::avx512_core; },
                 [](jit::sparse_kernel_params &p) { p.dtype = jit::sparse_dtype::f32; },
                 [](jit::sparse_kernel_params &p) { p.n_vec = 3; },
                 [](jit::sparse_kernel_params &p) { p.avx_vnni = true; },
                 [](jit::sparse_kernel_params &p) { p.word = jit::s8_word::entry_pair; }}) {
        jit::sparse_kernel_params other = base;
        change(other);
        EXPECT_FALSE(other == base);
        EXPECT_NE(jit::spmm_kernel(other), jit::spmm_kernel(base)) << other.str();
        EXPECT_EQ(jit::spmm_kernel(other)->params(), other);
    }
    EXPECT_THROW(jit::spmm_kernel({cpu_isa::avx2, jit::sparse_dtype::f32, 9, false}),
                 std::invalid_argument);
    EXPECT_THROW(jit::sddmm_kernel({cpu_isa::avx512_core, jit::sparse_dtype::s8, 2, false}),
                 std::invalid_argument);
    EXPECT_THROW(jit::spmm_kernel({cpu_isa::avx512_core, jit::sparse_dtype::s8, 1, true}),
                 std::invalid_argument);
    // s8 words past quads, where vpdpbusd is not native (avx2 without
    // AVX-VNNI, avx512_core): entry pairs in the tile SpMMs, channel pairs in
    // the width and scatter SpMMs, neither elsewhere
    auto with_word = [](jit::sparse_kernel_params p, jit::s8_word word) {
        p.word = word;
        return p;
    };
    const auto pair = jit::s8_word::pair, entry_pair = jit::s8_word::entry_pair;
    const jit::sparse_kernel_params avx2_s8{cpu_isa::avx2, jit::sparse_dtype::s8, 1};
    EXPECT_NO_THROW(jit::spmm_kernel(with_word(avx2_s8, entry_pair)));
    jit::sparse_kernel_params width_s8 = avx2_s8; // the width kernels are their layer's rows'
    width_s8.row_step = 72;
    EXPECT_NO_THROW(jit::spmm_width_kernel(with_word(width_s8, pair)));
    EXPECT_NE(jit::spmm_width_kernel(with_word(width_s8, pair)), jit::spmm_width_kernel(width_s8));
    EXPECT_THROW(jit::spmm_kernel(with_word(avx2_s8, pair)), std::invalid_argument);
    // the batch family's scatter kernel reads pairs too (not entry pairs)
    for (cpu_isa isa : {cpu_isa::avx2, cpu_isa::avx512_core}) {
        const jit::sparse_kernel_params scatter_s8{isa, jit::sparse_dtype::s8, 1};
        EXPECT_NO_THROW(jit::spmm_scatter_kernel(with_word(scatter_s8, pair)));
        EXPECT_NE(jit::spmm_scatter_kernel(with_word(scatter_s8, pair)),
                  jit::spmm_scatter_kernel(scatter_s8));
        EXPECT_THROW(jit::spmm_scatter_kernel(with_word(scatter_s8, entry_pair)),
                     std::invalid_argument);
    }
    EXPECT_THROW(jit::spmm_scatter_kernel(
                         with_word({cpu_isa::avx512_core_vnni, jit::sparse_dtype::s8, 1}, pair)),
                 std::invalid_argument);
    EXPECT_THROW(jit::spmm_width_kernel(with_word(width_s8, entry_pair)), std::invalid_argument);
    EXPECT_THROW(jit::sddmm_kernel(with_word(avx2_s8, pair)), std::invalid_argument);
    EXPECT_NO_THROW(jit::spmm_kernel(
            with_word({cpu_isa::avx512_core, jit::sparse_dtype::s8, 1}, entry_pair)));
    EXPECT_THROW(jit::spmm_kernel(with_word({cpu_isa::avx512_core_vnni, jit::sparse_dtype::s8, 1},
                                            entry_pair)),
                 std::invalid_argument);
    EXPECT_THROW(
            jit::spmm_kernel(with_word({cpu_isa::avx2, jit::sparse_dtype::f32, 1}, entry_pair)),
            std::invalid_argument);
    jit::sparse_kernel_params width_zmm = width_s8;
    width_zmm.isa = cpu_isa::avx512_core;
    EXPECT_NO_THROW(jit::spmm_width_kernel(with_word(width_zmm, pair)));
    width_zmm.isa = cpu_isa::avx512_core_vnni;
    EXPECT_THROW(jit::spmm_width_kernel(with_word(width_zmm, pair)), std::invalid_argument);
    width_s8.avx_vnni = true;
    EXPECT_THROW(jit::spmm_width_kernel(with_word(width_s8, pair)), std::invalid_argument);
}

// The width kernels address a block's rows from one register, the row step
// built in: it keys the code, and a step that is not positive or that puts
// a block's last row past a 32-bit displacement is refused, as are more
// rows than width_max_rows.
TEST(JitGenerator, width_kernels_key_on_their_row_step) {
    for (const auto dt : {jit::sparse_dtype::f32, jit::sparse_dtype::s8}) {
        jit::sparse_kernel_params p = jit::make_sparse_kernel_params(cpu_isa::avx2, dt, 1);
        p.n_rows = 3;
        p.row_step = 64;
        jit::sparse_kernel_params other = p;
        other.row_step = 128;
        SCOPED_TRACE(p.str());
        EXPECT_NE(jit::spmm_width_kernel(p), jit::spmm_width_kernel(other));
        EXPECT_NE(jit::sddmm_width_kernel(p), jit::sddmm_width_kernel(other));
        EXPECT_EQ(jit::spmm_width_kernel(other)->params(), other);
        for (const int64_t bad : {int64_t(0), int64_t(-64), int64_t(1) << 31}) {
            other.row_step = bad;
            EXPECT_THROW(jit::spmm_width_kernel(other), std::invalid_argument) << bad;
            EXPECT_THROW(jit::sddmm_width_kernel(other), std::invalid_argument) << bad;
        }
        other = p;
        other.n_rows = jit::width_max_rows + 1;
        EXPECT_THROW(jit::spmm_width_kernel(other), std::invalid_argument);
        EXPECT_THROW(jit::sddmm_width_kernel(other), std::invalid_argument);
    }
}

// Aligned sources (shifts: runs per group, rotated loads) are a separate
// code, and only where the loads stay aligned and the rotation exists: the
// SpMM on AVX-512 (valignd), the f32 SDDMM on both tiers (its dY rotated
// once per run; the last vector's real lanes in it at every shift), a row
// step of whole vectors, at most a vector's lanes of runs.
TEST(JitGenerator, width_spmm_takes_aligned_sources_where_they_are_emitted) {
    jit::sparse_kernel_params p =
            jit::make_sparse_kernel_params(cpu_isa::avx512_core, jit::sparse_dtype::f32, 1);
    p.n_rows = 3;
    p.row_step = 128;
    jit::sparse_kernel_params aligned = p;
    aligned.shifts = 3;
    EXPECT_NE(jit::spmm_width_kernel(p), jit::spmm_width_kernel(aligned));
    EXPECT_EQ(jit::spmm_width_kernel(aligned)->params(), aligned);
    EXPECT_NE(aligned.str().find("_sh3"), std::string::npos);
    auto refused = [](jit::sparse_kernel_params bad, const char *why, bool sddmm = false) {
        SCOPED_TRACE(why);
        if (sddmm)
            EXPECT_THROW(jit::sddmm_width_kernel(bad), std::invalid_argument);
        else
            EXPECT_THROW(jit::spmm_width_kernel(bad), std::invalid_argument);
    };
    jit::sparse_kernel_params bad = aligned;
    bad.row_step = 72; // C3's unaligned rows
    refused(bad, "row step of 72 bytes");
    bad = aligned;
    bad.shifts = 17;
    refused(bad, "17 runs");
    bad.shifts = -1;
    refused(bad, "negative runs");
    bad = aligned;
    bad.isa = cpu_isa::avx2;
    refused(bad, "avx2");
    bad = aligned;
    bad.dtype = jit::sparse_dtype::s8;
    refused(bad, "s8");
    // the SDDMM: the last vector's real lanes stay in it at every shift
    aligned.tail = 14;
    EXPECT_NO_THROW(jit::sddmm_width_kernel(aligned));
    EXPECT_NE(jit::sddmm_width_kernel(aligned), jit::sddmm_width_kernel(p));
    bad = aligned;
    bad.shifts = 4; // lane 14 + 3 past the vector
    refused(bad, "SDDMM tail 14 at 4 shifts", true);
    bad = aligned;
    bad.tail = 0;
    refused(bad, "SDDMM whole vector", true);
    // AVX2 (8 lanes): rotated by vpermps, rows of whole 32-byte vectors
    jit::sparse_kernel_params ymm = aligned;
    ymm.isa = cpu_isa::avx2;
    ymm.tail = 6;
    EXPECT_NO_THROW(jit::sddmm_width_kernel(ymm));
    bad = ymm;
    bad.shifts = 4; // lane 6 + 3 past the vector
    refused(bad, "AVX2 SDDMM tail 6 at 4 shifts", true);
    bad = ymm;
    bad.row_step = 80;
    refused(bad, "AVX2 SDDMM row step of 80 bytes", true);
}

} // namespace qsp::test
