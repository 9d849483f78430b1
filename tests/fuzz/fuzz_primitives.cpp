// Primitive descriptors from arbitrary shapes, patterns and options (Linear
// and Conv2d: stride, padding, dilation, groups — invalid values included),
// and, where a descriptor is created, a training step (forward, backward-data,
// backward-weights) on the best implementation against the same step with
// the ISA capped to the reference: s8 bit for bit, f32 within rounding.
// Refusals must be std::invalid_argument; nothing may crash or differ.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "qsparseprop/qsparseprop.hpp"

namespace {

using dims = dnnl::memory::dims;

class bytes {
public:
    bytes(const uint8_t *d, size_t n) : d_(d), n_(n) {}
    uint8_t next() { return i_ < n_ ? d_[i_++] : 0; }
    int64_t range(int64_t lo, int64_t hi) { return lo + next() % (hi - lo + 1); }
    bool bit() { return next() & 1; }

private:
    const uint8_t *d_;
    size_t n_, i_ = 0;
};

constexpr auto f32 = &qsp::plain_f32_desc;

struct step {
    std::vector<float> y, dx, dw, db;
};

int64_t elems(const dims &d) {
    int64_t n = 1;
    for (auto v : d)
        n *= v;
    return n;
}

template <typename fwd_t, typename bd_t, typename bw_t> struct family {};

// One training step with descriptors from make_fwd (bd_t / bw_t from its hint).
template <typename fwd_t, typename bd_t, typename bw_t, typename make_t>
step run(family<fwd_t, bd_t, bw_t>, make_t make_fwd, const qsp::csr_pattern &p, const dims &src,
         const dims &dst, bool bias, uint32_t seed) {
    const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    const typename fwd_t::primitive_desc fwd = make_fwd(eng);
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<float> x(elems(src)), dy(elems(dst)), w(p.nnz()), b(dst[1], 0.25f);
    for (auto *v : {&x, &dy, &w})
        for (float &f : *v)
            f = u(rng);
    const auto src_md = f32(src), dst_md = f32(dst), wmd = fwd.weights_desc();
    const auto bias_md = bias ? f32({dst[1]}) : dnnl::memory::desc();
    step r;
    r.y.assign(elems(dst), NAN);
    std::vector<uint8_t> ws(std::max<size_t>(fwd.workspace_desc().get_size(), 1));
    auto mem = [&](const dnnl::memory::desc &md, const void *ptr) {
        return dnnl::memory(md, eng, const_cast<void *>(ptr));
    };
    qsp::exec_args fa{{DNNL_ARG_SRC, mem(src_md, x.data())},
                      {DNNL_ARG_WEIGHTS, mem(wmd, w.data())},
                      {DNNL_ARG_DST, mem(dst_md, r.y.data())}};
    if (bias) fa[DNNL_ARG_BIAS] = mem(bias_md, b.data());
    if (fwd.scheme() == qsp::quant_scheme::s8)
        fa[DNNL_ARG_WORKSPACE] = mem(fwd.workspace_desc(), ws.data());
    fwd_t(fwd).execute(s, fa);
    const typename bd_t::primitive_desc bd(eng, src_md, p, dst_md, fwd);
    const typename bw_t::primitive_desc bw(eng, src_md, p, bias_md, dst_md, fwd);
    r.dx.assign(x.size(), NAN);
    r.dw.assign(w.size(), NAN);
    r.db.assign(bias ? b.size() : 0, NAN);
    int32_t seed_words[2] = {7, 11};
    qsp::exec_args ba{
            {DNNL_ARG_DIFF_DST, mem(dst_md, dy.data())},
            {DNNL_ARG_WEIGHTS, mem(wmd, w.data())},
            {DNNL_ARG_DIFF_SRC, mem(src_md, r.dx.data())},
            {DNNL_ARG_DIFF_WEIGHTS, mem(wmd, r.dw.data())},
            {qsp::QSP_ARG_ROUNDING_SEED, dnnl::memory(qsp::rounding_seed_desc(), eng, seed_words)}};
    if (bias) ba[DNNL_ARG_DIFF_BIAS] = mem(bias_md, r.db.data());
    if (fwd.scheme() == qsp::quant_scheme::s8)
        ba[DNNL_ARG_WORKSPACE] = mem(fwd.workspace_desc(), ws.data());
    else
        ba[DNNL_ARG_SRC] = mem(src_md, x.data());
    bd_t(bd).execute(s, ba);
    bw_t(bw).execute(s, ba);
    return r;
}

void expect_same(const step &a, const step &b, bool exact) {
    auto check = [&](const std::vector<float> &x, const std::vector<float> &y) {
        if (x.size() != y.size()) __builtin_trap();
        float scale = 1;
        for (float v : y)
            scale = std::max(scale, std::fabs(v));
        for (size_t i = 0; i < x.size(); ++i) {
            if (exact ? std::memcmp(&x[i], &y[i], sizeof(float)) != 0
                      : !(std::fabs(x[i] - y[i]) <= 1e-4f * scale * 64))
                __builtin_trap();
        }
    };
    check(a.y, b.y);
    check(a.dx, b.dx);
    check(a.dw, b.dw);
    check(a.db, b.db);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    bytes in(data, size);
    const bool conv = in.bit(), bias = in.bit();
    const auto scheme = in.bit() ? qsp::quant_scheme::s8 : qsp::quant_scheme::f32;
    qsp::primitive_attr attr;
    attr.num_threads = static_cast<int>(in.range(1, 3));
    const int64_t batch = in.range(1, 5);
    int64_t rows = 0, cols = 0;
    dims src, dst;
    qsp::conv2d_geometry g;
    if (!conv) {
        const int64_t k = in.range(1, 40), n = in.range(1, 24);
        rows = n, cols = k, src = {batch, k}, dst = {batch, n};
    } else {
        g.groups = in.range(0, 3); // 0 and non-divisors: refused
        const int64_t ic = in.range(1, 6) * std::max<int64_t>(g.groups, 1),
                      oc = in.range(1, 6) * std::max<int64_t>(g.groups, 1);
        g.kernel_h = in.range(1, 4), g.kernel_w = in.range(1, 4);
        g.stride_h = in.range(0, 3), g.stride_w = in.range(1, 3);
        g.pad_top = in.range(-1, 2), g.pad_left = in.range(0, 2), g.pad_bottom = in.range(0, 2),
        g.pad_right = in.range(0, 2);
        g.dilation_h = in.range(1, 2), g.dilation_w = in.range(0, 2);
        attr.vectorization = static_cast<qsp::conv_vectorization>(in.range(0, 2));
        const int64_t h = in.range(1, 9), w = in.range(1, 9);
        try {
            qsp::check_conv2d_geometry(g, ic, oc);
            const auto hw = qsp::conv2d_output_hw(g, h, w);
            src = {batch, ic, h, w}, dst = {batch, oc, hw[0], hw[1]};
        } catch (const std::invalid_argument &) {
            return 0; // refused, as documented
        }
        rows = oc, cols = ic / g.groups * g.kernel_h * g.kernel_w;
    }
    std::vector<uint8_t> mask(rows * cols);
    const int density = static_cast<int>(in.range(0, 8)); // 0: empty, 8: full
    for (auto &m : mask)
        m = static_cast<uint8_t>(static_cast<int>(in.next() % 8) < density);
    const auto pattern = qsp::csr_pattern::from_mask(mask.data(), rows, cols);
    const uint32_t seed = in.next();

    // Memory descriptors that do not describe the layer (another data type,
    // a wrong size, another rank): creating a descriptor must refuse them
    // with std::invalid_argument, whatever else is right.
    const int corrupt = static_cast<int>(in.range(0, 7)); // 4..7: well-formed
    if (corrupt < 4) {
        const bool on_dst = in.bit();
        dims d = on_dst ? dst : src;
        auto dt = dnnl::memory::data_type::f32;
        if (corrupt == 0)
            dt = in.bit() ? dnnl::memory::data_type::s8 : dnnl::memory::data_type::bf16;
        if (corrupt == 1) d[in.next() % d.size()] += in.bit() ? 1 : -1;
        if (corrupt == 2) d.push_back(1);
        if (corrupt == 3) d.pop_back();
        bool bad_shape = false;
        for (auto v : d)
            bad_shape = bad_shape || v < 1;
        if (bad_shape || d.empty()) return 0; // not a descriptor oneDNN would build
        const dnnl::memory::desc bad(d, dt, f32(d).get_strides()); // plain layout, maybe not f32
        const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
        const auto good_src = f32(src), good_dst = f32(dst);
        const auto bias_md = bias ? f32({dst[1]}) : dnnl::memory::desc();
        try {
            if (!conv)
                qsp::sparse_linear_forward::primitive_desc(
                        eng, qsp::prop_kind::forward_training, on_dst ? good_src : bad, pattern,
                        bias_md, on_dst ? bad : good_dst, scheme, attr);
            else
                qsp::sparse_conv2d_forward::primitive_desc(
                        eng, qsp::prop_kind::forward_training, on_dst ? good_src : bad, pattern,
                        bias_md, on_dst ? bad : good_dst, g, scheme, attr);
        } catch (const std::invalid_argument &) {
            return 0; // refused, as it must be
        }
        // Accepted: only right if the pair still describes this layer — a
        // convolution's input one row shorter can have the same output size.
        bool fits = dt == dnnl::memory::data_type::f32 && conv && d.size() == 4;
        if (fits) {
            const dims s2 = on_dst ? src : d, d2 = on_dst ? d : dst;
            try {
                const auto hw = qsp::conv2d_output_hw(g, s2[2], s2[3]);
                fits = s2[0] == d2[0] && s2[1] == src[1] && d2[1] == dst[1] && hw[0] == d2[2]
                       && hw[1] == d2[3];
            } catch (const std::invalid_argument &) {
                fits = false;
            }
        }
        if (!fits) __builtin_trap(); // a descriptor that does not fit the layer was accepted
    }

    auto both = [&](auto fam, auto make_fwd) {
        step best, ref;
        try {
            best = run(fam, make_fwd, pattern, src, dst, bias, seed);
        } catch (const std::invalid_argument &) {
            return; // refused, as documented
        }
        qsp::set_max_cpu_isa(qsp::cpu_isa::ref);
        ref = run(fam, make_fwd, pattern, src, dst, bias, seed);
        qsp::set_max_cpu_isa(qsp::detected_cpu_isa());
        expect_same(best, ref, scheme == qsp::quant_scheme::s8);
    };
    const auto bias_md = bias ? f32({dst[1]}) : dnnl::memory::desc();
    if (!conv)
        both(family<qsp::sparse_linear_forward, qsp::sparse_linear_backward_data,
                    qsp::sparse_linear_backward_weights>(),
             [&](const dnnl::engine &eng) {
                 return qsp::sparse_linear_forward::primitive_desc(
                         eng, qsp::prop_kind::forward_training, f32(src), pattern, bias_md,
                         f32(dst), scheme, attr);
             });
    else
        both(family<qsp::sparse_conv2d_forward, qsp::sparse_conv2d_backward_data,
                    qsp::sparse_conv2d_backward_weights>(),
             [&](const dnnl::engine &eng) {
                 return qsp::sparse_conv2d_forward::primitive_desc(
                         eng, qsp::prop_kind::forward_training, f32(src), pattern, bias_md,
                         f32(dst), g, scheme, attr);
             });
    return 0;
}
