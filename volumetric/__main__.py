"""``python -m volumetric COMMAND ...``: the console scripts as one module, so that a launcher that
takes a module can start them, e.g. training on 4 GPUs:

    torchrun --nproc_per_node=4 -m volumetric train DATA --output-dir RUN

COMMAND is train, pretrain, plan, evaluate, infer, export, cache or bench; the rest of the line goes to volumetric-COMMAND.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from volumetric.cli import (
    bench_main,
    cache_main,
    evaluate_main,
    export_main,
    infer_main,
    plan_main,
    pretrain_main,
    train_main,
)

COMMANDS = {
    "train": train_main,
    "pretrain": pretrain_main,
    "plan": plan_main,
    "evaluate": evaluate_main,
    "infer": infer_main,
    "bench": bench_main,
    "export": export_main,
    "cache": cache_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(
            f"usage: python -m volumetric {{{','.join(COMMANDS)}}} ...\n"
            f"{given}each command takes the arguments of volumetric-COMMAND (see volumetric-train --help)",
            file=sys.stderr,
        )
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
