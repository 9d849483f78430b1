// The state behind every primitive_desc / primitive, and the checks that
// every descriptor constructor shares.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "primitives/core/implementation.hpp"
#include "qsparseprop/tuning.hpp"

namespace qsp::detail {

struct arg_spec {
    int arg;
    const char *name;
    dnnl::memory::desc desc;
    bool required;
};

struct pd_impl {
    const char *primitive_name = "";
    problem prob;
    dnnl::engine engine;
    std::string forced_impl;                     // primitive_attr::implementation
    std::shared_ptr<const tuning_result> tuning; // primitive_attr::tune
    std::string impl_name;
    const implementation *impl = nullptr; // the pick; primitives create its kernel
    std::vector<arg_spec> args;
    dnnl::memory::desc weights_md, workspace_md;
    dnnl::memory::desc src_md, dst_md, bias_md;
    // src (diff_src) / dst (diff_dst) in the kept layout (kept_layout_desc):
    // a property of the memory, not of the problem (plans and tuning
    // decisions serve both layouts).
    bool src_kept = false, dst_kept = false;
    // The pick's kernels read the kept layout themselves (its
    // kept_layout_native, asked once at the pick).
    bool kept_native = false;
    conv2d_geometry geometry{};
    std::vector<post_ops::kind> post_op_chain; // forward only (primitive_attr::ops)
};

// From a validated problem and src/dst/bias descs: derives the weights and
// workspace descs and the argument list of the direction, then picks the
// implementation: the one attr forces, else the tuner's decision for this
// problem (measured now when attr.tune asks and none is stored), else the
// first in list order. Builds nothing.
void finish_pd(pd_impl &pd, const dnnl::engine &engine, const primitive_attr &attr);
// Backward descriptors: the hint must describe the same layer.
void check_hint(const char *primitive_name, const pd_impl &hint, const csr_pattern &weights);

// Checks shared by every primitive_desc constructor. `fallback` is the team
// size when attr leaves it at 0 (forward: omp_get_max_threads(); backward:
// the hint's).
int resolve_num_threads(const primitive_attr &attr, const char *primitive_name, int fallback = 0);
[[noreturn]] void refuse(const char *primitive_name, const std::string &why);
std::string dims_str(const dnnl::memory::dims &d);
// Requires an f32 memory desc of exactly `dims`, dense row-major.
void check_plain_f32(const char *primitive_name, const char *arg_name, const dnnl::memory::desc &md,
                     const dnnl::memory::dims &dims, const char *meaning);

} // namespace qsp::detail
