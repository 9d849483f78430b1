#include "jit/jit_sparse_kernel.hpp"

#include <limits>
#include <stdexcept>

#include "jit/cpu_isa_traits.hpp"
#include "runtime/lru_cache.hpp"

namespace qsp::jit {

std::string sparse_kernel_params::str() const {
    return std::string(to_string(isa)) + (dtype == sparse_dtype::f32 ? "_f32" : "_s8")
           + (avx_vnni ? "_avx_vnni" : "") + "_v" + std::to_string(n_vec)
           + (n_rows != 1 ? "_r" + std::to_string(n_rows) : "")
           + (tail != 0 ? "_t" + std::to_string(tail) : "")
           + (row_step != 0 ? "_s" + std::to_string(row_step) : "")
           + (shifts != 0 ? "_sh" + std::to_string(shifts) : "")
           + (word == s8_word::pair         ? "_pairs"
              : word == s8_word::entry_pair ? "_entry_pairs"
                                            : "");
}

size_t sparse_kernel_params_hash::operator()(const sparse_kernel_params &p) const {
    uint64_t h = runtime::hash_mix(0, static_cast<uint64_t>(p.isa));
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.dtype));
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.n_vec));
    h = runtime::hash_mix(h, p.avx_vnni);
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.n_rows));
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.word));
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.row_step));
    h = runtime::hash_mix(h, static_cast<uint64_t>(p.shifts));
    return static_cast<size_t>(runtime::hash_mix(h, static_cast<uint64_t>(p.tail)));
}

int vector_lanes(cpu_isa isa) {
    return isa >= cpu_isa::avx512_core ? 16 : 8;
}

sparse_kernel_params make_sparse_kernel_params(cpu_isa isa, sparse_dtype dtype, int n_vec) {
    sparse_kernel_params p;
    p.isa = isa;
    p.dtype = dtype;
    p.n_vec = n_vec;
    p.avx_vnni = isa == cpu_isa::avx2 && dtype == sparse_dtype::s8 && avx_vnni_usable();
    return p;
}

namespace {
// A JIT tier whose s8 kernels have no vpdpbusd here (emulated_dot, with the
// AVX-VNNI that make_sparse_kernel_params finds).
bool without_vpdpbusd(cpu_isa isa) {
    return isa != cpu_isa::ref
           && emulated_dot(isa, sparse_dtype::s8,
                           make_sparse_kernel_params(isa, sparse_dtype::s8, 1).avx_vnni);
}
} // namespace

s8_word s8_tile_word(cpu_isa isa) {
    return without_vpdpbusd(isa) ? s8_word::entry_pair : s8_word::quad;
}

s8_word s8_conv_word(cpu_isa isa) {
    return without_vpdpbusd(isa) ? s8_word::pair : s8_word::quad;
}

void check_s8_word(const sparse_kernel_params &p, const char *family, bool pairs_emitted,
                   bool entry_pairs_emitted) {
    if (p.word == s8_word::quad) return;
    const bool entry_pairs = p.word == s8_word::entry_pair;
    const std::string what = entry_pairs ? "s8 entry pairs" : "s8 pairs";
    if (entry_pairs ? !entry_pairs_emitted : !pairs_emitted)
        throw std::invalid_argument(
                std::string("jit ") + family + ": " + what
                + (entry_pairs ? " are a generic SpMM word only" : " are an SpMM word only"));
    if (p.isa == cpu_isa::ref || !emulated_dot(p.isa, p.dtype, p.avx_vnni))
        throw std::invalid_argument(std::string("jit ") + family + ": " + what
                                    + " apply to s8 kernels without vpdpbusd (avx2 without "
                                      "avx_vnni, avx512_core) only, not "
                                    + p.str());
}

void check_width_row_step(const sparse_kernel_params &p, const char *family) {
    // the farthest byte a block addresses from its source register: its
    // last row's start plus the row's vectors (two halves each, at most)
    const int64_t reach = (p.n_rows - 1) * p.row_step + 2 * p.n_vec * 64;
    if (p.row_step <= 0 || reach > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument(std::string("jit ") + family
                                    + ": row_step must be positive and n_rows - 1 row steps "
                                      "within a 32-bit displacement, got "
                                    + std::to_string(p.row_step) + " for " + p.str());
}

} // namespace qsp::jit
