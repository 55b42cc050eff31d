"""``neurosim sweep SCENARIO.toml [--grid KEY=V1,V2,...]... [--seeds N] [--workers N | --scheduler ADDRESS]
[-o DIR]``: every point of a grid, one run file each, and a summary table (neurosim.sweep).

Rerun the same command into the same folder to finish an interrupted sweep: finished points are skipped,
unfinished ones resume from their checkpoints. A progress bar of points (done, running, left, time left) goes
to stderr unless ``--quiet``. Exit status 1 if a point failed (the others ran; rerun to try it again).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario file (TOML); its [sweep] table gives the default grid and seeds")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="an axis: a dotted field or a link's name and its values (TOML literals, comma "
                             "separated; commas inside [] or quotes do not split), e.g. --grid variation=0,0.1,0.3; "
                             "replaces the [sweep] table's axis of that key or adds one; repeatable")
    parser.add_argument("--seeds", type=int, default=None, metavar="N",
                        help="seeds per grid point: the scenario's seed, seed+1, ..., seed+N-1 (default: "
                             "sweep.seeds, else 1)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the base scenario (dotted key, TOML value); repeatable")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the points on N local Dask workers (0: one after another in this process; "
                            "default: sweep.workers, else 0)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the points on the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786); "
                            "its workers need no access to DIR")
    parser.add_argument("--executor", default="dask", choices=("dask", "processes"),
                        help="what runs the points with --workers N: Dask (default) or local processes")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="sweep folder (default: the scenario file's name without .toml, in the current folder)")
    parser.add_argument("--plot", default=None, metavar="FIG.png",
                        help="after the sweep, plot its summary (neurosim.analysis.plot)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and exit (nothing is run or written)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (for scripts)")


def run(args: argparse.Namespace) -> int:
    from neurosim.analysis import plot, summary_lines
    from neurosim.config import ConfigError, parse_sets
    from neurosim.sweep import parse_grid, plan, run_sweep

    quiet = args.quiet

    def log(line: str) -> None:
        if not quiet:
            print(f"neurosim sweep: {line}", file=sys.stderr)

    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds", args.seeds, "must be >= 1")
    the_plan = plan(args.scenario, grid=parse_grid(args.grid), seeds=args.seeds, sets=parse_sets(args.sets))
    if args.dry_run:
        for point in the_plan.points:
            print(point.name)
        log(f"{len(the_plan.points)} points ({', '.join(the_plan.axes) or 'seeds only'}; "
            f"{the_plan.base.sweep.seeds} seed{'s' * (the_plan.base.sweep.seeds != 1)} each)")
        return 0
    result = run_sweep(the_plan, args.output, workers=args.workers, scheduler=args.scheduler,
                       executor=args.executor, progress=not quiet, log=log)
    folder = result.folder
    if not quiet:
        print(f"{folder}: {len(result.rows)} of {len(the_plan.points)} points done ({len(result.ran)} run now); "
              f"summary in {folder / 'summary.csv'} and {folder / 'summary.h5'}")
        if result.rows:
            try:
                print("\n".join(summary_lines(folder)))
            except ConfigError as e:   # the sweep is done and kept: one line, not a traceback
                log(f"no summary table ({e})")
    if args.plot and result.rows:
        plot(folder, args.plot)
        log(f"plot written to {args.plot}")
    if result.failed:
        for name, line in result.failed.items():
            print(f"neurosim sweep: point {name} failed: {line}", file=sys.stderr)
        print(f"neurosim sweep: {len(result.failed)} point{'s' * (len(result.failed) != 1)} failed; rerun the same "
              "command to try them again", file=sys.stderr)
        return 1
    return 0
