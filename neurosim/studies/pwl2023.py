"""Study: piecewise-linear activations and derivatives (Liao et al., Electronics 12(2):267, 2023).

Part 1, segments against the error bound: for sigmoid and tanh on [-4, 4], the chord and least-squares
segmenters of ``neurosim.activation`` at a ladder of bounds ε, for the function and for its derivative: the
number of segments and the measured max and mean |error|.

Part 2, an MLP on a binary task (the digits 3 and 8, 8×8, shipped as ``scenarios/studies/digits_3_8.npz``)
trained on the chip by BP with exact neuron circuits against PWL circuits whose derivative circuit is the PWL
fit of f′ or the PWL function's own slope: final accuracy, and the backward time (the derivative evaluation
the BP pass reads, timed alone, and the epoch's wall time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurosim.activation import ActivationConfig, ActivationUnit, exact, exact_derivative
from neurosim.analysis import plot_lines, runs_frame
from neurosim.studies._activation_common import begin, cell, mean_std, run_points, write_table

NAME = "pwl2023"
TITLE = "Piecewise-linear activations and derivatives: segments against the error bound, and an MLP trained with them"
PAPER = ("X. Liao, T. Zhou, L. Zhang, X. Hu and Y. Peng, 'A Method for Calculating the Derivative of Activation "
         "Functions Based on Piecewise Linear Approximation', Electronics 12(2):267, 2023, "
         "doi 10.3390/electronics12020267 (least squares: fewer segments or a smaller mean error at the same "
         "bound; same or slightly higher accuracy; backward time 4-6 % lower than PyTorch's operator)")
SCENARIOS = ["pwl2023.toml", "digits_3_8.npz"]
RUNTIME = {"default": "17 s", "full": "2 min"}   # measured on 2 cores, quiet (docs/studies/README.md)
PAPER_BACKWARD_SAVING = (4.0, 6.0)   # % less backward time than PyTorch's own derivative
DIGITS = (3, 8)
RANGE = (-4.0, 4.0)

SIZES: dict[str, dict[str, Any]] = {
    "ci": {"epsilons": [1e-2, 1e-3], "functions": ["sigmoid"], "sets": {"training.epochs": 2},
           "grid": {"network.activation.function": ["sigmoid"]}, "seeds": 1, "timing": (64, 64, 3)},
    "default": {"epsilons": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5], "functions": ["sigmoid", "tanh"],
                "sets": {}, "grid": {}, "seeds": 5, "timing": (256, 4096, 40)},
    "full": {"epsilons": [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5],
             "functions": ["sigmoid", "tanh", "silu", "gelu", "softplus", "elu"],
             "sets": {"training.epochs": 30}, "grid": {}, "seeds": 10, "timing": (256, 4096, 100)},
}


def binary_digits(classes: tuple[int, int] = DIGITS) -> dict[str, np.ndarray]:
    """scikit-learn's 8×8 digits of two classes, labels 0 and 1 in that order, images in [0, 1] (grey levels
    0..16 divided by 16, exact in float32): the arrays of the shipped ``digits_3_8.npz`` (``x``, ``y``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, classes)
    x = (d.images[keep] / 16.0).astype(np.float32)
    y = (d.target[keep] == classes[1]).astype(np.int64)
    return {"x": x, "y": y}


def write_binary_digits(path: Path, classes: tuple[int, int] = DIGITS) -> Path:
    """Write ``binary_digits`` as an npz archive (how the shipped file was made)."""
    np.savez_compressed(path, **binary_digits(classes))
    return Path(path)


def segment_table(functions, epsilons, segmenters=("chord", "least_squares"), eval_points: int = 100_003
                  ) -> pd.DataFrame:
    """Segments and measured |error| of the PWL function and of the PWL fit of f′, per function, segmenter and
    bound ε, on ``RANGE`` (float64, ``eval_points`` uniform points, f′ off kinks and inside the range)."""
    rows = []
    x = torch.linspace(*RANGE, eval_points, dtype=torch.float64).reshape(-1, 1)
    inner = x[1:-1]
    inner = inner[inner.abs().reshape(-1) > 1e-9].reshape(-1, 1)   # off a kink at 0
    for fn in functions:
        for seg in segmenters:
            for eps in epsilons:
                cfg = ActivationConfig(function=fn, mode="pwl", epsilon=eps, segmenter=seg, input_range=RANGE,
                                       derivative="fit", fit_points=_fit_points(eps))
                unit = ActivationUnit(cfg, 1, dtype=torch.float64)
                with torch.no_grad():
                    e = (unit.ideal(x) - exact(fn, x, cfg.alpha)).abs()
                    de = (unit.ideal_derivative(inner) - exact_derivative(fn, inner, cfg.alpha)).abs()
                rows.append({"function": fn, "segmenter": seg, "epsilon": eps,
                             "segments": unit.info["segments"], "max_error": float(e.max()),
                             "mean_error": float(e.mean()), "derivative_segments": unit.info["derivative_segments"],
                             "derivative_max_error": float(de.max()), "derivative_mean_error": float(de.mean())})
    return pd.DataFrame(rows)


def _fit_points(eps: float) -> int:
    """A fit grid fine enough for the bound (the segmenter refuses a bound finer than its grid can keep)."""
    return 20001 if eps >= 1e-4 else 200001


def backward_times(functions, shape: tuple[int, int], repeats: int, epsilon: float = 1e-2) -> pd.DataFrame:
    """Seconds to evaluate the derivative BP reads, alone, on a float32 tensor of ``shape`` (N(0, 2²) inputs),
    min over ``repeats`` interleaved repetitions: the exact f′ (closed form, what PyTorch's backward of the
    operator computes), the PWL fit of f′, and the PWL function's slope; and the same through autograd
    (``torch.autograd.grad`` of a recorded forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one thread: the ratio, not the machine's free cores
    try:
        return _backward_times(functions, shape, repeats, epsilon)
    finally:
        torch.set_num_threads(threads)


def _backward_times(functions, shape: tuple[int, int], repeats: int, epsilon: float) -> pd.DataFrame:
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(*shape, generator=g)
    rows = []
    for fn in functions:
        units = {"exact": ActivationUnit(ActivationConfig(function=fn), shape[1]),
                 "pwl, f′ fit": ActivationUnit(ActivationConfig(function=fn, mode="pwl", epsilon=epsilon,
                                                                 derivative="fit"), shape[1]),
                 "pwl, slope": ActivationUnit(ActivationConfig(function=fn, mode="pwl", epsilon=epsilon,
                                                                derivative="slope"), shape[1])}
        best = {(k, w): float("inf") for k in units for w in ("derivative", "autograd")}
        grad_out = torch.ones_like(x)
        for _ in range(repeats):
            for k, unit in units.items():
                start = time.perf_counter()
                unit.derivative(x)
                best[k, "derivative"] = min(best[k, "derivative"], time.perf_counter() - start)
                xr = x.clone().requires_grad_(True)
                y = unit(xr)
                start = time.perf_counter()
                torch.autograd.grad(y, xr, grad_out)
                best[k, "autograd"] = min(best[k, "autograd"], time.perf_counter() - start)
        for k in units:
            rows.append({"function": fn, "realization": k, "derivative_s": best[k, "derivative"],
                         "autograd_backward_s": best[k, "autograd"],
                         "derivative_vs_exact": best[k, "derivative"] / best["exact", "derivative"],
                         "autograd_vs_exact": best[k, "autograd"] / best["exact", "autograd"]})
    return pd.DataFrame(rows)


def _realization(s) -> str:
    a = s.network.activation
    if a.mode == "exact":
        return "exact"
    return f"pwl ε={a.epsilon:g}, {'f′ fit' if a.derivative == 'fit' else 'slope'}"


def run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False,
        log: Callable[[str], None] | None = print) -> list[Path]:
    """Run the study at ``size`` ('ci', 'default', 'full') into ``out``; returns the tables and figures."""
    out, log = begin(out, size, log)
    cfg = SIZES[size]
    paths: list[Path] = []

    # part 1: segments against the bound
    seg = segment_table(cfg["functions"], cfg["epsilons"])
    paths += write_table(seg, out, "segments", "Segments and measured |error| against the bound ε, on [-4, 4]",
                         ["Function: the PWL function against f; derivative: the separate PWL fit of f′ (same "
                          "segmenter and ε) against f′. Errors measured in float64 on 100,003 uniform points."])
    long = pd.concat([seg.assign(what="f", n=seg["segments"]),
                      seg.assign(what="f′", n=seg["derivative_segments"])], ignore_index=True)
    long["curve"] = long["segmenter"] + ", " + long["what"]
    fig = out / "segments_vs_epsilon.png"
    plot_lines(long, "epsilon", "n", group="curve", panel="function", logx=True, logy=True, xlabel="error bound ε",
               ylabel="segments", title="PWL segments against the error bound (chord and least squares, function "
               "and derivative)", out=fig)
    paths.append(fig)
    compare = []
    for (fn, eps), g in seg.groupby(["function", "epsilon"], sort=False):
        c = g[g["segmenter"] == "chord"].iloc[0]
        ls = g[g["segmenter"] == "least_squares"].iloc[0]
        compare.append({"function": fn, "epsilon": eps, "segments chord / LS": f"{c['segments']} / {ls['segments']}",
                        "mean error LS/chord": ls["mean_error"] / c["mean_error"],
                        "f′ segments chord / LS": f"{c['derivative_segments']} / {ls['derivative_segments']}",
                        "f′ mean error LS/chord": ls["derivative_mean_error"] / c["derivative_mean_error"]})
    paths += write_table(pd.DataFrame(compare), out, "segmenters", "Least squares against chord at the same bound")

    # part 2: the MLP on the binary task, on the chip
    the_plan, folder, _ = run_points(out, "mlp", SCENARIOS[0], size, cfg["sets"], cfg["grid"], cfg["seeds"], workers,
                                     progress, log)
    metrics = runs_frame(folder)
    by_point = {f"{p.name}.h5": p for p in the_plan.points}
    rows = []
    for name, g in metrics.groupby("point", sort=False):
        s = by_point[name].scenario
        g = g.sort_values("epoch")
        rows.append({"function": s.network.activation.function, "realization": _realization(s), "seed": s.seed,
                     "final_accuracy": float(g["test_accuracy"].iloc[-1]),
                     "epoch_wall_s": float(g["wall_time_s"].mean())})
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "mlp_runs.csv", index=False)
    paths.append(out / "mlp_runs.csv")
    shape_n, shape_m, repeats = cfg["timing"]
    timing = backward_times(sorted(runs["function"].unique()), (shape_n, shape_m), repeats)
    table = []
    runs["_order"] = runs["realization"].map(_order)
    for (fn, real), g in runs.sort_values(["function", "_order"], kind="stable").groupby(
            ["function", "realization"], sort=False):
        table.append({"function": fn, "realization": real, "seeds": len(g),
                      "test accuracy (%)": cell(*[100 * v for v in mean_std(g["final_accuracy"])[:2]], ".1f"),
                      "min / max (%)": f"{100 * g['final_accuracy'].min():.1f} / "
                                       f"{100 * g['final_accuracy'].max():.1f}"})
    notes = [f"MLP 64-16-2 on the digits {DIGITS[0]} and {DIGITS[1]} (8×8, 80/20 split per seed: 285 training and "
             "72 test digits, so one digit is 1.4 %), on-chip BP, ideal device; mean ± sample std over seeds. The "
             "runs' epoch wall times are in mlp_runs.csv: on a shared machine they measure its load more than the "
             "circuits, so the backward time is measured alone (backward_times)."]
    paths += write_table(pd.DataFrame(table), out, "mlp", "Exact against PWL neuron circuits in on-chip training",
                         notes)
    timing_table = timing.copy()
    timing_table["derivative (µs)"] = (1e6 * timing_table.pop("derivative_s")).round(1)
    timing_table["autograd backward (µs)"] = (1e6 * timing_table.pop("autograd_backward_s")).round(1)
    notes = [f"The derivative BP reads, evaluated alone on a ({shape_n}, {shape_m}) float32 tensor of N(0, 2²) "
             f"inputs (best of {repeats} interleaved runs, one thread of this shared CPU), ε = 0.01, least squares; "
             "ratios to the exact f′ of the same function (its closed form, what PyTorch's backward computes). "
             "Autograd: torch.autograd.grad of a recorded forward of the unit (a PWL unit forms its derivative "
             f"during the forward). The paper reports {PAPER_BACKWARD_SAVING[0]:g}-{PAPER_BACKWARD_SAVING[1]:g} % "
             "less backward time than PyTorch's operator."]
    paths += write_table(timing_table, out, "backward_times", "Backward time: the derivative evaluation", notes)
    log(f"{NAME}: wrote " + ", ".join(str(p) for p in paths))
    return paths


def _order(realization: str) -> tuple:
    """exact first, then PWL by decreasing ε, the f′ fit before the slope."""
    if realization == "exact":
        return (0, 0.0, 0)
    eps = float(realization.split("ε=")[1].split(",")[0])
    return (1, -eps, int(realization.endswith("slope")))
