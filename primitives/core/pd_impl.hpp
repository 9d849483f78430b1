// The state behind every primitive_desc / primitive, and the checks that
// every descriptor constructor shares.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "primitives/core/implementation.hpp"

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
    std::string forced_impl; // primitive_attr::implementation
    std::string impl_name;
    const implementation *impl = nullptr; // the pick; primitives create its kernel
    std::vector<arg_spec> args;
    dnnl::memory::desc weights_md, workspace_md;
    dnnl::memory::desc src_md, dst_md, bias_md;
    conv2d_geometry geometry{};
};

// From a validated problem and src/dst/bias descs: derives the weights and
// workspace descs and the argument list of the direction, then picks the
// implementation (the tuner's stored decision for this problem, else the
// first in list order). Measures nothing and builds nothing.
void finish_pd(pd_impl &pd, const dnnl::engine &engine);
// Backward descriptors: the hint must describe the same layer.
void check_hint(const char *primitive_name, const pd_impl &hint, const csr_pattern &weights);
dnnl::memory::desc seed_desc();

// Checks shared by every primitive_desc constructor. `fallback` is the team
// size when attr leaves it at 0 (forward: omp_get_max_threads(); backward:
// the hint's).
int resolve_num_threads(const primitive_attr &attr, const char *primitive_name, int fallback = 0);
[[noreturn]] void refuse(const char *primitive_name, const std::string &why);
std::string dims_str(const dnnl::memory::dims &d);
// Requires an f32 memory desc of exactly `dims`, dense row-major.
void check_plain_f32(const char *primitive_name, const char *arg_name, const dnnl::memory::desc &md,
                     const dnnl::memory::dims &dims, const char *meaning);
dnnl::memory::desc plain_f32(const dnnl::memory::dims &dims);

} // namespace qsp::detail
