// What an implementation family gives the core: a kernel that executes one
// problem, and an entry of the implementation list (a name, the reason it
// refuses a problem, and how to create its kernel). The core names no
// implementation; primitives/implementation_list.cpp registers them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "primitives/core/problem.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "runtime/scratch_pool.hpp"

namespace qsp::detail {

struct batch_norm_gradient; // primitives/passes/batch_norm.hpp
struct channel_range;       // primitives/passes/batch_norm.hpp

// A forward whose first post-op is batch_statistics asks for dst's
// per-channel mean and biased variance (range: each channel's lowest and
// highest, or null) here. An implementation that takes them while it writes
// dst fills them and sets `written`; otherwise the core's pass over dst
// finds them after it.
struct dst_statistics_request {
    double *mean = nullptr, *var = nullptr;
    channel_range *range = nullptr;
    bool written = false;
};

// The fused backward (qsp::sparse_backward): the first direction that packs
// dY into a form a kernel family shares records it here, in memory that lives
// for the whole fused execution; the second direction uses it when it needs
// that form (same batch: the descriptors were checked to agree).
struct shared_gradient {
    enum class form {
        none,
        f32_tiles,     // dY in f32 tiles (Linear's f32 SpMM and SDDMM)
        s8_plain_dy_q, // G1 of the s8 protocol as plain int8, like dY; `scale` is sg1
        s8_g1_tiles,   // the same G1 as the SDDMM's u8 tiles (G1 + 128): dY was kept
    };
    runtime::scratchpad scratch;
    form kind = form::none;
    const void *data = nullptr;
    float scale = 0.f;
    // Set before the first direction runs: the form the second direction's
    // kernel reads (kernel::shared_form_read), so the first makes it only
    // when it will be used.
    form wanted = form::none;
    // A dY given as a BatchNorm's backward (QSP_ARG_BN_*): whether the two
    // directions may take it as that (the first rounds it as it computes
    // it, the second reads the shared form), and whether an execution
    // wrote it into DIFF_DST already.
    bool diff_dst_source_taken = false, diff_dst_written = false;
};

// The raw tensors of one execution (already checked against the descriptor).
struct tensors {
    const float *src = nullptr;
    const float *src_abs_max = nullptr; // s8: max |src|, if known (one float)
    // s8 Conv2d forward: src given quantized (QSP_ARG_SRC_S8, _SCALE), src
    // then null; implementations take it through s8::quantized_src.
    const int8_t *src_s8 = nullptr;
    float src_s8_scale = 0.f;
    const float *weights = nullptr;
    const float *bias = nullptr;
    float *dst = nullptr;
    dst_statistics_request *dst_statistics = nullptr; // forward, plain dst only
    s8::workspace_view workspace; // s8 training: the forward's quantized src and weights
    const float *diff_dst = nullptr;
    const float *diff_dst_channel_abs_max = nullptr; // s8: max |diff_dst| per channel, if known
    // s8 Conv2d in a fused backward: diff_dst as the BatchNorm's backward
    // computes it (QSP_ARG_BN_*), never in memory; set only for kernels that
    // read diff_dst through s8::quantize_dx_gradient alone, with the maxima.
    const batch_norm_gradient *diff_dst_source = nullptr;
    float *diff_src = nullptr;
    float *diff_weights = nullptr;
    float *diff_bias = nullptr;
    uint64_t seed = 0;
    int64_t batch = 0; // of this execution (plans may be shared across batch sizes)
    // src / diff_src, dst / diff_dst in the kept layout (kept_layout_desc);
    // set only for implementations that read it themselves (kept_layout_native).
    bool src_kept = false, dst_kept = false;
    shared_gradient *shared = nullptr; // set only inside a fused backward
};

struct kernel {
    virtual ~kernel() = default;
    // Runs the problem; returns the name of what ran when that is not the
    // implementation that created the kernel (e.g. a fallback for one
    // call), else nullptr.
    virtual const char *execute(const tensors &t) const = 0;
    // True when the kernel itself detects a NaN or Inf in its input (f32
    // forward / backward-data), in a pass over the input it makes anyway:
    // it then returns non_finite_input having written no output, and the
    // dense-semantics guard runs the call instead of reading the input a
    // second time to check it.
    virtual bool checks_finite_input() const { return false; }
    // The shared_gradient form this kernel reads when it runs second in a
    // fused backward (none: it reads dY itself).
    virtual shared_gradient::form shared_form_read() const { return shared_gradient::form::none; }
    // True when the kernel reads diff_dst only through
    // s8::quantize_dx_gradient (an s8 backward-data): it may then be given
    // diff_dst as a BatchNorm's backward (tensors::diff_dst_source).
    virtual bool quantizes_diff_dst_only() const { return false; }
    // What was generated for this layer's pattern, if anything (verbose).
    virtual std::string specialisation() const { return {}; }
    // Memory the kernel owns (its plan's arrays, code generated for it
    // alone), for the plan cache's byte bound; shared code is counted by the
    // code caches. Safe to call while the kernel executes.
    virtual size_t memory_bytes() const { return sizeof(*this); }
    // An array (an inline variable: one address in every translation unit),
    // not a pointer to a literal, whose address may differ between them.
    static constexpr char non_finite_input[] = "non-finite input";
};

struct implementation {
    const char *name;
    // Empty when the implementation can run the problem, else the reason it
    // cannot (printed under QSP_VERBOSE=dispatch).
    std::function<std::string(const problem &)> why_not;
    // Builds what executing the problem needs (plans, generated code):
    // called when a primitive is created, not when its descriptor is.
    std::function<std::shared_ptr<const kernel>(const problem &)> create;
    // The portable oracle and fallback: the tuner never times it against
    // the optimised implementations.
    bool is_reference = false;
    // The operation it implements (none: every one). Implementations of
    // another operation are not candidates, and are not listed as refusals.
    std::optional<op_kind> op;
    // Whether its kernels read and write the kept layout (tensors::src_kept /
    // dst_kept) themselves, asked when a descriptor picks it (empty: no);
    // for the others the core converts to and from the plain layout around
    // the call.
    std::function<bool(const problem &)> kept_layout_native;
};

// Ordered by expectation, best first; the first that accepts a problem is
// picked unless the tuner stored another decision. The reference, which
// accepts every valid problem, is last.
const std::vector<implementation> &implementation_list();

struct refusal {
    const char *implementation;
    std::string reason;
};
// The implementations that accept p, in list order; `refusals` (optional)
// collects why the others do not.
std::vector<const implementation *>
accepting_implementations(const problem &p, std::vector<refusal> *refusals = nullptr);

} // namespace qsp::detail
