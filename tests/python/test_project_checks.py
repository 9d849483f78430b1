"""The static checks of the test command catch what they claim to catch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import check_isa_hygiene  # noqa: E402
import check_layering  # noqa: E402


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    return tmp_path


def test_layering_flags_an_include_against_the_arrows(tmp_path):
    root = _repo(
        tmp_path,
        {
            "primitives/core/primitive.cpp": '#include "primitives/ref/ref_kernels.hpp"\n',
            "primitives/ref/ref_kernels.hpp": '#include "primitives/sparse_jit/plan_cache.hpp"\n',
            "primitives/sparse_jit/plan_cache.hpp": '#include "primitives/core/problem.hpp"\n',
            "primitives/core/problem.hpp": '#include "qsparseprop/formats.hpp"\n',
            "runtime/cpu_isa.cpp": '#include "jit/jit_generator.hpp"\n',
            "primitives/passes/quantize.cpp": '#include "jit/tile_abi.hpp"\n#include "jit/jit_reduce.hpp"\n',
            "primitives/implementation_list.cpp": '#include "primitives/ref/ref_kernels.hpp"\n',
            "primitives/newthing.cpp": "",
        },
    )
    problems = "\n".join(check_layering.check(root))
    assert "primitives/core/primitive.cpp:1: core may not include primitives/ref/ref_kernels.hpp" in problems
    assert "family:ref may not include primitives/sparse_jit/plan_cache.hpp" in problems
    assert "runtime/cpu_isa.cpp:1: runtime may not include jit/jit_generator.hpp" in problems
    assert "quantize.cpp:2: passes may not include jit/jit_reduce.hpp" in problems
    assert "quantize.cpp:1" not in problems, "passes may use the tile ABI"
    assert "implementation_list.cpp" not in problems, "the list may name every family"
    assert "plan_cache.hpp:1" not in problems, "a family may use the core"
    assert "primitives/newthing.cpp: not in a known room" in problems


def test_layering_of_this_repository_is_clean():
    assert check_layering.check(ROOT) == []


def test_isa_hygiene_flags_avx512_code_outside_its_tier(tmp_path):
    src = tmp_path / "lib.cpp"
    src.write_text(
        "#include <immintrin.h>\n"
        'extern "C" void portable_sum(float *x, int n) { for (int i = 0; i < n; ++i) x[i] += 1.f; }\n'
        '__attribute__((target("avx512f"))) void sum_avx512(float *x) {\n'
        "  _mm512_storeu_ps(x, _mm512_add_ps(_mm512_loadu_ps(x), _mm512_set1_ps(1.f))); }\n"
        '__attribute__((target("avx2"))) void sum_avx2(float *x) {\n'
        "  _mm256_storeu_ps(x, _mm256_add_ps(_mm256_loadu_ps(x), _mm256_set1_ps(1.f))); }\n"
    )
    clean, dirty = tmp_path / "clean.so", tmp_path / "dirty.so"
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", str(src), "-o", str(clean)], check=True)
    # the whole file compiled for AVX-512: the portable loop gets zmm code
    subprocess.run(["g++", "-O3", "-mavx512f", "-shared", "-fPIC", str(src), "-o", str(dirty)], check=True)
    assert check_isa_hygiene.check(str(clean)) == []
    problems = check_isa_hygiene.check(str(dirty))
    assert any("portable_sum" in p and "AVX" in p for p in problems), problems
    assert not any("sum_avx512" in p for p in problems)


def test_the_readme_cpp_example_is_the_program_the_tests_build():
    """The README's C++ block is tests/cmake_consumer/main.cpp (built and run
    by the test command), so it compiles as written."""
    readme = (ROOT / "README.md").read_text()
    main = (ROOT / "tests" / "cmake_consumer" / "main.cpp").read_text()
    body = main[main.index("#include <cmath>") :].rstrip()
    assert "```cpp\n" + body + "\n```" in readme
