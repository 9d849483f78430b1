// The generator base: generated code runs, and its pages are never
// writable and executable at the same time.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

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

#include "jit/jit_avx2_sparse_f32.hpp"
#include "jit/jit_avx2_sparse_s8.hpp"
#include "jit/jit_avx512_sddmm.hpp"
#include "jit/jit_avx512_spmm.hpp"

namespace qsp::test {

// Every real kernel family, not only the test kernel: sealed RX, never W+X.
// (Generating code needs no AVX-512; only running it does.)
TEST(JitGenerator, real_kernels_are_never_writable_and_executable) {
    jit::jit_avx512_spmm_kernel spmm_f32(jit::spmm_type::f32, 4),
            spmm_s8(jit::spmm_type::s8_quads, 2), spmm_s8_bw(jit::spmm_type::s8_quads_bw, 1);
    jit::jit_avx512_sddmm_kernel sddmm_f32(jit::sddmm_type::f32, 3),
            sddmm_s8(jit::sddmm_type::s8_vnni, 1), sddmm_s8_bw(jit::sddmm_type::s8_bw, 1);
    jit::jit_avx2_spmm_f32_kernel spmm_avx2(8);
    jit::jit_avx2_sddmm_f32_kernel sddmm_avx2(5);
    jit::jit_avx2_spmm_s8_kernel spmm_avx2_s8(3, false), spmm_avx_vnni_s8(2, true);
    jit::jit_avx2_sddmm_s8_kernel sddmm_avx2_s8(false), sddmm_avx_vnni_s8(true);
    for (const jit::jit_generator *k : std::initializer_list<const jit::jit_generator *>{
                 &spmm_f32, &spmm_s8, &spmm_s8_bw, &sddmm_f32, &sddmm_s8, &sddmm_s8_bw, &spmm_avx2,
                 &sddmm_avx2}) {
        const std::string perms = permissions_of(k->code());
        ASSERT_EQ(perms.size(), 4u) << k->name();
        EXPECT_EQ(perms.substr(0, 3), "r-x") << k->name();
        EXPECT_GT(k->code_size(), 0u);
    }
}

} // namespace qsp::test
