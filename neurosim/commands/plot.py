"""``neurosim plot RUN.h5 [RUN.h5 ...]|DIR [-o FIG.png|.svg|.pdf] [--second time|energy]``.

Thin: ``neurosim.analysis.plot`` draws it. A run: learning curves and the chip's time and energy per epoch. A
sweep folder: final test accuracy against the swept axis, a line per combination of the other swept keys,
mean ± std over seeds, beside the chip's time (or energy).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="RUN.h5|DIR", help="run files (one line each), or one sweep "
                        "folder")
    parser.add_argument("-o", "--output", metavar="FIG", help="the figure: .png, .svg or .pdf (default: NAME.png "
                        "in the current folder)")
    parser.add_argument("--second", default="time", help="a sweep's second panel: time (chip time, s, log scale; "
                        "default) or energy (J)")


def run(args: argparse.Namespace) -> int:
    from neurosim.analysis import plot

    first = Path(args.paths[0])
    out = Path(args.output) if args.output else Path(f"{first.name.removesuffix('.h5')}.png")
    plot(args.paths if len(args.paths) > 1 else first, out, second=args.second)
    print(out)
    return 0
