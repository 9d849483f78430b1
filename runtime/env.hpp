// Integer settings from the environment, validated once in one way.
#pragma once

#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace qsp::runtime {

// The value of environment variable `name` as an integer in [min, max], or
// `fallback` when it is unset or empty; anything else throws
// std::invalid_argument naming the variable, `what` it counts and the range.
inline long long env_integer(const char *name, long long fallback, long long min, long long max,
                             const char *what) {
    const char *env = std::getenv(name);
    if (!env || !*env) return fallback;
    char *end = nullptr;
    errno = 0;
    const long long v = std::strtoll(env, &end, 10);
    if (errno != 0 || !end || *end != '\0' || v < min || v > max)
        throw std::invalid_argument(std::string(name) + " must be a number of " + what + " in ["
                                    + std::to_string(min) + ", " + std::to_string(max) + "], got '"
                                    + env + "'");
    return v;
}

} // namespace qsp::runtime
