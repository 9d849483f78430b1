// What the sparse kernel families (SpMM, SDDMM) share: the parameters a
// generated kernel is specialised for (the key of the code caches), and a
// generator base that calls the code with the family's call parameters.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include "jit/jit_generator.hpp"
#include "qsparseprop/runtime.hpp"

namespace qsp::jit {

enum class sparse_dtype { f32, s8 };

// How an s8 SpMM kernel item reads its sources (jit/tile_abi.hpp):
//   quad        source rows hold 4 channels per batch element as u8 (x + 128):
//               vpdpbusd, native or emulated;
//   pair        (Conv2d's width planes and batch tiles) 2 channels per
//               position (batch lane) as u16
//               (x + 128): vpmaddwd, whose 16-bit products are exact without
//               VNNI. At 90 % sparsity a non-empty quad holds 1.16 nonzeros
//               and a pair 1.05, so pairs issue about as many words per
//               nonzero while one vpmaddwd + vpaddd replaces the
//               11-instruction nibble emulation of a quad;
//   entry_pair  (Linear's tiles) any two entries of a row: their plain s8
//               rows (1 byte per batch element, a quarter of f32's)
//               interleaved in registers, signed and multiplied by the
//               weights in int16 (vpsignb or a masked negation, vpmaddubsw:
//               exact), two items' sums widened by one vpmaddwd per 8 or 16
//               lanes.
enum class s8_word { quad, pair, entry_pair };
// Source channels per 32-bit source word (quad, pair; entry pairs read bytes).
constexpr int channels_per_word(s8_word w) {
    return w == s8_word::quad ? 4 : 2;
}

struct sparse_kernel_params {
    cpu_isa isa = cpu_isa::avx2;
    sparse_dtype dtype = sparse_dtype::f32;
    int n_vec = 1;         // vectors per tile row this kernel touches (batch tail)
    bool avx_vnni = false; // avx2 + s8 only: VEX vpdpbusd instead of emulation
    // Output-width-innermost kernels (width_abi.hpp) only: output rows per
    // step, the lanes of the last vector that are real (0: all), and the
    // bytes the source moves per output row (a block's source rows are then
    // one base register and displacements: the rows are not limited by the
    // general registers, and the kernel is its layer's).
    int n_rows = 1;
    int tail = 0;
    int64_t row_step = 0;
    // s8 SpMMs only: entry pairs in the tile SpMMs (generic and pattern),
    // pairs in the width SpMM (check_s8_word).
    s8_word word = s8_word::quad;
    // The width kernels: 0, or the source rows start on vector boundaries
    // and each source group's entries come in `shifts` runs, run s reading
    // its source s lanes past its (aligned) offset (width_abi.hpp). The
    // SpMM (AVX-512) rotates what it loads into place (valignd: one aligned
    // load, two where the vector's real lanes reach past the next
    // boundary); the f32 SDDMM (AVX-512 and AVX2), whose lanes are summed in
    // any order, moves its dY lanes up one per run instead (rows whose last
    // vector's real lanes stay in it at every shift).
    int shifts = 0;

    bool operator==(const sparse_kernel_params &o) const {
        return isa == o.isa && dtype == o.dtype && n_vec == o.n_vec && avx_vnni == o.avx_vnni
               && n_rows == o.n_rows && tail == o.tail && row_step == o.row_step && word == o.word
               && shifts == o.shifts;
    }
    std::string str() const;
};
struct sparse_kernel_params_hash {
    size_t operator()(const sparse_kernel_params &p) const;
};

// Batch lanes per vector register of the tier (f32: floats; s8: the dword
// lanes of one batch element each): 16 on AVX-512, 8 on AVX2.
int vector_lanes(cpu_isa isa);

// The parameters for a tier; avx_vnni from the CPU and the cap (avx_vnni_usable).
sparse_kernel_params make_sparse_kernel_params(cpu_isa isa, sparse_dtype dtype, int n_vec);

// The words a tier's s8 SpMMs read where vpdpbusd is not native (a quad's
// nibble emulation costs 11 instructions per 8 or 16 lanes: it made the s8
// forward of L1 at 90 % 4x slower than f32 on AVX2, and C3's int8 step
// slower than f32 on AVX-512 without VNNI, docs/benchmarks.md):
// On avx2 without AVX-VNNI and on avx512_core:
//   s8_tile_word   Linear's tiles: entry_pair;
//   s8_conv_word   Conv2d's sources (width planes, batch tiles): pair
//                  (vpmaddwd on u16 pairs);
// quad where vpdpbusd is native.
s8_word s8_tile_word(cpu_isa isa);
s8_word s8_conv_word(cpu_isa isa);

// Throws std::invalid_argument, naming the family, unless p.word is one the
// family emits for p: pairs in the width and scatter SpMMs (pairs_emitted),
// entry pairs in the tile SpMMs (entry_pairs_emitted), each on the tiers
// without vpdpbusd (s8_tile_word, s8_conv_word).
void check_s8_word(const sparse_kernel_params &p, const char *family, bool pairs_emitted,
                   bool entry_pairs_emitted = false);

// Throws std::invalid_argument, naming the family, unless p.row_step is a
// width kernel's: positive, and a block's last row with its vectors within
// a 32-bit displacement of the block's source.
void check_width_row_step(const sparse_kernel_params &p, const char *family);

template <typename call_params_t> class jit_sparse_kernel : public jit_generator {
public:
    void operator()(const call_params_t &p) const { fn_(&p); }
    const sparse_kernel_params &params() const { return params_; }

protected:
    // Code of one kernel stays far below this; the bound only guards mistakes.
    static constexpr size_t max_code_bytes = 32 * 1024;

    jit_sparse_kernel(const char *family, const sparse_kernel_params &params,
                      size_t code_bytes = max_code_bytes)
        : jit_generator(std::string(family) + "_" + params.str(), code_bytes), params_(params) {}
    // Generates and seals the code; call at the end of the most derived
    // constructor (generate() is virtual).
    void finish() { fn_ = reinterpret_cast<decltype(fn_)>(const_cast<void *>(create_kernel())); }

    sparse_kernel_params params_;

private:
    void (*fn_)(const call_params_t *) = nullptr;
};

// kernel_t<params.isa>, for the tiers that have generated code.
template <template <cpu_isa> class kernel_t, typename base_t>
std::shared_ptr<const base_t> make_for_isa(const sparse_kernel_params &params, const char *family) {
    switch (params.isa) {
        case cpu_isa::avx2:
            return std::make_shared<const kernel_t<cpu_isa::avx2>>(params);
        case cpu_isa::avx512_core:
            return std::make_shared<const kernel_t<cpu_isa::avx512_core>>(params);
        case cpu_isa::avx512_core_vnni:
            return std::make_shared<const kernel_t<cpu_isa::avx512_core_vnni>>(params);
        case cpu_isa::ref:
            break;
    }
    throw std::invalid_argument(std::string("jit ") + family
                                + ": the reference tier has no generated code");
}

} // namespace qsp::jit
