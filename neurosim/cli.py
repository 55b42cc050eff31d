"""The ``neurosim`` command. Thin: each subcommand parses arguments and calls the library.

A user error (bad card, bad setting, missing file) prints one line on stderr naming the file, field and
value, and exits with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from neurosim.config import ConfigError

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "devices": ("neurosim.commands.devices", "list the shipped device cards, or validate and show a card file"),
    "crossbar": ("neurosim.commands.crossbar", "read and program one crossbar tile of a device, and report errors"),
    "activations": ("neurosim.commands.activations", "tabulate (and plot) exact, Taylor and PWL neuron circuits"),
    "demo": ("neurosim.commands.demo", "train an MLP on-chip with BP, DGC and hybrid at several variation levels"),
    "run": ("neurosim.commands.run", "run a scenario into one HDF5 run file (rerun to resume an unfinished one)"),
    "sweep": ("neurosim.commands.sweep", "run a grid of settings and seeds: a run file per point and a summary"),
    "show": ("neurosim.commands.show", "print a run file's key settings and metrics, or a sweep's summary table"),
    "validate": ("neurosim.commands.validate", "check a scenario file (and --set overrides) without running it"),
    "export": ("neurosim.commands.export", "write a run file or a sweep folder as CSV (or Parquet) tables"),
    "fit-device": ("neurosim.commands.fit_device", "fit a device card to measured potentiation/depression pulse data"),
    "plot": ("neurosim.commands.plot", "plot a run's learning curves, or a sweep's accuracy against its axis"),
    "study": ("neurosim.commands.study", "list the source studies, or run one: its sweeps, tables and figures"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neurosim", description="Simulator of neuromorphic analog hardware.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.version:
        from neurosim import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    from neurosim.backend import tune_allocator

    tune_allocator()  # the command owns its process (see tune_allocator)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ConfigError as e:
        print(f"neurosim {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`neurosim show RUN.h5 | head`): nothing left to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"neurosim {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
