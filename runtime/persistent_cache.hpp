// The on-disk cache (QSP_CACHE_DIR): small entries of data — never machine
// code — that let a restarted or scaled-out process skip work (tuning
// decisions and the timings behind them). One file per entry, named by a
// hash of its key; the file holds the key in full, the writer's library
// version and CPU, and a checksum, and is trusted only when all of them
// match. Writes go to a temporary file renamed into place, so concurrent
// writers and readers see either a whole entry or none.
//
// Entry layout (little endian):
//   "QSPC" | u32 format | u32 kind length, kind | u32 env length, env |
//   u64 key length, key | u64 payload length, payload | u64 checksum
// env = "<library version>;<CPU brand>;<detected ISA>"; the checksum is
// FNV-1a 64 over every byte before it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace qsp::runtime {

// 2: a problem's key is built from problem::fields() (the field list that
// comparison and hashing share); entries of 1 are tuned again once.
constexpr uint32_t persistent_format_version = 2;

// The entry stored for (kind, key), or nothing: no cache, no entry, or an
// entry that is damaged, from another library version, format or CPU, or
// for another key with the same file name (each case a verbose line, and
// the entry is left to be overwritten). Never throws for bad files.
std::optional<std::string> persistent_load(const std::string &kind, const std::string &key);

// Stores payload for (kind, key) atomically; then evicts the least recently
// used entries above the size cap. Failures (read-only or full disk) leave
// the cache as it was and are reported once as a verbose line; never
// throws.
void persistent_store(const std::string &kind, const std::string &key, const std::string &payload);

// "<version>[+<build ID>];<CPU brand>;<detected ISA>": what an entry must
// have been written under (the GNU build ID of the library: a rebuild at
// the same version tunes again).
std::string persistent_environment();

// Tests only: called by persistent_load with the entry's path after the entry
// was read and judged usable, before it is marked recently used (a test
// swaps the name for a link there). nullptr: none.
void set_persistent_load_hook_for_testing(void (*hook)(const std::string &path));

} // namespace qsp::runtime
