#include "primitives/scratch.hpp"

#include <memory>
#include <stdexcept>

namespace qsp::detail {

void *scratch_bytes(int slot, size_t bytes) {
    struct buffer {
        std::unique_ptr<unsigned char[]> data;
        size_t size = 0;
    };
    thread_local buffer buffers[scratch_slots];
    if (slot < 0 || slot >= scratch_slots) throw std::logic_error("scratch slot out of range");
    buffer &b = buffers[slot];
    if (b.size < bytes) {
        b.data.reset(new unsigned char[bytes]);
        b.size = bytes;
    }
    return b.data.get();
}

std::vector<int64_t> balance_rows(const int64_t *row_ptr, int64_t rows, int parts) {
    constexpr int64_t row_cost = 8;
    const int64_t total = row_ptr[rows] + row_cost * rows;
    std::vector<int64_t> bounds{0};
    int64_t r = 0;
    for (int part = 1; part < parts; ++part) {
        const int64_t target = total * part / parts;
        while (r < rows && row_ptr[r] + row_cost * r < target)
            ++r;
        bounds.push_back(r);
    }
    bounds.push_back(rows);
    return bounds;
}

} // namespace qsp::detail
