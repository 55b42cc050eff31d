"""``neurosim demo``: BP, DGC and hybrid training of an MLP on the bundled digits at a few variation levels.

The demo is the shipped scenario ``variation_tolerance`` (scenarios/variation_tolerance.toml, installed with
the package) at a few points of its ``variation`` link and of the training scheme, each point a run of the
runner (one run file each, in a temporary folder unless ``--keep DIR``). One variation level σ sets every
device-to-device spread of the card and the mismatch of the neuron and derivative circuits: the experiment of
Kim et al. 2021 in miniature. The table shows what a user of this simulator asks: how accurate, how long on
the chip, how much energy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from neurosim.config import ConfigError
from neurosim.runner import run as run_scenario
from neurosim.scenario import apply_sets, load_scenario, shipped_scenario_paths

SCHEMES = ("bp", "dgc", "hybrid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller grid that finishes in under a minute")
    parser.add_argument("--device-card", default="ecram_liwo3", help="shipped card name or card file")
    parser.add_argument("--levels", default=None, help="variation levels, comma separated (default 0,0.1,0.3)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="schemes, comma separated")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5, quick 3)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden-layer width of the MLP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the run files in DIR (rerun: resumes)")


def _parse_list(text: str, field: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(field, text, "must be a comma-separated list") from None
    if not values:
        raise ConfigError(field, text, "must not be empty")
    return values


def run(args: argparse.Namespace) -> int:
    levels = _parse_list(args.levels, "--levels") if args.levels else ([0.0, 0.3] if args.quick else
                                                                       [0.0, 0.1, 0.3])
    if any(v < 0 for v in levels):
        raise ConfigError("--levels", args.levels, "variation levels must be >= 0")
    schemes = _parse_list(args.schemes, "--schemes", str)
    for s in schemes:
        if s not in SCHEMES:
            raise ConfigError("--schemes", s, f"must be among {', '.join(SCHEMES)}")
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 5)
    if epochs < 1 or args.hidden < 1:
        raise ConfigError("--epochs" if epochs < 1 else "--hidden", epochs if epochs < 1 else args.hidden,
                          "must be >= 1")
    card = args.device_card
    if Path(card).suffix == ".toml":
        card = str(Path(card).expanduser().resolve())
    base = load_scenario(shipped_scenario_paths()["variation_tolerance"])
    common = {"seed": args.seed, "runtime.device": args.device, "network.hidden": [args.hidden],
              "training.epochs": epochs, "device.card": card, **({"data.limit": 720} if args.quick else {})}
    first = apply_sets(base, {**common, "variation": levels[0], "training.scheme": schemes[0]})
    spec = first.card()
    with tempfile.TemporaryDirectory(prefix="neurosim-demo-") as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"neurosim demo: the scenario 'variation_tolerance' (MLP 64-{args.hidden}-10 on the bundled digits"
              f"{', 720 training samples' if args.quick else ''}), device '{spec.name}' ({spec.states} states), "
              f"{epochs} epochs, seed {args.seed}; run files in {folder if args.keep else 'a temporary folder'}")
        print("variation = sigma of every device-to-device spread (relative; the nonlinearity's in label units) "
              "and of neuron/derivative-circuit gain (offset sigma/2)\n")
        header = f"{'variation':>9}  {'scheme':<7} {'test acc':>8}  {'sim time (ms)':>13}  {'energy (uJ)':>11}  " \
                 f"{'pulses':>10}  {'perturbations':>13}  {'wall (s)':>8}"
        print(header)
        print("-" * len(header))
        for sigma in levels:
            for scheme in schemes:
                scenario = apply_sets(base, {**common, "variation": sigma, "training.scheme": scheme})
                start = time.perf_counter()
                row = run_scenario(scenario, folder / f"{scheme}_variation{sigma:g}.h5").final
                wall = time.perf_counter() - start
                print(f"{sigma:>9.2f}  {scheme:<7} {row['test_accuracy']:>8.3f}  {row['sim_time_s'] * 1e3:>13.2f}  "
                      f"{row['energy_j'] * 1e6:>11.2f}  {int(row['pulses']):>10d}  {int(row['perturbations']):>13d}  "
                      f"{wall:>8.1f}", flush=True)
    print("\nsim time and energy: the chip's own clock and energy for the whole training (see docs/engine.md).")
    return 0
