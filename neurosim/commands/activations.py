"""``neurosim activations``: how far each realization (exact, Taylor, PWL) of a neuron circuit is from the exact
function, as a table (and a plot), so a designer can pick terms or segments before training.

Every row is one ``ActivationUnit`` built from the options; errors are measured in float64 on a dense uniform
grid of the range (denser than, and offset from, the grid the segmenters fit on).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from neurosim.activation import (
    FUNCTIONS,
    KINKS,
    MODES,
    SEGMENTERS,
    ActivationConfig,
    ActivationUnit,
    exact,
    exact_derivative,
)
from neurosim.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--functions", default="sigmoid,tanh,relu",
                        help=f"comma-separated, from: {', '.join(FUNCTIONS)} (default: sigmoid,tanh,relu)")
    parser.add_argument("--modes", default="exact,taylor,pwl", help="comma-separated: exact, taylor, pwl")
    parser.add_argument("--terms", default="4", help="taylor: terms N, comma-separated for several rows")
    parser.add_argument("--center", type=float, default=0.0, help="taylor: expansion centre x0 (default 0)")
    parser.add_argument("--taylor-fit", default="auto", help="taylor: auto, series or least_squares")
    parser.add_argument("--epsilon", default="0.01", help="pwl: max |error|, comma-separated for several rows")
    parser.add_argument("--segments", default=None,
                        help="pwl: fixed segment counts, comma-separated (replaces --epsilon)")
    parser.add_argument("--segmenter", default="least_squares",
                        help="pwl: chord, least_squares, or both comma-separated")
    parser.add_argument("--derivative", default="fit", help="pwl: BP derivative 'slope' or 'fit' (of f')")
    parser.add_argument("--range", dest="ranges", action="append", default=None, metavar="A,B",
                        help="input range; repeat for several; write --range=-4,4 (default -4,4)")
    parser.add_argument("--alpha", type=float, default=0.01, help="leaky_relu/prelu slope, elu alpha")
    parser.add_argument("--fit-points", type=int, default=20001, help="nodes of the fitting grid")
    parser.add_argument("--eval-points", type=int, default=100_003, help="points of the error grid")
    parser.add_argument("--plot", metavar="FIG.png", default=None, help="draw curves and errors to this PNG")


def _split(text: str, field: str, kind: type) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(field, text, f"must be {'integers' if kind is int else 'numbers'} "
                                       "separated by commas") from None
    if not values:
        raise ConfigError(field, text, "is empty")
    return values


def _range(text: str) -> tuple[float, float]:
    values = _split(text, "input_range", float)
    if len(values) != 2:
        raise ConfigError("input_range", text, "must be two numbers A,B (write --range=-4,4)")
    return values[0], values[1]


def _choices(text: str, field: str, allowed: tuple[str, ...]) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    for v in values:
        if v not in allowed:
            raise ConfigError(field, v, "must be one of " + ", ".join(allowed))
    if not values:
        raise ConfigError(field, text, "is empty")
    return values


@dataclasses.dataclass
class Row:
    """One realization and its measured error."""

    unit: ActivationUnit
    input_range: tuple[float, float]
    size: str
    realization: str
    max_error: float
    mean_error: float
    derivative_max_error: float
    note: str


def configs(args: argparse.Namespace) -> list[ActivationConfig]:
    """One validated config per table row, in table order."""
    functions = _choices(args.functions, "function", FUNCTIONS)
    modes = _choices(args.modes, "mode", MODES)
    segmenters = _choices(args.segmenter, "segmenter", SEGMENTERS)
    terms = _split(args.terms, "terms", int)
    ranges = [_range(r) for r in (args.ranges or ["-4,4"])]
    if args.segments is not None:
        pwl_targets = [{"segments": k, "epsilon": None} for k in _split(args.segments, "segments", int)]
    else:
        pwl_targets = [{"epsilon": e} for e in _split(args.epsilon, "epsilon", float)]
    common = {"alpha": args.alpha, "fit_points": args.fit_points, "derivative": args.derivative,
              "center": args.center, "taylor_fit": args.taylor_fit}
    out = []
    for fn in functions:
        for rng in ranges:
            for mode in modes:
                base = {**common, "function": fn, "mode": mode, "input_range": rng}
                if mode == "exact":
                    out.append(ActivationConfig(**base))
                elif mode == "taylor":
                    out.extend(ActivationConfig(**base, terms=n) for n in terms)
                else:
                    out.extend(ActivationConfig(**base, segmenter=s, **t) for s in segmenters for t in pwl_targets)
    return out


def measure(config: ActivationConfig, eval_points: int = 100_003) -> Row:
    """Build the unit (float64, no variation) and measure |realization - f| and |BP derivative - f'|."""
    unit = ActivationUnit(config, 1, dtype=torch.float64)
    a, b = config.input_range
    x = torch.linspace(a, b, eval_points, dtype=torch.float64).reshape(-1, 1)
    alpha = unit.prelu_slope.detach() if unit.prelu_slope is not None else config.alpha
    # f' is measured inside the range and off kinks: at a kink f' does not exist, at a clip end the circuit's
    # derivative is one-sided or 0.
    inner = x[1:-1][(x[1:-1] - torch.tensor(KINKS.get(config.function, (math.inf,)), dtype=x.dtype)).abs()
                    .min(dim=1).values > 1e-9].reshape(-1, 1)
    with torch.no_grad():
        err = (unit.ideal(x) - exact(config.function, x, alpha)).abs()
        derr = (unit.ideal_derivative(inner) - exact_derivative(config.function, inner, alpha)).abs()
    note = ""
    if config.mode == "exact":
        size, how = "-", "exact"
    elif config.mode == "taylor":
        size = f"N={config.terms}"
        method = unit.info["taylor_method"]
        how = f"series x0={config.center:g}" if method == "series" else f"LS poly x0={config.center:g}"
        if unit.taylor_fallback:
            note = f"fallback: {config.function} has no Taylor series at x0={config.center:g}; " \
                   "least-squares polynomial on the range"
    else:
        size = f"K={unit.info['segments']}"
        target = f"K={config.segments}" if config.segments is not None else f"eps={config.epsilon:g}"
        how = f"{config.segmenter} {target}"
        note = f"derivative: {config.derivative} (K={unit.info['derivative_segments']})"
    return Row(unit, config.input_range, size, how, float(err.max()), float(err.mean()), float(derr.max()), note)


def format_table(rows: list[Row]) -> str:
    head = ["function", "range", "mode", "realization", "size", "max|err|", "mean|err|", "max|err f'|", "note"]
    lines = [[r.unit.config.function, f"[{r.input_range[0]:g},{r.input_range[1]:g}]", r.unit.config.mode,
              r.realization, r.size, f"{r.max_error:.3g}", f"{r.mean_error:.3g}", f"{r.derivative_max_error:.3g}",
              r.note] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    right = {5, 6, 7}

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(line) for line in lines)])


def plot(rows: list[Row], path: str, eval_points: int = 2001) -> None:
    """One column per (function, range): curves against the exact one above, errors below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.unit.config.function, r.input_range), []).append(r)
    cols = len(groups)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.0), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [2, 1]})
    for c, ((fn, (a, b)), group) in enumerate(groups.items()):
        span = b - a
        x = torch.linspace(a - 0.15 * span, b + 0.15 * span, eval_points, dtype=torch.float64).reshape(-1, 1)
        xs = x.flatten().numpy()
        alpha = group[0].unit.config.alpha
        ref = exact(fn, x, alpha).flatten().numpy()
        top, bottom = axes[0, c], axes[1, c]
        top.plot(xs, ref, color="black", lw=2.2, label="exact")
        for r in group:
            if r.unit.config.mode == "exact":
                continue
            with torch.no_grad():
                y = r.unit.ideal(x).flatten().numpy()
            label = f"{r.unit.config.mode} {r.realization} ({r.size})"
            top.plot(xs, y, lw=1.1, label=label)
            bottom.plot(xs, y - ref, lw=1.0, label=label)
        for ax in (top, bottom):
            ax.axvspan(a, b, color="0.93", zorder=0)
            ax.grid(alpha=0.3)
        lo, hi = float(ref.min()), float(ref.max())
        pad = 0.25 * (hi - lo or 1.0)
        top.set_ylim(lo - pad, hi + pad)
        top.set_title(f"{fn} on [{a:g}, {b:g}]")
        top.legend(fontsize=7, loc="best")
        errors = [r.max_error for r in group if r.unit.config.mode != "exact" and r.max_error > 0]
        if errors and max(errors) > 20 * min(errors):  # a symlog axis keeps small PWL errors visible
            bottom.set_yscale("symlog", linthresh=max(min(errors), 1e-3 * max(errors)))
        bottom.set_xlabel("x")
        bottom.set_ylabel("approximation - exact")
        bottom.axhline(0.0, color="black", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.eval_points < 2:
        raise ConfigError("eval_points", args.eval_points, "must be >= 2")
    rows = [measure(cfg, args.eval_points) for cfg in configs(args)]
    print(format_table(rows))
    print(f"\nerrors on {args.eval_points} uniform points of each range, float64, circuits without variation; "
          "max|err f'| is the derivative BP uses (taylor: p', pwl: --derivative) against f', inside the range and off "
          "kinks.")
    if any(r.unit.taylor_fallback for r in rows):
        print("fallback: where f has no Taylor series at x0 (a kink), taylor mode uses the least-squares "
              "polynomial of the same number of terms on the range.")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    if any(not math.isfinite(r.max_error) for r in rows):
        return 1
    return 0


def _main() -> int:  # pragma: no cover - convenience for `python -m neurosim.commands.activations`
    parser = argparse.ArgumentParser(prog="neurosim activations")
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())


__all__ = ["Row", "add_arguments", "configs", "format_table", "measure", "plot", "run"]
