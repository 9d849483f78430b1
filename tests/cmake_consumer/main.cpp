// The README's C++ example, as a user would write it: prints "ok" when
// the sparse forward equals the dense product.
#include <cmath>
#include <cstdio>
#include <vector>

#include <qsparseprop/qsparseprop.hpp>

int main() {
    const int64_t B = 3, K = 4, N = 2;
    std::vector<float> dense_w = {1, 0, 0, 2, 0, 0, 3, 0}, x(B * K), y(B * N);
    for (int64_t i = 0; i < B * K; ++i)
        x[i] = static_cast<float>(i);
    auto w = qsp::csr_weights::from_dense(dense_w.data(), N, K);
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream s(eng);
    dnnl::memory::desc src_md({B, K}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
    dnnl::memory::desc dst_md({B, N}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
    qsp::sparse_linear_forward::primitive_desc pd(eng, qsp::prop_kind::forward_inference, src_md,
                                                  w.pattern, dst_md, qsp::quant_scheme::f32);
    qsp::sparse_linear_forward(pd).execute(
            s, {{DNNL_ARG_SRC, dnnl::memory(src_md, eng, x.data())},
                {DNNL_ARG_WEIGHTS, dnnl::memory(pd.weights_desc(), eng, w.values.data())},
                {DNNL_ARG_DST, dnnl::memory(dst_md, eng, y.data())}});
    for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
            float want = 0;
            for (int64_t k = 0; k < K; ++k)
                want += dense_w[n * K + k] * x[b * K + k];
            if (std::fabs(want - y[b * N + n]) > 1e-5f) {
                std::printf("mismatch at %ld,%ld\n", static_cast<long>(b), static_cast<long>(n));
                return 1;
            }
        }
    std::printf("ok (%s)\n", pd.impl_info_str().c_str());
    return 0;
}
