// Internals shared by all primitives: the problem a descriptor describes, the
// ordered list of implementations and the dispatcher that walks it, and the
// raw tensors an execution hands to a kernel.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "primitives/ref/ref_kernels.hpp"
#include "qsparseprop/primitives.hpp"

namespace qsp::detail {

enum class op_kind { linear, conv2d };
enum class direction { forward, backward_data, backward_weights };

struct problem {
    op_kind op = op_kind::linear;
    direction dir = direction::forward;
    prop_kind prop = prop_kind::forward_training;
    quant_scheme scheme = quant_scheme::f32;
    csr_pattern pattern;
    // Linear: batch x in -> batch x out. Conv2d: conv.
    int64_t batch = 0, in = 0, out = 0;
    ref::conv2d_shape conv{};
    bool with_bias = false;
    int num_threads = 1;

    int64_t src_elems() const;
    int64_t dst_elems() const;
    // Output channels and the size of one channel's slice of dst
    // (Linear: out, 1; Conv2d: OC, OH*OW) and the batch in front of them.
    int64_t channels() const { return op == op_kind::linear ? out : conv.out_c; }
    int64_t channel_inner() const { return op == op_kind::linear ? 1 : conv.out_h * conv.out_w; }
    int64_t outer() const { return op == op_kind::linear ? batch : conv.batch; }
    bool needs_workspace() const {
        return scheme == quant_scheme::s8 && prop == prop_kind::forward_training;
    }
    std::string shape_str() const;
};

// s8 workspace: the quantized src and its scale, which is all that
// backward-weights needs (int8: a quarter of saving the f32 src).
constexpr size_t workspace_header_bytes = 64;
inline size_t workspace_bytes(const problem &p) {
    return workspace_header_bytes + static_cast<size_t>(p.src_elems());
}

struct tensors {
    const float *src = nullptr;
    const float *weights = nullptr;
    const float *bias = nullptr;
    float *dst = nullptr;
    uint8_t *workspace = nullptr;
    const float *diff_dst = nullptr;
    float *diff_src = nullptr;
    float *diff_weights = nullptr;
    float *diff_bias = nullptr;
    uint64_t seed = 0;
    int64_t batch = 0; // of this execution (plans may be shared across batch sizes)
};

struct kernel {
    virtual ~kernel() = default;
    virtual void execute(const tensors &t) const = 0;
};

struct implementation {
    const char *name;
    // Empty when the implementation can run the problem, else the reason it
    // cannot (printed under QSP_VERBOSE=dispatch).
    std::function<std::string(const problem &)> why_not;
    std::function<std::shared_ptr<const kernel>(const problem &)> create;
};

// Ordered fastest first; the reference implementation, which accepts every
// valid problem, is last.
const std::vector<implementation> &implementation_list();

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
    std::string impl_name;
    std::shared_ptr<const kernel> kern;
    std::vector<arg_spec> args;
    dnnl::memory::desc weights_md, workspace_md;
    dnnl::memory::desc src_md, dst_md, bias_md;
    conv2d_geometry geometry{};
};

// Validates the engine, runs the dispatcher and fills impl_name and kern;
// throws std::invalid_argument when nothing accepts the problem.
void dispatch(pd_impl &pd, const dnnl::engine &engine);
// From a validated problem and src/dst/bias descs: derives the weights and
// workspace descs and the argument list of the direction, then dispatches.
void finish_pd(pd_impl &pd, const dnnl::engine &engine);
// Backward descriptors: the hint must describe the same layer.
void check_hint(const char *primitive_name, const pd_impl &hint, const csr_pattern &weights);
dnnl::memory::desc seed_desc();

// Checks shared by every primitive_desc constructor.
int resolve_num_threads(const primitive_attr &attr, const char *primitive_name);
[[noreturn]] void refuse(const char *primitive_name, const std::string &why);
std::string dims_str(const dnnl::memory::dims &d);
// Requires an f32 memory desc of exactly `dims`, dense row-major.
void check_plain_f32(const char *primitive_name, const char *arg_name, const dnnl::memory::desc &md,
                     const dnnl::memory::dims &dims, const char *meaning);
dnnl::memory::desc plain_f32(const dnnl::memory::dims &dims);

} // namespace qsp::detail
