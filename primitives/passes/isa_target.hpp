// Regions of code compiled for one ISA tier, without compiling the whole
// file (or the inline functions of the headers it includes) for it: a
// function that a portable caller may reach must never hold an AVX-512
// instruction. Open a region *after* every #include, close it before the
// end of the file; name every function inside after its tier (`_avx512`,
// `avx512::`), which is what scripts/check_isa_hygiene.py verifies in the
// built library.
#pragma once

#define QSP_ISA_AVX2 "avx2,fma"
#define QSP_ISA_AVX512 "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"

#if defined(__clang__)
#define QSP_PRAGMA(x) _Pragma(#x)
#define QSP_BEGIN_TARGET(isa)                                                                      \
    QSP_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define QSP_END_TARGET _Pragma("clang attribute pop")
#else
#define QSP_PRAGMA(x) _Pragma(#x)
#define QSP_BEGIN_TARGET(isa) _Pragma("GCC push_options") QSP_PRAGMA(GCC target(isa))
#define QSP_END_TARGET _Pragma("GCC pop_options")
#endif
