// The tuner (include/qsparseprop/tuning.hpp): measures the implementations
// that accept a problem and stores the decision that dispatch then reads.
#include "primitives/core/tuner.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "primitives/core/pd_impl.hpp"
#include "primitives/core/s8_protocol.hpp"
#include "qsparseprop/tuning.hpp"
#include "runtime/lru_cache.hpp"
#include "runtime/persistent_cache.hpp"
#include "runtime/verbose.hpp"

namespace qsp {

namespace detail {

namespace {

// A decision holds for one problem at one effective ISA (the cap can
// change while the process runs) and, at avx2, one AVX-VNNI use (the tier's
// int8 kernels differ with it, and so may the fastest implementation).
struct isa_level {
    cpu_isa isa;
    bool avx_vnni;
    bool operator==(const isa_level &o) const { return isa == o.isa && avx_vnni == o.avx_vnni; }
    // the level's number as before AVX-VNNI counted, 16 more with it: an
    // older decision on disk reads as the level without AVX-VNNI, which is
    // where it was made except on CPUs with AVX-VNNI capped to avx2 (there
    // it may be slower, never wrong: a decision only picks among the
    // implementations that accept the problem)
    uint64_t code() const { return static_cast<uint64_t>(isa) + (avx_vnni ? 16 : 0); }
};
isa_level effective_level() {
    const cpu_isa isa = effective_cpu_isa();
    return {isa, isa == cpu_isa::avx2 && avx_vnni_usable()};
}
// A decision serves every batch size in its bucket, the batch rounded up to
// a power of two: a model fed sequences of varying length (a language model
// with dynamic padding) sees a new token count at nearly every step, and
// tuning each (every candidate timed, three directions: ~0.3 s a layer for
// a 768 x 3072 Linear) cost more than the training it served. The batch
// changes which implementation wins over a factor of a few, not between
// neighbours. Only the key is bucketed: the measurements run the problem's
// own shapes, and a stored decision is used only where it accepts them.
problem decision_problem(const problem &p) {
    problem q = p;
    int64_t bucket = 1;
    while (bucket < p.outer() && bucket < (int64_t(1) << 40))
        bucket *= 2;
    (p.op == op_kind::linear ? q.batch : q.conv.batch) = p.outer() > 0 ? bucket : 0;
    return q;
}

struct decision_key {
    problem prob;
    isa_level isa;
    bool operator==(const decision_key &o) const { return isa == o.isa && prob == o.prob; }
};
struct decision_key_hash {
    size_t operator()(const decision_key &k) const { return problem_hash()(k.prob, k.isa.code()); }
};
struct decision {
    std::string impl;
    bool from_disk = false; // read from the persistent cache
};

runtime::lru_cache<decision_key, decision, decision_key_hash> &decision_store() {
    // Decisions are a few bytes that no primitive holds: bounded by count
    // only, or a byte bound of 0 would forget each one as it is made.
    static runtime::lru_cache<decision_key, decision, decision_key_hash> store(
            "tuning_decisions", runtime::default_cache_capacity(), runtime::no_memory_limit);
    return store;
}

// ---- the persistent side ---------------------------------------------------
// Entry kind "tuning"; key: the effective ISA and the problem's bytes (the
// pattern in full); payload: "chosen=<implementation>" and one
// "measured=<implementation>,<median ms>" line per candidate.

std::string disk_key(const problem &p, isa_level isa) {
    return std::string(1, static_cast<char>(isa.code())) + decision_problem(p).key_bytes();
}

std::string disk_payload(const tuning_result &r) {
    std::string s = "chosen=" + r.chosen + "\n";
    for (const auto &m : r.candidates)
        s += "measured=" + m.implementation + "," + std::to_string(m.median_ms) + "\n";
    return s;
}

// The decision on disk for p, if there is one naming an implementation that
// accepts p here (an entry is data from outside: checked, never trusted).
std::shared_ptr<const decision> load_from_disk(const problem &p, isa_level isa) {
    const auto payload = runtime::persistent_load("tuning", disk_key(p, isa));
    if (!payload) return nullptr;
    const std::string prefix = "chosen=";
    const size_t end = payload->find('\n');
    if (payload->compare(0, prefix.size(), prefix) != 0 || end == std::string::npos) {
        if (verbose_level() >= 1)
            runtime::verbose_print("persistent_cache,ignored,tuning decision without a choice");
        return nullptr;
    }
    const std::string name = payload->substr(prefix.size(), end - prefix.size());
    for (const implementation *c : accepting_implementations(p))
        if (!c->is_reference && c->name == name)
            return std::make_shared<const decision>(decision{name, true});
    if (verbose_level() >= 1)
        runtime::verbose_print("persistent_cache,ignored,tuning decision " + name
                               + " is not an implementation that accepts " + p.shape_str());
    return nullptr;
}

// The stored decision for p: in memory, else on disk (then kept in memory).
std::shared_ptr<const decision> find_decision(const problem &p) {
    const decision_key key{decision_problem(p), effective_level()};
    if (auto d = decision_store().find(key)) return d;
    auto d = load_from_disk(p, key.isa);
    if (d) decision_store().put(key, d);
    return d;
}

// Timing needs no better randomness than a 32-bit LCG's: the Mersenne
// twister (through uniform_real_distribution) had spent ~40 % of a tune's
// wall time filling a batch-1000 convolution's buffers (~50 M values).
struct timing_random {
    uint32_t state;
    uint32_t next() { return state = state * 1664525u + 1013904223u; }
    // in [-1, 1): the top 23 bits as the mantissa of a float in [1, 2)
    float next_float() {
        const uint32_t bits = 0x3f800000u | (next() >> 9);
        float one_to_two;
        std::memcpy(&one_to_two, &bits, sizeof one_to_two);
        return 2.f * one_to_two - 3.f;
    }
};

std::vector<float> random_data(int64_t n, timing_random &rng) {
    std::vector<float> v(static_cast<size_t>(std::max<int64_t>(n, 1)));
    for (float &x : v)
        x = rng.next_float();
    return v;
}

// Executions of one problem on random data of its shapes, for timing.
class timing_bench {
public:
    explicit timing_bench(const problem &p) : p_(p) {
        timing_random rng{1};
        src_ = random_data(p.src_elems(), rng);
        dst_ = random_data(p.dst_elems(), rng);
        w_ = random_data(p.pattern.nnz(), rng);
        bias_ = random_data(p.channels(), rng);
        dsrc_ = random_data(p.src_elems(), rng);
        ddst_ = random_data(p.dst_elems(), rng);
        dw_ = random_data(p.pattern.nnz(), rng);
        db_ = random_data(p.channels(), rng);
        // A valid s8 workspace: random Xq and Wq, scales of a unit range.
        ws_.resize(s8::workspace_bytes(p));
        const s8::workspace_view ws{ws_.data(), p};
        for (size_t i = ws.at.src_q; i < ws.at.weight_scale; ++i)
            ws_[i] = static_cast<uint8_t>(rng.next() >> 24);
        ws.set_src_scale(1.f / 127.f);
        std::fill(ws.weight_scale(), ws.weight_scale() + p.channels(), 1.f / 127.f);
        t_.src = src_.data();
        t_.weights = w_.data();
        t_.bias = p.with_bias ? bias_.data() : nullptr;
        t_.dst = dst_.data();
        if (p.scheme == quant_scheme::s8) t_.workspace = ws;
        t_.diff_dst = ddst_.data();
        t_.diff_src = dsrc_.data();
        t_.diff_weights = dw_.data();
        t_.diff_bias = p.with_bias ? db_.data() : nullptr;
        t_.seed = 12345;
        t_.batch = p.outer();
    }

    void warm_up(const kernel &k, int runs) const {
        for (int r = 0; r < runs; ++r)
            k.execute(t_);
    }
    double run_ms(const kernel &k) const {
        const double t0 = runtime::now_ms();
        k.execute(t_);
        return runtime::now_ms() - t0;
    }

private:
    problem p_;
    std::vector<float> src_, dst_, w_, bias_, dsrc_, ddst_, dw_, db_;
    std::vector<uint8_t> ws_;
    tensors t_;
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

} // namespace

std::string stored_decision(const problem &p) {
    auto d = find_decision(p);
    return d ? d->impl : std::string();
}

} // namespace detail

size_t choose_implementation(const std::vector<double> &median_ms, size_t incumbent,
                             double min_gain) {
    if (incumbent >= median_ms.size())
        throw std::invalid_argument("choose_implementation: incumbent index out of range");
    size_t best = incumbent;
    for (size_t i = 0; i < median_ms.size(); ++i)
        if (median_ms[i] < median_ms[best]) best = i;
    // The rival must beat the incumbent clearly, not by noise.
    return median_ms[best] <= median_ms[incumbent] * (1.0 - min_gain) ? best : incumbent;
}

namespace detail {

tuning_result tune_problem(const pd_impl &impl, const tuning_options &options) {
    if (options.warmup_runs < 0 || options.timed_runs < 1)
        throw std::invalid_argument("tune: options need warmup_runs >= 0 and timed_runs >= 1, got "
                                    + std::to_string(options.warmup_runs) + " and "
                                    + std::to_string(options.timed_runs));
    if (!(options.screen_ratio == 0.0 || options.screen_ratio > 1.0))
        throw std::invalid_argument("tune: options.screen_ratio must be 0 (off) or above 1, got "
                                    + std::to_string(options.screen_ratio));
    if (!(options.budget_ms >= 0.0))
        throw std::invalid_argument("tune: options.budget_ms must be >= 0 (0: none), got "
                                    + std::to_string(options.budget_ms));
    if (!(options.min_gain >= 0.0 && options.min_gain < 1.0))
        throw std::invalid_argument("tune: options.min_gain must be in [0, 1), got "
                                    + std::to_string(options.min_gain));
    const problem &p = impl.prob;
    tuning_result r;
    r.primitive = impl.primitive_name;
    r.problem = p.shape_str();
    std::vector<const implementation *> rivals;
    for (const implementation *c : accepting_implementations(p))
        if (!c->is_reference) rivals.push_back(c);
    auto found = find_decision(p);
    if (found && std::none_of(rivals.begin(), rivals.end(), [&](const implementation *c) {
            return c->name == found->impl;
        }))
        found = nullptr; // made for another batch of its bucket, which this one refuses
    const std::string stored = found ? found->impl : std::string();
    r.from_persistent_cache = found && found->from_disk;
    size_t incumbent = 0;
    for (size_t i = 0; i < rivals.size(); ++i)
        if (rivals[i]->name == stored) incumbent = i;
    r.incumbent = rivals.empty() ? impl.impl_name : rivals[incumbent]->name;
    r.chosen = stored.empty() ? r.incumbent : stored;
    if (rivals.size() < 2 || (!stored.empty() && !options.retune)) {
        if (verbose_level() >= 2)
            runtime::verbose_print(std::string("tune,") + r.primitive + "," + r.problem + ","
                                   + (rivals.size() < 2 ? "nothing to compare"
                                      : r.from_persistent_cache
                                              ? "stored decision (persistent cache)"
                                              : "stored decision")
                                   + ",chose " + r.chosen);
        return r;
    }
    const timing_bench bench(p);
    // Screening: every candidate warmed up and timed twice; then only those
    // within screen_ratio of the fastest run on, each up to timed_runs or
    // its budget. The survivors' kernels are kept between the two rounds.
    const int screen_runs = std::min(2, options.timed_runs);
    std::vector<std::shared_ptr<const kernel>> kernels;
    std::vector<double> screen_best; // each candidate's faster screening run
    for (const implementation *c : rivals) {
        kernels.push_back(c->create(p));
        tuning_measurement m;
        m.implementation = c->name;
        bench.warm_up(*kernels.back(), options.warmup_runs);
        for (int i = 0; i < screen_runs; ++i)
            m.runs_ms.push_back(bench.run_ms(*kernels.back()));
        screen_best.push_back(*std::min_element(m.runs_ms.begin(), m.runs_ms.end()));
        r.candidates.push_back(std::move(m));
    }
    const double fastest = *std::min_element(screen_best.begin(), screen_best.end());
    size_t left = 0;
    for (size_t i = 0; i < rivals.size(); ++i) {
        auto &m = r.candidates[i];
        const double best = screen_best[i];
        // (best > fastest: the fastest stays in even where it timed 0 ms)
        m.screened_out = options.screen_ratio > 0 && best > fastest
                         && best >= options.screen_ratio * fastest;
        if (m.screened_out) kernels[i] = nullptr;
        left += !m.screened_out;
    }
    for (size_t i = 0; i < rivals.size() && left > 1; ++i) {
        auto &m = r.candidates[i];
        if (m.screened_out) continue;
        double spent = 0;
        for (double ms : m.runs_ms)
            spent += ms;
        while (static_cast<int>(m.runs_ms.size()) < options.timed_runs
               && !(options.budget_ms > 0 && m.runs_ms.size() >= 3 && spent >= options.budget_ms)) {
            m.runs_ms.push_back(bench.run_ms(*kernels[i]));
            spent += m.runs_ms.back();
        }
        kernels[i] = nullptr;
    }
    std::vector<double> medians;
    for (auto &m : r.candidates)
        medians.push_back(m.median_ms = median(m.runs_ms));
    r.chosen = rivals[choose_implementation(medians, incumbent, options.min_gain)]->name;
    r.measured = true;
    decision_store().put(decision_key{decision_problem(p), effective_level()},
                         std::make_shared<const decision>(decision{r.chosen}));
    runtime::persistent_store("tuning", disk_key(p, effective_level()), disk_payload(r));
    if (verbose_level() >= 2) {
        std::ostringstream line;
        line << "tune," << r.primitive << "," << r.problem << ",threads=" << p.num_threads;
        for (const auto &m : r.candidates)
            line << "," << m.implementation << "=" << m.median_ms << "ms";
        line << ",runs=";
        for (size_t i = 0; i < r.candidates.size(); ++i)
            line << (i ? "/" : "") << r.candidates[i].runs_ms.size()
                 << (r.candidates[i].screened_out ? " (screened out)" : "");
        line << ",incumbent " << r.incumbent << ",chose " << r.chosen;
        runtime::verbose_print(line.str());
    }
    return r;
}

} // namespace detail

tuning_result tune(const primitive_desc_base &pd, const tuning_options &options) {
    return detail::tune_problem(*pd.impl(), options);
}

void clear_tuning_decisions() {
    detail::decision_store().clear();
}

} // namespace qsp
