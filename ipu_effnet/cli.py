"""The command line: `python -m ipu_effnet <command> [args]`.

Each command lives in its own module under `ipu_effnet/commands/` with two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int          # the exit status

Commands import their heavy dependencies (torch, models) inside `run`, so `--help` and config errors
answer in well under a second. Any `UsageError` (a bad config, path, model name or option, found before
heavy work starts) is printed as one line on stderr and the command exits with status 2; a `RunError`
(a run stopped by a fault: a non-finite loss, a checkpoint that cannot be written) likewise, status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence, Tuple

from ipu_effnet.errors import RunError, UsageError

# (name, module, one-line help). Order is the order `--help` shows.
COMMANDS: List[Tuple[str, str, str]] = [
    ("info", "ipu_effnet.commands.info", "parameters, GMACs and the stage table of a model"),
    ("train", "ipu_effnet.commands.train", "train a recipe (PyTorch backend: CPU/CUDA, DDP under torchrun)"),
    ("finetune", "ipu_effnet.commands.finetune", "fine-tune a checkpoint at a resolution (last layers, eval preprocessing)"),
    ("evaluate", "ipu_effnet.commands.evaluate", "top-1/top-5/loss of a checkpoint at any resolution"),
    ("check", "ipu_effnet.commands.check", "validate a recipe (config + overrides), build its model, print the resolved config"),
    ("plan", "ipu_effnet.commands.plan", "choose pipeline splits for N IPUs and check each stage fits In-Processor Memory"),
    ("sweep", "ipu_effnet.commands.sweep", "top-1 of a checkpoint across test resolutions: sweep.csv, sweep.png"),
    ("compare", "ipu_effnet.commands.compare", "run, sweep and measure several recipes: one table and two plots"),
    ("quickstart", "ipu_effnet.commands.quickstart", "a small recipe comparison on the digits data, on CPU in minutes"),
    ("bench", "ipu_effnet.commands.bench", "measure training/inference images per second, optionally against another configuration"),
    ("export", "ipu_effnet.commands.export", "the inference copy of a run's network as ONNX or TorchScript (dynamic batch)"),
    ("predict", "ipu_effnet.commands.predict", "top-k classes of image files with a run's network"),
    ("study", "ipu_effnet.commands.study", "norms x recipe kinds x seeds over compare: means, spreads and verdicts on the papers' claims"),
    ("download", "ipu_effnet.commands.download", "fetch a public data set (Imagenette 2) over HTTPS and extract it"),
]


def build_parser(commands: Sequence[Tuple[str, str, str]] = COMMANDS) -> Tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="python -m ipu_effnet",
        description="EfficientNet training on Graphcore IPUs and plain PyTorch: G16, GroupNorm/LayerNorm/Proxy Norm, "
                    "half-resolution recipes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name, help_text in commands:
        module = importlib.import_module(module_name)
        cmd_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd_parser)
        modules[name] = module
    return parser, modules


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ipu_effnet.allocator import tune_host_allocator
    from ipu_effnet.console import quiet_other_ranks

    tune_host_allocator()  # before the first large tensor: glibc serves training-step blocks from its heap
    quiet_other_ranks()  # torchrun/poprun: only the main process prints to stdout; all keep stderr
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
