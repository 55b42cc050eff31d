"""``neurosim study [NAME] [-o DIR] [--full | --ci] [--workers N]``: the source studies (neurosim.studies).

Without NAME: the list (name, title, run time of the default size). With NAME: the study runs its sweeps into
DIR (default: ./NAME) and writes its tables (.md, .csv) and figures (.png) there. Rerun the same command to
finish an interrupted study: finished points are skipped, unfinished ones resume.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="the study to run (omit to list them)")
    parser.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="folder of its sweeps, tables and figures (default: ./NAME)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="the full size (hours; its time is in docs/studies/README.md)")
    size.add_argument("--ci", dest="size", action="store_const", const="ci",
                      help="a few steps of every part (what the tests run; the numbers mean nothing)")
    parser.set_defaults(size="default")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="N local Dask workers for its sweeps (0: one point after another in this process; "
                             "default: each sweep file's sweep.workers)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors and the written files")


def run(args: argparse.Namespace) -> int:
    from neurosim import studies
    from neurosim.config import ConfigError

    if args.name is None:
        found = studies.discover()
        width = max([len("name"), *(len(n) for n in found)])
        print(f"{'name':<{width}}  {'default run':>11}  title")
        for name, module in found.items():
            print(f"{name:<{width}}  {studies.runtime(module):>11}  {module.TITLE}")
        print("\nneurosim study NAME [-o DIR] [--full | --ci] [--workers N]   (docs/studies/README.md)")
        return 0
    module = studies.get(args.name)
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers", args.workers, "must be >= 0")
    out = Path(args.output) if args.output else Path(module.NAME)

    def log(line: str) -> None:
        if not args.quiet:
            print(f"neurosim study {module.NAME}: {line}", file=sys.stderr)

    log(f"{module.TITLE} ({args.size} size, expected {studies.runtime(module, args.size)} on 2 cores) -> {out}")
    start = time.perf_counter()
    try:
        paths = module.run(out, size=args.size, workers=args.workers, progress=not args.quiet, log=log)
    except studies.StudyError as e:
        print(f"neurosim study {module.NAME}: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    log(f"done in {time.perf_counter() - start:.0f} s: {len(paths)} files in {out}")
    return 0
