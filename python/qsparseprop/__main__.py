"""The ``qsparseprop`` command.

qsparseprop finetune [...]   # the main job: prune, swap, fine-tune, report
qsparseprop bench linear|conv [...]
qsparseprop memory [...]
qsparseprop warmup PATTERNS [--batch ..] [--threads ..] [--jobs N] | --check | --clear
qsparseprop export-patterns MODEL.pt --input-shape N,C,H,W -o PATTERNS
qsparseprop demo [...]       # the small digits demo
"""

from __future__ import annotations

import sys

_COMMANDS = {
    "finetune": ("qsparseprop.finetune", "main", "prune, swap and fine-tune on real data, with a report"),
    "bench": ("qsparseprop.bench", "main", "layer benchmark against dense PyTorch"),
    "memory": ("qsparseprop.memory", "main", "what a training step keeps in memory"),
    "warmup": ("qsparseprop.warmup", "main", "generate, tune and record a model's kernels ahead of a run"),
    "export-patterns": ("qsparseprop.warmup", "export_main", "write a model's sparse layers for warmup"),
    "demo": ("qsparseprop.demo", "main", "the small digits fine-tune demo"),
}


def main(argv: list[str] | None = None) -> None:
    given = argv is not None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print(__doc__.strip())
        for name, (_, _, what) in _COMMANDS.items():
            print(f"  {name:<16} {what}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    module, function, _ = _COMMANDS[argv[0]]
    run = getattr(importlib.import_module(module), function)
    if given:  # called from Python with arguments of its own
        run(argv[1:])
        return
    # The command line is the subcommand's own: its usage lines name it
    # ("qsparseprop bench", not "qsparseprop"), and a subcommand that starts
    # itself again (bench --isa re-executes under oneDNN's cap, which oneDNN
    # reads once) finds its arguments where it looks, in sys.argv. Run with
    # them handed over, `qsparseprop bench --isa ...` skipped the re-exec and
    # measured uncapped, saying nothing.
    sys.argv = [f"qsparseprop {argv[0]}", *argv[1:]]
    run()


if __name__ == "__main__":
    main()
