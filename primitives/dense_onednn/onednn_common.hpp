// What the oneDNN-backed implementations share.
#pragma once

#include <cstdint>

#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include "primitives/core/problem.hpp"

namespace qsp::detail {

// Restores the caller's OpenMP team size after running oneDNN with ours
// (oneDNN's OpenMP runtime sizes its team from the calling thread's ICV).
struct omp_threads_guard {
    explicit omp_threads_guard(int n) : saved(omp_get_max_threads()) { omp_set_num_threads(n); }
    ~omp_threads_guard() { omp_set_num_threads(saved); }
    omp_threads_guard(const omp_threads_guard &) = delete;
    omp_threads_guard &operator=(const omp_threads_guard &) = delete;
    int saved;
};

// oneDNN's int8 kernels without VNNI multiply with vpmaddubsw, which
// saturates pairs of u8 x s8 products at int16 (255 * 127 * 2 > 32767): the
// sums are then not exact and the scheme's results would differ from every
// other implementation. Only VNNI (AVX-512 VNNI, AVX-VNNI) and AMX, as
// oneDNN itself will run them, are exact.
bool onednn_int8_is_exact();

// The quantized CSR weights scattered into a dense int8 [rows x cols] matrix
// (zeros at the pruned positions), rows spread over the team.
void scatter_dense_s8(const csr_pattern &p, const int8_t *wq, int8_t *dense, int num_threads);

} // namespace qsp::detail
