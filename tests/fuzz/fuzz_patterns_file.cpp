// The patterns-file parser of qsp-warmup on arbitrary text: it returns
// layers whose patterns are valid, or throws std::invalid_argument; never a
// crash, an overflow or another exception.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "tools/patterns_file.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const std::string text(reinterpret_cast<const char *>(data), size);
    try {
        for (const auto &l : qsp::tools::parse_patterns(text))
            if (l.pattern.rows() != l.out || l.input_shape.empty()) __builtin_trap();
    } catch (const std::invalid_argument &) {
    }
    try {
        qsp::tools::base64_decode(text, "fuzz");
    } catch (const std::invalid_argument &) {
    }
    return 0;
}
