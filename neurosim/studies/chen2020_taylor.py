"""Study: two-stage training of trainable Taylor activations (Chen and Liang, ISOCC 2020).

Per number of terms N (2 to 9) and seed, one two-stage run of the LeNet-like CNN on the chip (stage 1: the
weights with exact tanh circuits; stage 2: the hidden circuits become N-term polynomials initialized from
tanh's series, and only their coefficients train). The finished chip is then evaluated three ways, on the
same weights and devices: with its trained coefficients, with the fixed series (the conventional circuit) and
with the exact tanh. The pre-activations every hidden layer sees (exact circuits, the test digits) give the
series' error where the neurons really are, which is where a gain from training the coefficients comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurosim.activation import ActivationConfig, ActivationUnit
from neurosim.analysis import plot_histogram_curves, plot_lines
from neurosim.runner import load_chip
from neurosim.studies._activation_common import begin, cell, mean_std, run_points, write_table
from neurosim.training.cost import accuracy

NAME = "chen2020_taylor"
TITLE = "Two-stage training of trainable Taylor activations: fixed series against trained coefficients"
PAPER = ("K. Chen and J.-W. Liang, 'A Two-stage Training Mechanism for the CNN with Trainable Activation "
         "Function', ISOCC 2020, doi 10.1109/ISOCC50952.2020.9333116 (trainable coefficients with fewer Taylor "
         "terms: +2.24 % to +53.96 % accuracy over the conventional fixed series)")
SCENARIOS = ["chen2020_taylor.toml"]
RUNTIME = {"default": "1 min", "full": "3 min"}   # measured on 2 cores, quiet (docs/studies/README.md)
PAPER_GAIN = (2.24, 53.96)

# Histogram of the pre-activations: fixed edges, wide enough for every layer (the rest is counted outside).
EDGES = np.linspace(-8.0, 8.0, 161)
SHOWN_TERMS = (2, 4, 6, 9)

SIZES: dict[str, tuple[dict[str, Any], dict[str, list], int]] = {
    "ci": ({"data.limit": 64, "training.two_stage.stage1_epochs": 1, "training.two_stage.stage2_epochs": 1},
           {"training.two_stage.terms": [4]}, 1),
    "default": ({}, {}, 5),
    "full": ({"data.limit": 0, "training.two_stage.stage1_epochs": 10, "training.two_stage.stage2_epochs": 4},
             {}, 5),
}


def _hidden(network) -> list:
    return network.analog_layers[:-1]


def preactivations(network, x: torch.Tensor, edges: np.ndarray = EDGES) -> dict[str, dict[str, Any]]:
    """Histogram (``edges``) of the inputs every hidden neuron circuit receives over ``x`` (inference mode,
    the circuits as they are), with the counts below and above the edges, the total and max |u|."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for layer in _hidden(network):
        def hook(module, args, name=layer.name):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1).double().cpu())
        hooks.append(layer.activation.register_forward_pre_hook(hook))
    network.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), 256):
                network(x[i:i + 256])
    finally:
        network.train()
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in seen.items():
        u = torch.cat(parts).numpy()
        counts, _ = np.histogram(u, bins=edges)
        out[name] = {"counts": counts, "below": int((u < edges[0]).sum()), "above": int((u > edges[-1]).sum()),
                     "n": len(u), "max_abs": float(np.abs(u).max()), "u": u}
    return out


def _series_unit(terms: int, input_range: tuple[float, float]) -> ActivationUnit:
    cfg = ActivationConfig(function="tanh", mode="taylor", terms=terms, input_range=input_range)
    return ActivationUnit(cfg, 1, dtype=torch.float64)


def _output(unit, u: np.ndarray) -> np.ndarray:
    """A unit's ideal realization (its own input clipping included) at the values u, float64."""
    x = torch.as_tensor(u, dtype=torch.float64).reshape(-1, 1)
    with torch.no_grad():
        return unit.ideal(x.to(unit_dtype(unit))).double().reshape(-1).numpy()


def _error_on(unit, u: np.ndarray, clip: float | None = None) -> np.ndarray:
    """|realization(u) − tanh(u)| at the values u; ``clip``: of the realization after the next layer's input
    driver saturates it at ±clip (what that layer really receives; tanh itself never exceeds 1)."""
    y = _output(unit, u)
    if clip is not None:
        y = np.clip(y, -clip, clip)
    return np.abs(y - np.tanh(np.asarray(u, dtype=np.float64)))


def _wrong_sign(unit, u: np.ndarray) -> float:
    """Fraction of the values u (u ≠ 0) where the realization's sign differs from tanh's."""
    u = np.asarray(u, dtype=np.float64)
    u = u[u != 0]
    return float(np.mean(np.sign(_output(unit, u)) != np.sign(u))) if len(u) else float("nan")


def unit_dtype(unit) -> torch.dtype:
    t = getattr(unit, "coefficients", None)
    return t.dtype if isinstance(t, torch.Tensor) else torch.float64


def _set_all(network, **mode) -> None:
    for layer in _hidden(network):
        layer.activation.set_mode(**mode)


def evaluate_point(path: Path, terms: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict]:
    """The finished chip of one point, three ways, and its layers' pre-activations and errors there."""
    chip = load_chip(path)
    net, data = chip.network, chip.data
    trained = accuracy(net, data.x_test, data.y_test)
    units = {layer.name: layer.activation for layer in _hidden(net)}
    trained_coeffs = {name: unit.coefficients.detach().clone() for name, unit in units.items()}
    input_range = tuple(_hidden(net)[0].activation.config.input_range)
    # errors of the trained polynomial need its own unit; keep references before switching modes
    trained_errors = {}
    _set_all(net, mode="exact")
    exact_acc = accuracy(net, data.x_test, data.y_test)
    dist = preactivations(net, data.x_test)
    series = _series_unit(terms, input_range)
    rows = []
    layers = net.analog_layers
    for i, layer in enumerate(_hidden(net)):
        d = dist[layer.name]
        clip = layers[i + 1].crossbar.config.input_max
        u = d["u"]
        unit = ActivationUnit(ActivationConfig(function="tanh", mode="taylor", terms=terms, input_range=input_range,
                                               train_coefficients=True), 1, dtype=torch.float64)
        with torch.no_grad():
            unit.coefficients.copy_(trained_coeffs[layer.name].double())
        trained_errors[layer.name] = unit
        rows.append({"layer": layer.name, "terms": terms, "samples": d["n"],
                     "outside_convergence": float(np.mean(np.abs(u) > math.pi / 2)),
                     "outside_range": float(np.mean((u < input_range[0]) | (u > input_range[1]))),
                     "max_abs_u": d["max_abs"],
                     "series_error_seen": float(_error_on(series, u).mean()),
                     "trained_error_seen": float(_error_on(unit, u).mean()),
                     "series_clipped_error_seen": float(_error_on(series, u, clip).mean()),
                     "trained_clipped_error_seen": float(_error_on(unit, u, clip).mean()),
                     "series_wrong_sign": _wrong_sign(series, u), "trained_wrong_sign": _wrong_sign(unit, u)})
    _set_all(net, mode="taylor", terms=terms, train_coefficients=False)
    fixed = accuracy(net, data.x_test, data.y_test)
    point = {"terms": terms, "seed": chip.scenario.seed, "exact": exact_acc, "fixed": fixed, "trained": trained}
    return point, rows, {"dist": dist, "trained_units": trained_errors, "range": input_range}


def uniform_errors(terms_list, input_range=(-4.0, 4.0), points: int = 20001) -> pd.DataFrame:
    """The series' max and mean |error| over the whole range (what ``neurosim activations`` reports)."""
    u = np.linspace(*input_range, points)
    rows = []
    for n in terms_list:
        e = _error_on(_series_unit(n, input_range), u)
        rows.append({"terms": n, "max": float(e.max()), "mean": float(e.mean())})
    return pd.DataFrame(rows)


def run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False,
        log: Callable[[str], None] | None = print) -> list[Path]:
    """Run the study at ``size`` ('ci', 'default', 'full') into ``out``; returns the tables and figures."""
    out, log = begin(out, size, log)
    sets, grid, seeds = SIZES[size]
    the_plan, folder, _ = run_points(out, "runs", SCENARIOS[0], size, sets, grid, seeds, workers, progress, log)

    points, layers, shown = [], [], {}
    for p in the_plan.points:
        path = folder / "points" / f"{p.name}.h5"
        if not path.exists():
            continue
        terms = p.scenario.training.two_stage.terms
        point, rows, extra = evaluate_point(path, terms)
        points.append(point)
        layers += [{**r, "seed": point["seed"]} for r in rows]
        if p.scenario.seed == the_plan.base.seed:
            shown[terms] = extra
    points_frame, layers_frame = pd.DataFrame(points), pd.DataFrame(layers)
    points_frame.to_csv(out / "points.csv", index=False)
    paths = [out / "points.csv"]

    # accuracy: exact, fixed series, trained coefficients; the gain in percentage points
    acc_rows, plot_rows = [], []
    for terms, g in points_frame.groupby("terms"):
        gain = 100 * (g["trained"] - g["fixed"])
        row = {"terms": terms, "seeds": len(g)}
        for key, label in (("exact", "exact tanh (stage 1)"), ("fixed", "fixed series"),
                           ("trained", "trained coefficients")):
            m, s, _ = mean_std(g[key])
            row[label] = cell(100 * m, 100 * s, ".1f")
            plot_rows.append({"terms": terms, "circuit": label, "accuracy": m, "std": s})
        row["gain (points)"] = cell(*mean_std(gain)[:2], ".1f")
        row["gain range (points)"] = f"{gain.min():+.1f} to {gain.max():+.1f}"
        acc_rows.append(row)
    notes = [f"Test accuracy (%) on the test digits, mean ± sample std over seeds; the three columns are the same "
             f"chip (weights and devices) after both stages, with its hidden circuits set three ways. Gain: "
             f"trained − fixed, in percentage points. The paper reports +{PAPER_GAIN[0]} % to +{PAPER_GAIN[1]} % "
             "(on MNIST, its own CNN and terms; not a chip)."]
    paths += write_table(pd.DataFrame(acc_rows), out, "accuracy", TITLE, notes)
    fig = out / "accuracy_vs_terms.png"
    plot_lines(pd.DataFrame(plot_rows), "terms", "accuracy", group="circuit", std="std",
               ylabel="test accuracy", title="LeNet-like CNN, tanh circuits as N-term polynomials: same chip, "
               "three circuits (mean ± std over seeds)", out=fig)
    paths.append(fig)

    # where the gain comes from: the series' error where the neurons are
    uni = uniform_errors(sorted(int(t) for t in points_frame["terms"].unique()))
    err_rows = []
    for (layer, terms), g in layers_frame.groupby(["layer", "terms"], sort=False):
        u = uni[uni["terms"] == int(terms)].iloc[0]
        err_rows.append({
            "layer": layer, "terms": terms, "seeds": len(g),
            "|u| > π/2 (%)": cell(*[100 * v for v in mean_std(g["outside_convergence"])[:2]], ".1f"),
            "outside [-4, 4] (%)": cell(*[100 * v for v in mean_std(g["outside_range"])[:2]], ".2f"),
            "max |u|": cell(*mean_std(g["max_abs_u"])[:2], ".2f"),
            "series error where seen": cell(*mean_std(g["series_error_seen"])[:2], ".3g"),
            "trained error where seen": cell(*mean_std(g["trained_error_seen"])[:2], ".3g"),
            "series error after the next input clip": cell(*mean_std(g["series_clipped_error_seen"])[:2], ".3g"),
            "trained error after the next input clip": cell(*mean_std(g["trained_clipped_error_seen"])[:2], ".3g"),
            "series sign wrong (%)": cell(*[100 * v for v in mean_std(g["series_wrong_sign"])[:2]], ".1f"),
            "trained sign wrong (%)": cell(*[100 * v for v in mean_std(g["trained_wrong_sign"])[:2]], ".1f"),
            "series error, uniform on [-4, 4] (mean / max)": f"{u['mean']:.3g} / {u['max']:.3g}"})
    notes = ["u: the pre-activation a hidden neuron circuit receives (test digits, exact tanh circuits: what the "
             "neurons saw when the series replaced tanh). Errors are mean |p(u) − tanh(u)| over the u the layer "
             "really sees (the polynomial clips u to [-4, 4]); 'trained' is the polynomial after stage 2, "
             "measured against tanh although training does not aim at tanh. tanh's series converges only for "
             "|u| < π/2. 'After the next input clip': the output as the next layer's input driver passes it, "
             "saturated at its full scale (±1 here): a magnitude error beyond 1 disappears there, a wrong sign "
             "does not. 'Sign wrong': the share of the u seen where p(u) and tanh(u) differ in sign."]
    paths += write_table(pd.DataFrame(err_rows), out, "series_error", "Where the gain comes from: the series' "
                         "error over the pre-activations each layer sees", notes)
    layers_frame.to_csv(out / "layers.csv", index=False)
    paths.append(out / "layers.csv")

    if shown:
        first = shown[min(shown)]
        centres = 0.5 * (EDGES[:-1] + EDGES[1:])
        panels = []
        for name, d in first["dist"].items():
            curves = {}
            for n in [t for t in SHOWN_TERMS if t in shown] or sorted(shown)[:4]:
                curves[f"series N={n}"] = (centres, np.maximum(_error_on(_series_unit(n, first["range"]), centres),
                                                               1e-12))
            last = max(shown)
            curves[f"trained N={last}"] = (centres, np.maximum(_error_on(shown[last]["trained_units"][name],
                                                                         centres), 1e-12))
            out_frac = (d["below"] + d["above"]) / d["n"]
            panels.append({"edges": EDGES, "counts": d["counts"], "curves": curves,
                           "title": f"{name}: {d['n']:,} pre-activations" + (f", {out_frac:.1%} beyond ±8"
                                                                             if out_frac else "")})
        fig = out / "preactivations.png"
        plot_histogram_curves(panels, xlabel="pre-activation u", curve_label="|p(u) − tanh(u)|",
                              title=f"Pre-activations each hidden layer sees (seed {the_plan.base.seed}) and the "
                              "error of the N-term series there", out=fig)
        paths.append(fig)
    log(f"{NAME}: wrote " + ", ".join(str(p) for p in paths))
    return paths

