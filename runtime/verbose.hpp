// Verbose output in the spirit of ONEDNN_VERBOSE: one comma-separated line
// per event on stdout, prefixed "qsp_verbose,".
#pragma once

#include <chrono>
#include <string>

namespace qsp::runtime {

void verbose_print(const std::string &line);

inline double now_ms() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

} // namespace qsp::runtime
