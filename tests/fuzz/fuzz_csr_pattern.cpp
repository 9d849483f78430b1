// csr_pattern::from_indices on arbitrary index arrays: it either refuses
// them with std::invalid_argument or builds a pattern whose invariants hold
// (monotone row_ptr from 0 to nnz, every column in range) and which equals
// a copy of itself.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "qsparseprop/qsparseprop.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 3) return 0;
    const int64_t rows = data[0] % 17; // 0 rows too: must be refused cleanly
    const int64_t cols = data[1] % 17;
    const size_t n_rp = static_cast<size_t>(rows) + 1;
    data += 2;
    size -= 2;
    std::vector<int64_t> row_ptr;
    for (size_t i = 0; i < n_rp && i < size; ++i)
        row_ptr.push_back(static_cast<int8_t>(data[i])); // negatives and jumps included
    std::vector<int32_t> col_idx;
    for (size_t i = n_rp; i < size; ++i)
        col_idx.push_back(static_cast<int8_t>(data[i]));
    qsp::csr_pattern p;
    try {
        p = qsp::csr_pattern::from_indices(rows, cols, row_ptr, col_idx);
    } catch (const std::invalid_argument &) {
        return 0; // refused, as documented
    }
    if (p.rows() != rows || p.cols() != cols || p.row_ptr()[0] != 0 || p.row_ptr()[rows] != p.nnz())
        __builtin_trap();
    for (int64_t r = 0; r < rows; ++r)
        if (p.row_ptr()[r] > p.row_ptr()[r + 1]) __builtin_trap();
    for (int64_t k = 0; k < p.nnz(); ++k)
        if (p.col_idx()[k] < 0 || p.col_idx()[k] >= cols) __builtin_trap();
    const qsp::csr_pattern copy = qsp::csr_pattern::from_indices(
            rows, cols, std::vector<int64_t>(p.row_ptr(), p.row_ptr() + rows + 1),
            std::vector<int32_t>(p.col_idx(), p.col_idx() + p.nnz()));
    if (!(copy == p) || copy.hash() != p.hash()) __builtin_trap();
    return 0;
}
