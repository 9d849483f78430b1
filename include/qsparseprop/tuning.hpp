// The tuner: a step of its own, apart from creating descriptors. Where
// several implementations accept a layer's problem in one direction (say
// the sparse VNNI JIT and oneDNN's dense int8 matmul for an s8 Linear), it
// times each on data of the problem's shapes, keeps the incumbent unless a
// rival is clearly faster, and stores the decision; descriptors created
// afterwards for the same problem pick it, and so do those of the same
// problem at another batch size of its bucket (the batch rounded up to a
// power of two: a language model's token counts change at every step). The
// decision store is an in-memory LRU (cache "tuning_decisions") keyed by
// the whole problem: pattern (compared in full), shapes (the batch by its
// bucket), scheme, direction, threads and ISA;
// decisions also go to the persistent cache (runtime.hpp), from which a
// later process reads them instead of measuring again.
//
//   qsp::sparse_linear_forward::primitive_desc pd(...);   // picks, measures nothing
//   qsp::tuning_result r = qsp::tune(pd);                 // measures, stores
//   qsp::sparse_linear_forward::primitive_desc tuned(...); // same args: picks r.chosen
//
// or in one step: primitive_attr::tune makes the descriptor measure while it
// is created and pick the winner (pd.tuning() is then r).
//
// QSP_VERBOSE=dispatch prints every measurement and decision.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "qsparseprop/primitives.hpp"

namespace qsp {

struct tuning_options {
    int warmup_runs = 2; // untimed runs per candidate (caches, page faults, code)
    int timed_runs = 7;  // timed runs per candidate at most; their median counts
    // Screening: after its warm-up and its first two timed runs, a candidate
    // whose faster run took at least screen_ratio times the fastest
    // candidate's faster run is out, its median that of those two runs: a
    // rival four times slower loses after two runs instead of seven (at
    // batch 1000 a losing convolution's run takes 50-80 ms). Where one
    // candidate is left, nothing more is timed. 0: every candidate runs
    // timed_runs.
    double screen_ratio = 1.5;
    // A candidate still in stops after three timed runs once they have taken
    // budget_ms together: the median of a 40 ms kernel needs no seven runs.
    // 0: no budget, timed_runs each.
    double budget_ms = 100.0;
    // A rival replaces the incumbent only when its median is at least this
    // fraction lower: near-ties keep the incumbent, so decisions do not flip
    // with noise.
    double min_gain = 0.10;
    // Measure even when a decision is stored (the stored one is then the
    // incumbent).
    bool retune = false;
};

struct tuning_measurement {
    std::string implementation;
    double median_ms = 0;
    std::vector<double> runs_ms; // fewer than timed_runs: screened out, or out of budget
    bool screened_out = false;
};

struct tuning_result {
    std::string primitive; // "sparse_linear_forward", ...
    std::string problem;   // shapes, density, nnz
    std::string incumbent; // the stored decision, else the first accepting in list order
    std::string chosen;
    bool measured = false; // false: a stored decision was reused, or nothing to compare
    bool from_persistent_cache = false;         // the reused decision was read from disk
    std::vector<tuning_measurement> candidates; // empty unless measured
};

// Compares the implementations that accept pd's problem (the reference
// never competes) and stores the decision. Thread-safe; throws
// std::invalid_argument for bad options.
tuning_result tune(const primitive_desc_base &pd, const tuning_options &options = {});

// The decision rule alone: the index of the candidate to keep given the
// medians, the incumbent's index and min_gain.
size_t choose_implementation(const std::vector<double> &median_ms, size_t incumbent,
                             double min_gain);

// Forgets every stored decision.
void clear_tuning_decisions();

} // namespace qsp
