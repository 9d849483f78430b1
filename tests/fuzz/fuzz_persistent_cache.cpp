// The persistent cache reader on arbitrary entry files: whatever bytes sit
// in an entry's place, loading it must not crash, and check_persistent_cache
// must remove it unless it is a whole, matching entry.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <dirent.h>
#include <unistd.h>

#include "qsparseprop/qsparseprop.hpp"
#include "runtime/persistent_cache.hpp"

namespace {

std::string entry_path; // the file a valid entry for ("fuzz", "key") lives in

void set_up() {
    char tmpl[] = "/tmp/qsp_fuzz_cache_XXXXXX";
    const std::string dir = ::mkdtemp(tmpl);
    qsp::set_persistent_cache_dir(dir + "/cache");
    qsp::runtime::persistent_store("fuzz", "key", "payload");
    DIR *d = ::opendir((dir + "/cache").c_str());
    while (dirent *e = ::readdir(d))
        if (std::string(e->d_name).find(".qspc") != std::string::npos)
            entry_path = dir + "/cache/" + e->d_name;
    ::closedir(d);
    if (entry_path.empty()) std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (entry_path.empty()) set_up();
    FILE *f = std::fopen(entry_path.c_str(), "wb");
    std::fwrite(data, 1, size, f);
    std::fclose(f);
    const auto loaded = qsp::runtime::persistent_load("fuzz", "key");
    const auto other = qsp::runtime::persistent_load("fuzz", "another key");
    if (other) __builtin_trap(); // a different key never matches
    const auto check = qsp::check_persistent_cache();
    if (loaded && check.valid != 1) __builtin_trap(); // what load trusts, check keeps
    return 0;
}
