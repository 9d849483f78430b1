"""Layer benchmark of sparse Linear vs dense PyTorch (fp32 and bf16 autocast).

The benchmark lives in the package so users can run it as
``python -m qsparseprop.bench linear``; this script is the same entry point
for a source checkout:

    .venv/bin/python benchmarks/bench_linear.py --shapes L1 --sparsities 0.9
"""

import sys

from qsparseprop.bench import main

if __name__ == "__main__":
    main(["linear", *sys.argv[1:]])
