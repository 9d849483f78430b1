#include "primitives/sparse_jit/spmm_runner.hpp"

#include <algorithm>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>

#include <omp.h>

#include "jit/tile_abi.hpp"
#include "primitives/sparse_jit/jit_plan.hpp"
#include "runtime/verbose.hpp"

namespace qsp::detail {

namespace {

int32_t checked_i32(int64_t v, const char *what) {
    if (v < 0 || v > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument(std::string("sparse JIT schedule: ") + what + " "
                                    + std::to_string(v) + " outside the 32-bit range");
    return static_cast<int32_t>(v);
}

} // namespace

std::string why_not_pattern_specialised(const problem &p) {
    if (p.dir == direction::backward_weights)
        return "backward-weights runs the SDDMM, which has no pattern-specialised code";
    if (p.pattern.nnz() > std::numeric_limits<int32_t>::max())
        return "more than 2^31 nonzeros: the schedule indexes them in 32 bits";
    return "";
}

spmm_schedule::spmm_schedule(const std::vector<int64_t> &bounds, const source_groups &groups,
                             int64_t dst_row_bytes) {
    const int64_t n_groups = groups.n, stride = n_groups + 1;
    const int parts = static_cast<int>(bounds.size()) - 1;
    std::vector<int64_t> seen;
    row_at.push_back(0);
    bucket_at.push_back(0);
    std::vector<std::vector<int64_t>> by_length;
    for (int part = 0; part < parts; ++part)
        for (int64_t g = 0; g < n_groups; ++g) {
            // counting sort by length; within a length, rows ascend (the
            // destination rows are written in order)
            for (auto &b : by_length)
                b.clear();
            for (int64_t r = bounds[part]; r < bounds[part + 1]; ++r) {
                const int64_t begin = groups.ptr[r * stride + g];
                const int64_t length = groups.ptr[r * stride + g + 1] - begin;
                if (length == 0 && g > 0) continue; // its stored sums stay
                if (static_cast<int64_t>(by_length.size()) <= length)
                    by_length.resize(static_cast<size_t>(length) + 1);
                by_length[length].push_back(r);
            }
            for (int64_t length = 0; length < static_cast<int64_t>(by_length.size()); ++length) {
                const auto &rs = by_length[length];
                if (rs.empty()) continue;
                for (int64_t r : rs) {
                    const int64_t first = groups.ptr[r * stride + g];
                    rows.push_back(checked_i32(static_cast<int64_t>(order.size()), "item slot"));
                    rows.push_back(checked_i32(first, "item index"));
                    rows.push_back(checked_i32(r * dst_row_bytes, "destination offset"));
                    rows.push_back(0);
                    for (int64_t k = 0; k < length; ++k)
                        order.push_back(first + k);
                }
                buckets.push_back(checked_i32(length, "segment length"));
                buckets.push_back(checked_i32(static_cast<int64_t>(rs.size()), "bucket size"));
                if (length > 0) seen.push_back(length);
            }
            row_at.push_back(static_cast<int64_t>(rows.size()) / jit::spmm_schedule_record_ints);
            bucket_at.push_back(static_cast<int64_t>(buckets.size()) / 2);
        }
    rows.resize(rows.size() + jit::spmm_schedule_record_ints * jit::spmm_schedule_prefetch_rows, 0);
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    lengths = std::move(seen);
}

spmm_runner::spmm_runner(cpu_isa isa, jit::sparse_dtype dtype, const std::vector<int64_t> &bounds,
                         source_groups groups, bool specialise, jit::s8_word word)
    : bounds_(bounds), groups_(std::move(groups)), lanes_(jit::vector_lanes(isa)), isa_(isa),
      dtype_(dtype), word_(word) {
    const int full = jit::tile_batch / lanes_;
    if (!specialise) {
        for (int nv = 1; nv <= full; ++nv)
            generic_.push_back(jit::spmm_kernel(kernel_params(nv)));
        return;
    }
    const double t0 = runtime::now_ms();
    schedule_ = std::make_unique<spmm_schedule>(bounds_, groups_, jit::tile_row_bytes);
    std::vector<int64_t>().swap(groups_.ptr); // the schedule holds the segments now
    shape_.lengths = schedule_->lengths;
    pattern_ = std::vector<pattern_slot>(static_cast<size_t>(full));
    const auto &code = pattern_code(full); // whole tiles now; a batch tail on first use
    const auto exact = jit::exact_body_lengths(code->params(), shape_);
    std::ostringstream s;
    s << "groups=" << groups_.n << "x" << groups_.size << ",lengths=" << shape_.lengths.size();
    if (!exact.empty())
        s << ",exact=" << exact.front() << ".." << exact.back() << "(" << exact.size() << ")";
    else
        s << ",exact=none";
    s << ",code_bytes=" << code->code_size() << ",generate_ms=" << runtime::now_ms() - t0;
    specialisation_ = s.str();
}

jit::sparse_kernel_params spmm_runner::kernel_params(int nv) const {
    jit::sparse_kernel_params params = jit::make_sparse_kernel_params(isa_, dtype_, nv);
    params.word = word_;
    return params;
}

const std::shared_ptr<const jit::jit_spmm_pattern_kernel> &spmm_runner::pattern_code(int nv) const {
    pattern_slot &slot = pattern_[static_cast<size_t>(nv - 1)];
    std::call_once(slot.once, [&] {
        const double t0 = runtime::now_ms();
        slot.code = jit::spmm_pattern_kernel(kernel_params(nv), shape_);
        pattern_bytes_ += slot.code->memory_bytes();
        // whole tiles are reported with the plan; a batch tail's code here
        if (nv != static_cast<int>(pattern_.size()) && verbose_level() >= 1)
            runtime::verbose_print("jit,code," + slot.code->name() + ",batch_tail,code_bytes="
                                   + std::to_string(slot.code->code_size())
                                   + ",generate_ms=" + std::to_string(runtime::now_ms() - t0));
    });
    return slot.code;
}

std::vector<int64_t> spmm_runner::take_item_order() {
    return schedule_ ? std::move(schedule_->order) : std::vector<int64_t>{};
}

void spmm_runner::run(int64_t batch, const void *values, const int32_t *offsets, const uint8_t *src,
                      int64_t src_tile_bytes, uint8_t *dst, int64_t dst_tile_bytes,
                      int num_threads) const {
    const int64_t tiles = jit::tile_count(batch);
    if (tiles == 0) return;
    // The code for the batch tail (the last tile's vectors), generated here
    // on first use: outside the parallel region, where a failure can throw.
    if (schedule_) pattern_code(jit::tile_vectors(batch, tiles - 1, lanes_));
    for_parts_and_tiles(bounds_, tiles, num_threads, [&](int part, int64_t tile) {
        const uint8_t *s = src + tile * src_tile_bytes;
        uint8_t *d = dst + tile * dst_tile_bytes;
        const int nv = jit::tile_vectors(batch, tile, lanes_);
        if (!schedule_) {
            jit::spmm_call_params c{values,
                                    offsets,
                                    groups_.ptr.data(),
                                    groups_.n,
                                    bounds_[part],
                                    bounds_[part + 1],
                                    s,
                                    d};
            (*generic_[nv - 1])(c);
            return;
        }
        const spmm_schedule &sc = *schedule_;
        const auto &code = *pattern_[static_cast<size_t>(nv - 1)].code;
        for (int64_t g = 0; g < groups_.n; ++g) {
            const int64_t k = part * groups_.n + g;
            jit::spmm_schedule_call_params c{
                    values,
                    offsets,
                    sc.rows.data() + jit::spmm_schedule_record_ints * sc.row_at[k],
                    sc.buckets.data() + 2 * sc.bucket_at[k],
                    sc.bucket_at[k + 1] - sc.bucket_at[k],
                    g == 0 ? 1 : 0,
                    s,
                    d};
            code(c);
        }
    });
}

} // namespace qsp::detail
