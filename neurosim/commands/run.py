"""``neurosim run SCENARIO.toml [-o OUT.h5] [--set KEY=VALUE ...] [--quiet]``: one scenario, one run file.

Rerun with the same output to resume an unfinished run from its last complete epoch; a finished run is not
redone. A progress bar (steps, epoch, accuracy, time left) goes to stderr unless ``--quiet``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario file (TOML)")
    parser.add_argument("-o", "--output", default=None, help="run file (default: the scenario's output.path, else "
                        "the scenario file's name with .h5 in the current folder)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (dotted key, TOML value), e.g. --set training.epochs=3; repeatable")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (for scripts)")


def run(args: argparse.Namespace) -> int:
    import sys

    from neurosim.config import parse_sets
    from neurosim.runner import run as run_scenario

    quiet = args.quiet

    def log(line: str) -> None:
        if not quiet:
            print(f"neurosim run: {line}", file=sys.stderr)

    result = run_scenario(args.scenario, args.output, sets=parse_sets(args.sets), progress=not quiet, log=log)
    if not quiet:
        final = result.final
        line = f"{result.path}: {result.epochs} epoch{'' if result.epochs == 1 else 's'}"
        if final:
            line += f", test accuracy {final['test_accuracy']:.3f}"
            if final.get("sim_time_s") == final.get("sim_time_s"):   # not NaN: the clock ran
                line += f", chip time {final['sim_time_s'] * 1e3:.3f} ms, energy {final['energy_j'] * 1e6:.3f} uJ"
        print(line)
    return 0
