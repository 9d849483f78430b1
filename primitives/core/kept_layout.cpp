#include "primitives/core/kept_layout.hpp"

#include <vector>

#include "primitives/passes/tile_layout.hpp"

namespace qsp::detail {

int64_t kept_elems(int64_t batch, int64_t features) {
    return tiled_elems(batch, features);
}

const char *run_on_plain_layout(const problem &p, const tensors &t, bool src_kept, bool dst_kept,
                                const std::function<const char *(const tensors &)> &run) {
    if (!src_kept && !dst_kept) return run(t);
    const int nt = p.num_threads;
    // src side: p.in features; dst side: p.out
    std::vector<float> src_plain, dst_plain;
    // An argument the direction does not take (s8 backward-weights reads the
    // workspace, not src) is null and converts to nothing.
    if (p.dir == direction::backward_weights) {
        src_kept = src_kept && t.src;
        dst_kept = dst_kept && t.diff_dst;
    }
    if (src_kept) src_plain.resize(static_cast<size_t>(t.batch * p.in));
    if (dst_kept) dst_plain.resize(static_cast<size_t>(t.batch * p.out));
    tensors plain = t;
    plain.src_kept = plain.dst_kept = false;
    switch (p.dir) {
        case direction::forward:
            if (src_kept) {
                unpack_tiles(t.src, t.batch, p.in, nullptr, src_plain.data(), nt, 1);
                plain.src = src_plain.data();
            }
            if (dst_kept) plain.dst = dst_plain.data();
            break;
        case direction::backward_data:
            if (dst_kept) {
                unpack_tiles(t.diff_dst, t.batch, p.out, nullptr, dst_plain.data(), nt, 1);
                plain.diff_dst = dst_plain.data();
            }
            if (src_kept) plain.diff_src = src_plain.data();
            break;
        case direction::backward_weights:
            if (src_kept) {
                unpack_tiles(t.src, t.batch, p.in, nullptr, src_plain.data(), nt, 1);
                plain.src = src_plain.data();
            }
            if (dst_kept) {
                unpack_tiles(t.diff_dst, t.batch, p.out, nullptr, dst_plain.data(), nt, 1);
                plain.diff_dst = dst_plain.data();
            }
            break;
    }
    const char *ran = run(plain);
    if (p.dir == direction::forward && dst_kept)
        pack_kept(dst_plain.data(), t.batch, p.out, t.dst, nt);
    if (p.dir == direction::backward_data && src_kept)
        pack_kept(src_plain.data(), t.batch, p.in, t.diff_src, nt);
    return ran;
}

} // namespace qsp::detail
