#include "runtime/kernel_cache.hpp"

#include <sstream>

namespace qsp::runtime {

std::string kernel_key::str() const {
    std::ostringstream s;
    s << op << ",dir=" << direction << ",shape=";
    for (size_t i = 0; i < shape.size(); ++i)
        s << (i ? "x" : "") << shape[i];
    s << ",scheme=" << scheme << ",isa=" << isa << ",threads=" << threads << ",pattern=" << std::hex
      << pattern_hash;
    return s.str();
}

size_t kernel_key_hash::operator()(const kernel_key &k) const {
    uint64_t h = std::hash<std::string>()(k.op) ^ (k.pattern_hash * 0x9e3779b97f4a7c15ull);
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(static_cast<uint64_t>(k.direction));
    for (int64_t d : k.shape)
        mix(static_cast<uint64_t>(d));
    mix(static_cast<uint64_t>(k.scheme));
    mix(static_cast<uint64_t>(k.isa));
    mix(static_cast<uint64_t>(k.threads));
    return static_cast<size_t>(h);
}

size_t default_cache_capacity() {
    const char *env = std::getenv("QSP_CACHE_CAPACITY");
    if (!env || !*env) return 1024;
    char *end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    return (end && *end == '\0' && v >= 0) ? static_cast<size_t>(v) : 1024;
}

} // namespace qsp::runtime
