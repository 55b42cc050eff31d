"""``neurosim show RUN.h5|DIR``: a run file's key settings and its metrics, without torch (store only); or a
sweep folder's summary table, mean ± std over seeds, sorted by the swept axes (``neurosim.analysis``).

A file that is not a neurosim run file (missing, not HDF5, corrupt, someone else's), or a folder without a
sweep summary, gets one line naming it and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from pathlib import Path
from typing import Any

# Metrics columns of the epoch table: (name, header, scale, format).
COLUMNS = (("epoch", "epoch", 1, "d"), ("stage", "stage", None, "s"), ("train_loss", "train loss", 1, ".4f"),
           ("test_accuracy", "test acc", 1, ".3f"), ("sim_time_s", "chip time (ms)", 1e3, ".3f"),
           ("energy_j", "energy (uJ)", 1e6, ".3f"), ("pulses", "pulses", 1, "d"),
           ("perturbations", "perturbations", 1, "d"), ("wall_time_s", "wall (s)", 1, ".2f"))
TAIL = 10   # epochs shown; earlier ones are summarized in one line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="RUN.h5|DIR", help="run file (.h5) written by neurosim run, or a sweep folder")


def _get(table: Any, dotted: str, default: Any = "") -> Any:
    for part in dotted.split("."):
        if not isinstance(table, dict) or part not in table:
            return default
        table = table[part]
    return table


def _cell(value: Any, scale: float | None, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"   # not measured (training.clock = false)
    if scale not in (None, 1):
        value = value * scale
    try:
        return format(value, fmt)
    except (ValueError, TypeError):
        return str(value)


def _table(history: list[dict[str, Any]]) -> list[str]:
    cols = [c for c in COLUMNS if c[0] in history[0] and (c[0] != "stage" or any(r["stage"] for r in history))]
    cells = [[_cell(row[name], scale, fmt) for name, _, scale, fmt in cols] for row in history]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, (_, h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (_, h, _, _), w in zip(cols, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return lines


def _settings(f) -> list[tuple[str, Any]]:
    a = f.attrs
    try:
        scenario = tomllib.loads(f.scenario_toml)
    except tomllib.TOMLDecodeError:
        scenario = {}
    planned = a.get("epochs_planned", "?")
    state = "complete" if f.complete else f"unfinished: {f.epochs} of {planned} epochs (rerun it to resume)"
    card = str(a.get("card") or _get(scenario, "device.card"))
    overrides = _get(scenario, "device.overrides", {})
    if overrides:
        card += " with " + ", ".join(f"{k} = {v}" for k, v in overrides.items())
    hidden = f" ({a['hidden']})" if a.get("hidden") else ""
    t = _get(scenario, "training", {})
    return [("file", f"{f.path} ({state})"),
            ("scenario", a.get("name") or "-"),
            ("device card", card),
            ("network", f"{a.get('architecture', '?')}{hidden}, {a.get('data', '?')} "
                        f"({a.get('train_samples', '?')} train / {a.get('test_samples', '?')} test)"),
            ("training", f"{a.get('scheme', '?')}, {planned} epoch{'' if planned == 1 else 's'}, "
                         f"batch {_get(t, 'batch_size', '?')}, "
                         f"learning rate {_get(t, 'learning_rate', '?')}, momentum {_get(t, 'momentum', '?')}"),
            ("seed", a.get("seed", "?")),
            ("ran on", f"{a.get('device', '?')}, neurosim {a.get('neurosim_version', '?')}, torch "
                       f"{a.get('torch_version', '?')}, created {a.get('created_utc', '?')}"
                       + (f", resumed {a['resumed']}x" if a.get("resumed") else ""))]


def run(args: argparse.Namespace) -> int:
    from neurosim.store import METRICS, RunFile

    if Path(args.file).is_dir():
        from neurosim.analysis import summary_lines

        print("\n".join(summary_lines(args.file)))
        return 0
    f = RunFile(args.file)
    rows = _settings(f)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    history = f.history
    if not history:
        print("\nno epoch finished yet")
        return 0
    lines = _table(history)
    print()
    print(lines[0])
    if len(history) > TAIL:
        print(f"({len(history) - TAIL} earlier epochs not shown)")
    print("\n".join(lines[1:][-TAIL:]))
    final = history[-1]
    print("\nfinal metrics:")
    width = max(len(k) for k in final)
    for key, value in final.items():
        if key in ("epoch", "stage") or key.startswith("delta_"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.6g}"
        units = METRICS.get(key, ("", ""))[0]
        print(f"  {key:<{width}}  {value}" + (f" {units}" if units and units != "1" else ""))
    return 0
