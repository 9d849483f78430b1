// Sparse weight formats: the pattern (fixed when a layer is converted) and
// the values (the trainable nonzeros, passed at execution time).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace qsp {

// CSR sparsity pattern of an N x K weight matrix (Linear: N outputs x K
// inputs; Conv2d: OC rows x (IC/groups * KH * KW) columns, column index
// (ic * KH + kh) * KW + kw). Immutable and cheap to copy (shared storage):
// the pattern is what kernels specialise on, so it never changes after
// construction. Row pointers are 64-bit (nnz may exceed 2^31), column indices
// 32-bit (halves the index traffic; K must fit).
class csr_pattern {
public:
    csr_pattern();

    // Keeps the entries with |w| > threshold (threshold >= 0). NaN weights are
    // kept (they are not zero, and dropping them would hide them).
    static csr_pattern from_dense(const float *dense, int64_t rows, int64_t cols,
                                  float threshold = 0.f);
    // Keeps the entries where mask != 0, whatever their value: a pruning mask
    // defines the pattern even where a kept weight is exactly zero.
    static csr_pattern from_mask(const uint8_t *mask, int64_t rows, int64_t cols);
    // Validates user-provided index arrays; throws std::invalid_argument
    // naming the argument and the broken rule.
    static csr_pattern from_indices(int64_t rows, int64_t cols, std::vector<int64_t> row_ptr,
                                    std::vector<int32_t> col_idx);

    int64_t rows() const;
    int64_t cols() const;
    int64_t nnz() const;
    double density() const;
    const int64_t *row_ptr() const;
    const int32_t *col_idx() const;
    // Content hash of (rows, cols, row_ptr, col_idx). It picks a cache
    // bucket only: two different patterns can share a hash, so every cache
    // also compares the patterns themselves (operator==).
    uint64_t hash() const;
    // Same rows, cols, row_ptr and col_idx (O(nnz), O(1) for copies).
    bool operator==(const csr_pattern &other) const;
    bool operator!=(const csr_pattern &other) const { return !(*this == other); }

    // values[nnz] <- dense[rows x cols] at the pattern's positions.
    void gather(const float *dense, float *values) const;
    // dense[rows x cols] <- 0 outside the pattern, values inside.
    void scatter(const float *values, float *dense) const;

    struct storage; // opaque, shared between copies

private:
    explicit csr_pattern(std::shared_ptr<const storage> s);
    std::shared_ptr<const storage> s_;
};

// A pattern together with its values: the format a C++ user converts a dense
// layer into. Primitives take the pattern at creation and the values (a 1-D
// f32 dnnl::memory of nnz elements) at execution, so an optimizer can update
// the values in place without touching the generated code.
struct csr_weights {
    csr_pattern pattern;
    std::vector<float> values;

    static csr_weights from_dense(const float *dense, int64_t rows, int64_t cols,
                                  float threshold = 0.f);
    std::vector<float> to_dense() const;
};

} // namespace qsp
