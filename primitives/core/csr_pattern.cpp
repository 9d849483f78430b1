#include "qsparseprop/formats.hpp"

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>

namespace qsp {

struct csr_pattern::storage {
    int64_t rows = 0, cols = 0;
    std::vector<int64_t> row_ptr{0};
    std::vector<int32_t> col_idx;
    uint64_t content_hash = 0; // of the arrays: rejects unequal patterns early
    uint64_t hash = 0;         // what hash() reports (the content hash, or a test's)
};

namespace {

[[noreturn]] void refuse(const std::string &what) {
    throw std::invalid_argument(what);
}

void check_dims(int64_t rows, int64_t cols) {
    if (rows < 0) refuse("csr_pattern: rows must be >= 0, got " + std::to_string(rows));
    if (cols < 0) refuse("csr_pattern: cols must be >= 0, got " + std::to_string(cols));
    if (cols > std::numeric_limits<int32_t>::max())
        refuse("csr_pattern: cols = " + std::to_string(cols)
               + " does not fit the 32-bit column index (max 2147483647)");
}

// Test hook (primitives/core/testing_hooks.hpp): patterns built while it is
// on report this hash (for their whole life: a cache key's hash must never
// change), so tests can show that no cache trusts a hash alone.
std::atomic<bool> hash_forced{false};
std::atomic<uint64_t> forced_hash{0};

uint64_t fnv1a(uint64_t h, const void *data, size_t bytes) {
    const auto *p = static_cast<const unsigned char *>(data);
    for (size_t i = 0; i < bytes; ++i) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

} // namespace

csr_pattern::csr_pattern() : s_(std::make_shared<storage>()) {}
csr_pattern::csr_pattern(std::shared_ptr<const storage> s) : s_(std::move(s)) {}

int64_t csr_pattern::rows() const {
    return s_->rows;
}
int64_t csr_pattern::cols() const {
    return s_->cols;
}
int64_t csr_pattern::nnz() const {
    return static_cast<int64_t>(s_->col_idx.size());
}
double csr_pattern::density() const {
    double total = static_cast<double>(s_->rows) * static_cast<double>(s_->cols);
    return total > 0 ? static_cast<double>(nnz()) / total : 0.0;
}
const int64_t *csr_pattern::row_ptr() const {
    return s_->row_ptr.data();
}
const int32_t *csr_pattern::col_idx() const {
    return s_->col_idx.data();
}
uint64_t csr_pattern::hash() const {
    return s_->hash;
}

bool csr_pattern::operator==(const csr_pattern &o) const {
    if (s_ == o.s_) return true;
    const storage &a = *s_, &b = *o.s_;
    // The stored content hashes only reject early; equality is the content.
    return a.rows == b.rows && a.cols == b.cols && a.col_idx.size() == b.col_idx.size()
           && a.content_hash == b.content_hash
           && std::memcmp(a.row_ptr.data(), b.row_ptr.data(), a.row_ptr.size() * sizeof(int64_t))
                      == 0
           && (a.col_idx.empty()
               || std::memcmp(a.col_idx.data(), b.col_idx.data(),
                              a.col_idx.size() * sizeof(int32_t))
                          == 0);
}

static std::shared_ptr<csr_pattern::storage> finish(std::shared_ptr<csr_pattern::storage> s) {
    uint64_t h = 14695981039346656037ull;
    h = fnv1a(h, &s->rows, sizeof(s->rows));
    h = fnv1a(h, &s->cols, sizeof(s->cols));
    h = fnv1a(h, s->row_ptr.data(), s->row_ptr.size() * sizeof(int64_t));
    h = fnv1a(h, s->col_idx.data(), s->col_idx.size() * sizeof(int32_t));
    s->content_hash = h;
    s->hash = hash_forced.load() ? forced_hash.load() : h;
    return s;
}

template <typename keep_fn>
static std::shared_ptr<csr_pattern::storage> build(int64_t rows, int64_t cols, keep_fn keep) {
    check_dims(rows, cols);
    auto s = std::make_shared<csr_pattern::storage>();
    s->rows = rows;
    s->cols = cols;
    s->row_ptr.assign(static_cast<size_t>(rows) + 1, 0);
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c)
            if (keep(r * cols + c)) s->col_idx.push_back(static_cast<int32_t>(c));
        s->row_ptr[r + 1] = static_cast<int64_t>(s->col_idx.size());
    }
    return finish(s);
}

csr_pattern csr_pattern::from_dense(const float *dense, int64_t rows, int64_t cols,
                                    float threshold) {
    if (!(threshold >= 0.f))
        refuse("csr_pattern::from_dense: threshold must be >= 0, got " + std::to_string(threshold));
    if (!dense && rows * cols > 0) refuse("csr_pattern::from_dense: dense is null");
    return csr_pattern(build(rows, cols, [&](int64_t i) {
        float w = dense[i];
        return std::isnan(w) || std::fabs(w) > threshold;
    }));
}

csr_pattern csr_pattern::from_mask(const uint8_t *mask, int64_t rows, int64_t cols) {
    if (!mask && rows * cols > 0) refuse("csr_pattern::from_mask: mask is null");
    return csr_pattern(build(rows, cols, [&](int64_t i) { return mask[i] != 0; }));
}

csr_pattern csr_pattern::from_indices(int64_t rows, int64_t cols, std::vector<int64_t> row_ptr,
                                      std::vector<int32_t> col_idx) {
    check_dims(rows, cols);
    std::ostringstream why;
    if (static_cast<int64_t>(row_ptr.size()) != rows + 1) {
        why << "csr_pattern: row_ptr must have rows + 1 = " << rows + 1 << " entries, got "
            << row_ptr.size();
        refuse(why.str());
    }
    if (row_ptr[0] != 0) {
        why << "csr_pattern: row_ptr[0] must be 0, got " << row_ptr[0];
        refuse(why.str());
    }
    for (int64_t r = 0; r < rows; ++r)
        if (row_ptr[r + 1] < row_ptr[r]) {
            why << "csr_pattern: row_ptr must be non-decreasing, but row_ptr[" << r + 1
                << "] = " << row_ptr[r + 1] << " < row_ptr[" << r << "] = " << row_ptr[r];
            refuse(why.str());
        }
    if (row_ptr[rows] != static_cast<int64_t>(col_idx.size())) {
        why << "csr_pattern: row_ptr[rows] = " << row_ptr[rows]
            << " must equal the number of column indices, " << col_idx.size();
        refuse(why.str());
    }
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
            int32_t c = col_idx[i];
            if (c < 0 || c >= cols) {
                why << "csr_pattern: col_idx[" << i << "] = " << c << " (row " << r
                    << ") is out of range [0, " << cols << ")";
                refuse(why.str());
            }
            if (i > row_ptr[r] && c <= col_idx[i - 1]) {
                why << "csr_pattern: col_idx must be strictly increasing within a row (sorted, "
                       "no duplicates), but row "
                    << r << " has " << col_idx[i - 1] << " then " << c;
                refuse(why.str());
            }
        }
    auto s = std::make_shared<storage>();
    s->rows = rows;
    s->cols = cols;
    s->row_ptr = std::move(row_ptr);
    s->col_idx = std::move(col_idx);
    return csr_pattern(finish(s));
}

void csr_pattern::gather(const float *dense, float *values) const {
    for (int64_t r = 0; r < s_->rows; ++r)
        for (int64_t i = s_->row_ptr[r]; i < s_->row_ptr[r + 1]; ++i)
            values[i] = dense[r * s_->cols + s_->col_idx[i]];
}

void csr_pattern::scatter(const float *values, float *dense) const {
    for (int64_t i = 0; i < s_->rows * s_->cols; ++i)
        dense[i] = 0.f;
    for (int64_t r = 0; r < s_->rows; ++r)
        for (int64_t i = s_->row_ptr[r]; i < s_->row_ptr[r + 1]; ++i)
            dense[r * s_->cols + s_->col_idx[i]] = values[i];
}

csr_weights csr_weights::from_dense(const float *dense, int64_t rows, int64_t cols,
                                    float threshold) {
    csr_weights w;
    w.pattern = csr_pattern::from_dense(dense, rows, cols, threshold);
    w.values.resize(static_cast<size_t>(w.pattern.nnz()));
    w.pattern.gather(dense, w.values.data());
    return w;
}

std::vector<float> csr_weights::to_dense() const {
    std::vector<float> dense(static_cast<size_t>(pattern.rows() * pattern.cols()));
    pattern.scatter(values.data(), dense.data());
    return dense;
}

namespace detail {

void force_pattern_hash_for_testing(bool on, uint64_t value) {
    forced_hash.store(value);
    hash_forced.store(on);
}

} // namespace detail

} // namespace qsp
