#include "primitives/core/kept_layout.hpp"

#include <vector>

#include "primitives/passes/tile_layout.hpp"

namespace qsp::detail {

int64_t kept_elems(int64_t batch, int64_t features) {
    return tiled_elems(batch, features);
}

const char *run_on_plain_layout(const problem &p, const tensors &t, bool src_kept, bool dst_kept,
                                const std::function<const char *(const tensors &)> &run) {
    const int nt = p.num_threads;
    const bool fwd = p.dir == direction::forward, bwd_data = p.dir == direction::backward_data;
    // Each side (src: p.in features, dst: p.out) is read by the direction
    // and unpacked first, or written by it (forward's dst, backward-data's
    // diff_src) and packed after. A side the direction does not take (s8
    // backward-weights reads the workspace, not src) is null: nothing to do.
    const float *src_read = bwd_data ? nullptr : t.src;
    const float *dst_read = fwd ? nullptr : t.diff_dst;
    src_kept = src_kept && (bwd_data || src_read);
    dst_kept = dst_kept && (fwd || dst_read);
    if (!src_kept && !dst_kept) return run(t);
    std::vector<float> src_plain, dst_plain;
    auto plain_of = [&](std::vector<float> &buf, int64_t features, const float *read) {
        buf.resize(static_cast<size_t>(t.batch * features));
        if (read) unpack_tiles(read, t.batch, features, nullptr, buf.data(), nt, 1);
        return buf.data();
    };
    tensors plain = t;
    plain.src_kept = plain.dst_kept = false;
    if (src_kept) {
        float *buf = plain_of(src_plain, p.in, src_read);
        if (bwd_data)
            plain.diff_src = buf;
        else
            plain.src = buf;
    }
    if (dst_kept) {
        float *buf = plain_of(dst_plain, p.out, dst_read);
        if (fwd)
            plain.dst = buf;
        else
            plain.diff_dst = buf;
    }
    const char *ran = run(plain);
    if (bwd_data && src_kept) pack_kept(src_plain.data(), t.batch, p.in, t.diff_src, nt);
    if (fwd && dst_kept) pack_kept(dst_plain.data(), t.batch, p.out, t.dst, nt);
    return ran;
}

} // namespace qsp::detail
