"""``neurosim export RUN.h5|DIR [--format csv|parquet] [-o OUTDIR]``: a run file or a sweep folder as tables.

Thin: ``neurosim.analysis.export`` does the work. Writes runs, metrics, events and traces (a sweep: also
summary and summary_table) as CSV, or Parquet where pyarrow is installed; prints the files written.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN.h5|DIR", help="a run file, or a sweep folder (with its summary)")
    parser.add_argument("--format", default="csv", help="csv (default) or parquet (needs pyarrow)")
    parser.add_argument("-o", "--output", metavar="OUTDIR",
                        help="folder for the tables (default: NAME_export in the current folder)")
    parser.add_argument("--series", metavar="NAMES", default=None,
                        help="trace series to export, comma-separated (histogram,weights,pulses,coefficients,"
                             "prelu_slope); 'none' for no traces table; default: all")


def run(args: argparse.Namespace) -> int:
    from neurosim.analysis import export

    path = Path(args.path)
    out = Path(args.output) if args.output else Path(f"{path.name.removesuffix('.h5')}_export")
    series = None
    if args.series is not None:
        series = () if args.series.strip().lower() == "none" else [s.strip() for s in args.series.split(",")
                                                                   if s.strip()]
    for written in export(path, out, args.format, series=series):
        print(written)
    return 0
