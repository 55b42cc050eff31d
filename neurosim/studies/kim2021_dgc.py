"""Kim et al. 2021, direct gradient calculation (DGC): BP (both backward paths), DGC and the hybrid on an MLP
and on the LeNet-like CNN, across synaptic conductance variation and neuron-circuit variation, >= 5 seeds.

Two sweeps per network (scenarios/studies/kim2021_dgc_{mlp,cnn}.toml): the link ``conductance`` (the card's
device-to-device spreads only) over its levels, and the link ``circuit`` (gain and offset mismatch of the
hidden neurons and their derivative circuits only) over its nonzero levels; the level 0 is one chip for both
kinds, run once (in the conductance sweep) and shown in both. The method is one linked axis (scheme, BP's
backward path). Tables: accuracy per method and level, chip time and energy, the DGC - BP differences, and
the hybrid's chip-time saving next to its ratio of perturbation cycles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from neurosim import studies
from neurosim.analysis import STATISTICS

NAME = "kim2021_dgc"
TITLE = "Kim 2021: BP, DGC and hybrid on-chip training as conductance or neuron-circuit variation grows"
PAPER = ("H. Kim, J. Hwang, D. Kwon, J. Kim, M.-K. Park, J. Im, B.-G. Park, J.-H. Lee, \"Direct Gradient "
         "Calculation: Simple and Variation-Tolerant On-Chip Training Method for Neural Networks\", Adv. Intell. "
         "Syst. 3(8), 2100064 (2021), doi 10.1002/aisy.202100064")
SCENARIOS = ["kim2021_dgc_mlp.toml", "kim2021_dgc_cnn.toml"]
RUNTIME = {"ci": "25 s", "default": "12 min", "full": "~2 h (estimated)"}

KINDS = ("conductance", "circuit")
#: (scheme, bp.backward) -> the method's name in tables and figures
METHODS = {("bp", "transposed_read"): "BP (transposed read)", ("bp", "digital_model"): "BP (digital model)",
           ("dgc", "transposed_read"): "DGC", ("hybrid", "transposed_read"): "hybrid"}

# Per size: levels of each kind (conductance includes 0, the shared chip without variation; circuit does not),
# seeds, and overrides of the scenario files. Chosen before any result was seen (docs/studies/kim2021_dgc.md).
PLAN: dict[str, dict[str, dict]] = {
    "ci": {
        "mlp": {"conductance": [0.0, 0.3], "circuit": [0.3], "seeds": 2,
                "sets": {"training.epochs": 1, "data.limit": 32}},
        # one image, one step; no hybrid: its linearized-DGC check alone takes ~20 s on the CNN
        "cnn": {"conductance": [0.0], "circuit": [], "seeds": 1, "methods": list(METHODS)[:3],
                "sets": {"training.epochs": 1, "data.limit": 1, "training.batch_size": 1}},
    },
    "default": {
        "mlp": {"conductance": [0.0, 0.15, 0.3], "circuit": [0.15, 0.3], "seeds": 5, "sets": {}},
        "cnn": {"conductance": [0.0, 0.3], "circuit": [0.3], "seeds": 5, "sets": {}},
    },
    "full": {
        "mlp": {"conductance": [0.0, 0.1, 0.2, 0.3, 0.4], "circuit": [0.1, 0.2, 0.3, 0.4], "seeds": 10,
                "sets": {"training.epochs": 10}},
        "cnn": {"conductance": [0.0, 0.15, 0.3], "circuit": [0.15, 0.3], "seeds": 5,
                "sets": {"training.epochs": 5, "data.limit": 0}},
    },
}
NETWORKS = {"mlp": "MLP 64-16-10", "cnn": "LeNet-like CNN"}


def _method(scheme: str, backward: str) -> str:
    return METHODS.get((scheme, backward), f"{scheme} ({backward})")


def _frame(out: Path, net: str, size: str, workers: int | None, progress: bool,
           log: Callable[[str], None]) -> pd.DataFrame:
    """Every point of the network's sweeps, one row each: kind, sigma, method, seed and the summary's
    statistics. The chip without variation (conductance 0) is listed under both kinds."""
    plan = PLAN[size][net]
    scenario = studies.scenario_path(f"kim2021_dgc_{net}.toml")
    parts = []
    for kind in KINDS:
        levels = plan[kind]
        if not levels:
            continue
        other = KINDS[1 - KINDS.index(kind)]
        folder = studies.sweep_folder(out, f"{net}_{kind}", size)
        grid = {kind: levels, other: [0.0]}
        if "methods" in plan:   # the linked method axis, where a size runs fewer methods
            grid |= {"training.scheme": [s for s, _ in plan["methods"]],
                     "training.bp.backward": [b for _, b in plan["methods"]]}
        frame = studies.sweep(scenario, folder, grid=grid, seeds=plan["seeds"],
                              sets=plan["sets"], workers=workers, progress=progress, log=log)
        frame = frame.assign(kind=kind, sigma=frame[kind].astype(np.float64),
                             method=[_method(s, b) for s, b in zip(frame["training.scheme"],
                                                                   frame["training.bp.backward"], strict=True)])
        parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)
    zero = frame[(frame["kind"] == "conductance") & (frame["sigma"] == 0.0)]
    if len(zero) and plan["circuit"]:
        frame = pd.concat([frame, zero.assign(kind="circuit")], ignore_index=True)
    keep = ["kind", "sigma", "method", "seed", *[c for c in STATISTICS if c in frame.columns], "status"]
    frame = frame[keep].copy()
    frame.attrs["grid"] = {"kind": list(KINDS), "sigma": sorted(frame["sigma"].unique().tolist()),
                           "method": list(METHODS.values())}
    return frame


def _order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by kind, method (in METHODS' order), sigma."""
    rank = {m: i for i, m in enumerate(METHODS.values())}
    return table.assign(_k=table["kind"].map(KINDS.index), _m=table["method"].map(rank)) \
        .sort_values(["_k", "_m", "sigma"], kind="stable").drop(columns=["_k", "_m"]).reset_index(drop=True)


def _accuracy_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy as kind x method rows and one column per sigma: the text table and its numbers."""
    rows, numbers = [], []
    for (kind, method), group in table.groupby(["kind", "method"], sort=False):
        row = {"variation": kind, "method": method}
        for r in group.itertuples(index=False):
            row[f"σ = {r.sigma:g}"] = studies.mean_std(r.final_test_accuracy_mean, r.final_test_accuracy_std)
            numbers.append({"variation": kind, "method": method, "sigma": r.sigma, "seeds": r.n,
                            "accuracy_mean": r.final_test_accuracy_mean, "accuracy_std": r.final_test_accuracy_std})
        row["seeds"] = int(group["n"].min())
        rows.append(row)
    return pd.DataFrame(rows), pd.DataFrame(numbers)


def _cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Chip time, energy, perturbation cycles and pulses per method, at sigma 0 (the cost does not depend on the
    variation but through the pulses)."""
    zero = table[(table["kind"] == "conductance") & (table["sigma"] == 0.0)]
    rows = []
    for r in zero.itertuples(index=False):
        rows.append({"method": r.method, "seeds": r.n,
                     "chip time (s)": studies.mean_std(r.sim_time_s_mean, r.sim_time_s_std, ".4g"),
                     "energy (µJ)": studies.mean_std(r.energy_j_mean, r.energy_j_std, ".4g", 1e6),
                     "perturbation cycles": f"{r.perturbations_mean:.6g}",
                     "pulses": studies.mean_std(r.pulses_mean, r.pulses_std, ".4g"),
                     "wall (s)": f"{r.wall_time_s_mean:.3g}"})
    return pd.DataFrame(rows)


def _differences(frame: pd.DataFrame) -> pd.DataFrame:
    """DGC (and hybrid) minus each BP, per kind and sigma, paired by seed: a seed is one chip (device sampling,
    circuit mismatch, initial weights) and one data split and order for every method, so the per-seed
    difference removes the chip-to-chip spread. Mean difference of final accuracy, its standard error
    (std of the differences / sqrt(n)) and the difference in units of that error."""
    rows = []
    for (kind, sigma), group in frame.groupby(["kind", "sigma"], sort=True):
        acc = group.pivot_table(index="seed", columns="method", values="final_test_accuracy", aggfunc="first")
        for a in ("DGC", "hybrid"):
            for b in ("BP (transposed read)", "BP (digital model)"):
                if a not in acc or b not in acc:
                    continue
                d = (acc[a] - acc[b]).dropna().to_numpy(np.float64)
                diff = float(d.mean())
                se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
                rows.append({"variation": kind, "σ": sigma, "comparison": f"{a} − {b}",
                             "Δ accuracy": f"{diff:+.4f}", "standard error": "-" if math.isnan(se) else f"{se:.4f}",
                             "Δ / error": "-" if math.isnan(se) or se == 0 else f"{diff / se:+.1f}",
                             "seeds (pairs)": len(d)})
    return pd.DataFrame(rows)


def _hybrid_rows(net: str, table: pd.DataFrame) -> list[dict]:
    zero = table[(table["kind"] == "conductance") & (table["sigma"] == 0.0)].set_index("method")
    if "DGC" not in zero.index or "hybrid" not in zero.index:
        return []
    d, h = zero.loc["DGC"], zero.loc["hybrid"]
    time_ratio = h["sim_time_s_mean"] / d["sim_time_s_mean"]
    cycle_ratio = h["perturbations_mean"] / d["perturbations_mean"]
    return [{"network": NETWORKS[net], "DGC chip time (s)": f"{d['sim_time_s_mean']:.4g}",
             "hybrid chip time (s)": f"{h['sim_time_s_mean']:.4g}", "hybrid / DGC time": f"{time_ratio:.3f}",
             "saving": f"{1 - time_ratio:.1%}", "DGC cycles": f"{d['perturbations_mean']:.6g}",
             "hybrid cycles": f"{h['perturbations_mean']:.6g}", "hybrid / DGC cycles": f"{cycle_ratio:.3f}",
             "hybrid accuracy": studies.mean_std(h["final_test_accuracy_mean"], h["final_test_accuracy_std"]),
             "DGC accuracy": studies.mean_std(d["final_test_accuracy_mean"], d["final_test_accuracy_std"])}]


def run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False,
        log=print) -> list[Path]:
    """Run the sweeps of both networks at ``size`` into ``out`` and write the tables and figures."""
    from neurosim.analysis import plot_means, summary_table

    studies.check_size(size)
    out = Path(out)
    paths: list[Path] = []
    hybrid: list[dict] = []
    for net in ("mlp", "cnn"):
        frame = _frame(out, net, size, workers, progress, log)
        table = _order(summary_table(frame))
        text, numbers = _accuracy_table(table)
        seeds = PLAN[size][net]["seeds"]
        paths += studies.write_table(
            text, out, f"{net}_accuracy", csv_frame=numbers,
            title=f"{NETWORKS[net]}: final test accuracy, mean ± sample std over {seeds} seeds",
            notes=["σ: the link `conductance` (device-to-device spreads of the card) or `circuit` (neuron and "
                   "derivative-circuit gain mismatch; offset σ/2); σ = 0 is one chip, shown under both."])
        paths += studies.write_table(
            _cost_table(table), out, f"{net}_cost",
            title=f"{NETWORKS[net]}: the chip's time and energy for the whole training (σ = 0, {seeds} seeds)")
        paths += studies.write_table(
            _differences(frame), out, f"{net}_differences",
            title=f"{NETWORKS[net]}: accuracy of DGC and the hybrid minus BP's, per variation level",
            notes=["paired by seed (the same chip, data split and order for every method); standard error of "
                   "the mean of the per-seed differences; |Δ / error| < 2 is within the seed-to-seed spread."])
        hybrid += _hybrid_rows(net, table)
        fig = plot_means(table, "sigma", ["final_test_accuracy", "sim_time_s"], lines="method", panels="kind",
                         ylabels=["final test accuracy", "chip time (s)"], logy=["sim_time_s"],
                         title=f"Kim 2021 on neurosim: {NETWORKS[net]}, mean ± std over {seeds} seeds")
        paths.append(studies.save_figure(fig, out / f"{net}_accuracy.png"))
    paths += studies.write_table(
        pd.DataFrame(hybrid), out, "hybrid_speed",
        title="The hybrid's chip-time saving against all-DGC, next to its ratio of perturbation cycles (σ = 0)")
    return paths
