"""The ``qsparseprop`` command.

qsparseprop finetune [...]   # the main job: prune, swap, fine-tune, report
qsparseprop bench linear|conv [...]
qsparseprop memory [...]
qsparseprop demo [...]       # the small digits demo
"""

from __future__ import annotations

import sys

_COMMANDS = {
    "finetune": ("qsparseprop.finetune", "prune, swap and fine-tune on real data, with a report"),
    "bench": ("qsparseprop.bench", "layer benchmark against dense PyTorch"),
    "memory": ("qsparseprop.memory", "what a training step keeps in memory"),
    "demo": ("qsparseprop.demo", "the small digits fine-tune demo"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print(__doc__.strip())
        for name, (_, what) in _COMMANDS.items():
            print(f"  {name:<10} {what}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(_COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
