// One training step of a sparse layer through the public API, the setup the
// testers and the tier, scheme and fused-backward tests share: forward
// (saving the s8 workspace), then backward-data and backward-weights as two
// primitives or as one qsp::sparse_backward. Generic over Linear / Conv2d:
// layer_t names the three primitive types and builds the forward
// descriptor.
#pragma once

#include <array>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "test_utils.hpp"

namespace qsp::test {

// dY of an s8 Conv2d backward given as its int8 BatchNorm's backward
// (QSP_ARG_BN_*): the BatchNorm's own diff_dst, mask (empty: no ReLU),
// int8 copy and step, and the coefficients a, b, k.
struct batch_norm_dy {
    std::vector<float> diff_dst;
    std::vector<uint8_t> mask;
    std::vector<int8_t> centered;
    std::vector<float> step, coefficients;
};

struct step_options {
    quant_scheme scheme = quant_scheme::f32;
    // Forced for forward and backward-data ("" = the usual pick);
    // backward-weights runs its generic sibling (the SDDMM has no
    // pattern-specialised form) unless weights_implementation names one.
    std::string implementation;
    std::string weights_implementation;
    bool fused = false; // one sparse_backward instead of two primitives
    // backward-weights alone (a network's first layer: no input gradient);
    // dx then stays empty
    bool weights_only = false;
    int threads = 2;
    conv_vectorization vectorization = conv_vectorization::any; // Conv2d only
    bool bias = true;
    uint64_t seed = 77; // rounding seed of the s8 backward
    // QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX of the backward (s8), when given
    const std::vector<float> *dy_channel_abs_max = nullptr;
    // QSP_ARG_SRC_ABS_MAX of the forward (s8), when given
    const float *src_abs_max = nullptr;
    // Conv2d s8: src given quantized (QSP_ARG_SRC_S8, _SCALE; SRC left out),
    // written into the workspace where the forward keeps it, or passed from
    // where it is
    const std::vector<int8_t> *src_s8 = nullptr;
    float src_s8_scale = 0.f;
    bool src_s8_in_workspace = false;
    // Conv2d s8: dY as a BatchNorm's backward (the `dy` argument is then not
    // passed: DIFF_DST is scratch, NaN until something writes dY into it)
    const batch_norm_dy *bn_dy = nullptr;
    // Linear only: src / diff_src, dst / diff_dst in the kept layout
    // (kept_layout_desc). x, dy go in and y, dx come out through oneDNN's
    // reorder, so results compare with a plain step's.
    bool src_kept = false, dst_kept = false;
};

struct step_result {
    std::vector<float> y, dx, dw, db;
    std::vector<uint8_t> workspace; // what the s8 forward saved for the backward
    std::string impl;               // "forward/backward-data/backward-weights"
    bool dy_written = false;        // with bn_dy: whether DIFF_DST (scratch) was written
};

struct linear_layer {
    using fwd_t = sparse_linear_forward;
    using bd_t = sparse_linear_backward_data;
    using bw_t = sparse_linear_backward_weights;
    int64_t batch, in, out;
    bool src_kept = false, dst_kept = false; // kept_layout_desc
    dnnl::memory::desc src_md() const {
        return src_kept ? kept_layout_desc(batch, in) : f32_desc({batch, in});
    }
    dnnl::memory::desc dst_md() const {
        return dst_kept ? kept_layout_desc(batch, out) : f32_desc({batch, out});
    }
    int64_t out_channels() const { return out; }
    fwd_t::primitive_desc forward_desc(const dnnl::engine &eng, const csr_pattern &p,
                                       const dnnl::memory::desc &bias_md, quant_scheme scheme,
                                       const primitive_attr &attr) const {
        return fwd_t::primitive_desc(eng, prop_kind::forward_training, src_md(), p, bias_md,
                                     dst_md(), scheme, attr);
    }
};

struct conv2d_layer {
    using fwd_t = sparse_conv2d_forward;
    using bd_t = sparse_conv2d_backward_data;
    using bw_t = sparse_conv2d_backward_weights;
    int64_t batch, in_c, out_c, h, w;
    conv2d_geometry g;
    std::array<int64_t, 2> out_hw() const { return conv2d_output_hw(g, h, w); }
    dnnl::memory::desc src_md() const { return f32_desc({batch, in_c, h, w}); }
    dnnl::memory::desc dst_md() const {
        const auto o = out_hw();
        return f32_desc({batch, out_c, o[0], o[1]});
    }
    int64_t out_channels() const { return out_c; }
    fwd_t::primitive_desc forward_desc(const dnnl::engine &eng, const csr_pattern &p,
                                       const dnnl::memory::desc &bias_md, quant_scheme scheme,
                                       const primitive_attr &attr) const {
        return fwd_t::primitive_desc(eng, prop_kind::forward_training, src_md(), p, bias_md,
                                     dst_md(), g, scheme, attr);
    }
};

// `plain` (dims of md, 2-D row-major) reordered by oneDNN into a buffer of
// md's size; NaN first, so padding oneDNN leaves unwritten shows.
inline std::vector<float> reordered_into(const std::vector<float> &plain,
                                         const dnnl::memory::desc &md) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    const auto dims = md.get_dims();
    std::vector<float> out(md.get_size() / sizeof(float), NAN);
    dnnl::memory from(f32_desc({dims[0], dims[1], 1}), eng, const_cast<float *>(plain.data()));
    dnnl::memory to(md, eng, out.data());
    dnnl::reorder(from, to).execute(s, from, to);
    return out;
}

// The inverse: md's memory reordered by oneDNN into its plain 2-D form.
inline std::vector<float> reordered_from(const std::vector<float> &blocked,
                                         const dnnl::memory::desc &md) {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    const auto dims = md.get_dims();
    std::vector<float> out(static_cast<size_t>(dims[0] * dims[1]), NAN);
    dnnl::memory from(md, eng, const_cast<float *>(blocked.data()));
    dnnl::memory to(f32_desc({dims[0], dims[1], 1}), eng, out.data());
    dnnl::reorder(from, to).execute(s, from, to);
    return out;
}

// Every lane beyond the batch of a kept buffer is +0.0.
inline void expect_zero_padding(const std::vector<float> &kept, int64_t batch, int64_t features,
                                const char *what) {
    constexpr int64_t lanes = 64; // a tile's examples
    const int64_t tiles = (batch + lanes - 1) / lanes;
    ASSERT_EQ(kept.size(), static_cast<size_t>(tiles * features * lanes)) << what;
    int reported = 0;
    for (int64_t c = 0; c < features; ++c)
        for (int64_t j = batch - (tiles - 1) * lanes; j < lanes; ++j) {
            const float v = kept[static_cast<size_t>(((tiles - 1) * features + c) * lanes + j)];
            if (!(v == 0.f && !std::signbit(v)) && reported++ < 5)
                ADD_FAILURE() << what << ": padding lane " << j << " of feature " << c << " is "
                              << v;
        }
}

template <typename layer_t>
step_result training_step(const layer_t &layer, const csr_weights &w, const std::vector<float> &x,
                          const std::vector<float> &dy, const std::vector<float> &bias,
                          const step_options &o);

// A Linear step with o.src_kept / o.dst_kept: the plain x and dy reordered
// into the kept layout, the step run on them, y and dx reordered back.
inline step_result kept_training_step(linear_layer layer, const csr_weights &w,
                                      const std::vector<float> &x, const std::vector<float> &dy,
                                      const std::vector<float> &bias, step_options o) {
    layer.src_kept = o.src_kept;
    layer.dst_kept = o.dst_kept;
    o.src_kept = o.dst_kept = false;
    const auto src_md = layer.src_md(), dst_md = layer.dst_md();
    step_result r = training_step(layer, w, layer.src_kept ? reordered_into(x, src_md) : x,
                                  layer.dst_kept ? reordered_into(dy, dst_md) : dy, bias, o);
    if (layer.src_kept) {
        expect_zero_padding(r.dx, layer.batch, layer.in, "kept diff_src");
        r.dx = reordered_from(r.dx, src_md);
    }
    if (layer.dst_kept) {
        expect_zero_padding(r.y, layer.batch, layer.out, "kept dst");
        r.y = reordered_from(r.y, dst_md);
    }
    return r;
}

// x: src elements, dy: dst elements, bias: out_channels values (read only
// when o.bias). Outputs start as NaN: an element a kernel forgets to write
// fails every comparison.
template <typename layer_t>
step_result training_step(const layer_t &layer, const csr_weights &w, const std::vector<float> &x,
                          const std::vector<float> &dy, const std::vector<float> &bias,
                          const step_options &o) {
    if constexpr (std::is_same_v<layer_t, linear_layer>) {
        if (o.src_kept || o.dst_kept) return kept_training_step(layer, w, x, dy, bias, o);
    }
    using fwd_t = typename layer_t::fwd_t;
    using bd_t = typename layer_t::bd_t;
    using bw_t = typename layer_t::bw_t;
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    primitive_attr attr;
    attr.num_threads = o.threads;
    attr.implementation = o.implementation;
    attr.vectorization = o.vectorization;
    primitive_attr bw_attr = attr;
    bw_attr.implementation = o.weights_implementation.empty() ? generic_sibling(o.implementation)
                                                              : o.weights_implementation;
    const auto src_md = layer.src_md(), dst_md = layer.dst_md();
    const auto bias_md = o.bias ? f32_desc({layer.out_channels()}) : dnnl::memory::desc();
    const typename fwd_t::primitive_desc fwd =
            layer.forward_desc(eng, w.pattern, bias_md, o.scheme, attr);
    const typename bd_t::primitive_desc bd(eng, src_md, w.pattern, dst_md, fwd, attr);
    const typename bw_t::primitive_desc bw(eng, src_md, w.pattern, bias_md, dst_md, fwd, bw_attr);
    step_result r;
    r.y.assign(dy.size(), NAN);
    r.dx.assign(x.size(), NAN);
    r.dw.assign(w.values.size(), NAN);
    r.db.assign(o.bias ? bias.size() : 0, NAN);
    r.impl = fwd.impl_info_str() + "/" + bd.impl_info_str() + "/" + bw.impl_info_str();
    const auto wmd = fwd.weights_desc();
    std::vector<uint8_t> &ws = r.workspace;
    ws.assign(std::max<size_t>(fwd.workspace_desc().get_size(), 1), 0);
    const bool s8 = o.scheme == quant_scheme::s8;

    exec_args fa{{DNNL_ARG_SRC, wrap(eng, src_md, x.data())},
                 {DNNL_ARG_WEIGHTS, wrap(eng, wmd, w.values.data())},
                 {DNNL_ARG_DST, wrap(eng, dst_md, r.y.data())}};
    if (o.bias) fa[DNNL_ARG_BIAS] = wrap(eng, bias_md, bias.data());
    if (s8) fa[DNNL_ARG_WORKSPACE] = wrap(eng, fwd.workspace_desc(), ws.data());
    if (o.src_abs_max) fa[QSP_ARG_SRC_ABS_MAX] = wrap(eng, src_abs_max_desc(), o.src_abs_max);
    if constexpr (std::is_same_v<layer_t, conv2d_layer>) {
        if (o.src_s8) {
            fa.erase(DNNL_ARG_SRC);
            const int8_t *q = o.src_s8->data();
            if (o.src_s8_in_workspace) {
                int8_t *at = reinterpret_cast<int8_t *>(ws.data() + fwd.workspace_src_s8_offset());
                std::memcpy(at, q, o.src_s8->size());
                q = at;
            }
            const auto dims = src_md.get_dims();
            fa[QSP_ARG_SRC_S8] = wrap(
                    eng,
                    dnnl::memory::desc(dims, dnnl::memory::data_type::s8, src_md.get_strides()), q);
            fa[QSP_ARG_SRC_S8_SCALE] = wrap(eng, src_abs_max_desc(), &o.src_s8_scale);
        }
    }
    fwd_t(fwd).execute(s, fa);

    std::vector<int32_t> seed;
    std::vector<float> dy_scratch(o.bn_dy ? dy.size() : 0, NAN);
    exec_args ba{{DNNL_ARG_DIFF_DST, wrap(eng, dst_md, o.bn_dy ? dy_scratch.data() : dy.data())},
                 {DNNL_ARG_WEIGHTS, wrap(eng, wmd, w.values.data())},
                 {DNNL_ARG_DIFF_SRC, wrap(eng, src_md, r.dx.data())},
                 {DNNL_ARG_DIFF_WEIGHTS, wrap(eng, wmd, r.dw.data())},
                 {QSP_ARG_ROUNDING_SEED, seed_memory(eng, seed, o.seed)}};
    if (o.bias) ba[DNNL_ARG_DIFF_BIAS] = wrap(eng, bias_md, r.db.data());
    if (o.dy_channel_abs_max)
        ba[QSP_ARG_DIFF_DST_CHANNEL_ABS_MAX] =
                wrap(eng, diff_dst_channel_abs_max_desc(layer.out_channels()),
                     o.dy_channel_abs_max->data());
    if (s8)
        ba[DNNL_ARG_WORKSPACE] = wrap(eng, fwd.workspace_desc(), ws.data());
    else
        ba[DNNL_ARG_SRC] = wrap(eng, src_md, x.data());
    if (o.bn_dy) {
        const batch_norm_source_descs d = batch_norm_source_descriptors(dst_md.get_dims());
        ba[QSP_ARG_BN_DIFF_DST] = wrap(eng, d.diff_dst, o.bn_dy->diff_dst.data());
        if (!o.bn_dy->mask.empty()) ba[QSP_ARG_BN_MASK] = wrap(eng, d.mask, o.bn_dy->mask.data());
        if (!o.bn_dy->centered.empty()) // left out: the refusal's test
            ba[QSP_ARG_BN_CENTERED] = wrap(eng, d.centered, o.bn_dy->centered.data());
        ba[QSP_ARG_BN_STEP] = wrap(eng, d.step, o.bn_dy->step.data());
        ba[QSP_ARG_BN_COEFFICIENTS] = wrap(eng, d.coefficients, o.bn_dy->coefficients.data());
    }
    if (o.weights_only) {
        ba.erase(DNNL_ARG_DIFF_SRC);
        bw_t(bw).execute(s, ba);
        r.dx.clear();
    } else if (o.fused) {
        const sparse_backward<bd_t, bw_t> both(bd, bw);
        both.execute(s, ba);
    } else {
        bd_t(bd).execute(s, ba);
        bw_t(bw).execute(s, ba);
    }
    for (const float v : dy_scratch)
        r.dy_written |= !std::isnan(v);
    return r;
}

// f(options) for each ISA tier the CPU has and both Conv2d vectorizations,
// s8, under that tier's cap (a trace names the case).
template <typename F> void for_each_s8_conv_case(F &&f) {
    for (cpu_isa isa : isa_levels())
        for (conv_vectorization v : {conv_vectorization::batch, conv_vectorization::output_width}) {
            isa_cap_guard cap(isa);
            SCOPED_TRACE(std::string(to_string(isa)) + " " + to_string(v));
            step_options o;
            o.scheme = quant_scheme::s8;
            o.vectorization = v;
            f(o);
        }
}

// The same bits (s8 everywhere; f32 where the order of additions is the same).
inline void expect_same_bits(const std::vector<float> &a, const std::vector<float> &b,
                             const char *what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    int reported = 0;
    for (size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0 && reported++ < 5)
            ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

// What the testers share (sparse_linear_tester.hpp, sparse_conv2d_tester.hpp).

// Every ISA tier the CPU has, or the full ISA only where an implementation
// is forced (a capped tier refuses it).
inline std::vector<isa_level> tester_tiers(const step_options &o) {
    if (!o.implementation.empty()) return {{detected_cpu_isa(), true}};
    return isa_levels();
}

// f32: the dense computation in double and the sums of |terms| behind each
// element (the tolerance scales with them, so cancellation is not brittle).
struct f32_oracle {
    std::vector<double> y, y_mag, dx, dx_mag, dw, dw_mag, db, db_mag;
};

// The step on every tier: s8 bit for bit against the reference
// implementation (held to the scheme's integer model in test_s8_scheme.cpp),
// f32 within rounding of `oracle`.
template <typename layer_t>
void expect_step_matches_on_every_tier(const layer_t &layer, const csr_weights &w,
                                       const std::vector<float> &x, const std::vector<float> &dy,
                                       const std::vector<float> &bias, const step_options &o,
                                       const f32_oracle &oracle) {
    step_result want;
    if (o.scheme == quant_scheme::s8) {
        step_options ref = o;
        ref.implementation = "ref:any";
        ref.fused = false;
        want = training_step(layer, w, x, dy, bias, ref);
    }
    for (isa_level isa : tester_tiers(o)) {
        isa_cap_guard cap(isa);
        SCOPED_TRACE(to_string(isa));
        const step_result got = training_step(layer, w, x, dy, bias, o);
        if (o.scheme == quant_scheme::s8) {
            expect_same_bits(got.y, want.y, "forward dst");
            expect_same_bits(got.dx, want.dx, "backward_data diff_src");
            expect_same_bits(got.dw, want.dw, "backward_weights diff_weights");
            expect_same_bits(got.db, want.db, "backward_weights diff_bias");
            continue;
        }
        expect_close(got.y, oracle.y, oracle.y_mag, 1e-5, "forward dst");
        expect_close(got.dx, oracle.dx, oracle.dx_mag, 1e-5, "backward_data diff_src");
        expect_close(got.dw, oracle.dw, oracle.dw_mag, 1e-5, "backward_weights diff_weights");
        if (o.bias)
            expect_close(got.db, oracle.db, oracle.db_mag, 1e-5, "backward_weights diff_bias");
    }
}

} // namespace qsp::test
