"""Fit a device card to measured pulse data: what a device researcher brings is a table of conductances after
each potentiation and depression pulse, for several cycles and devices; what the simulator needs is a card.

CSV layout (one row per reading, rows in the order they were measured; docs/devices.md, "Bring your own
device"):

    device,cycle,polarity,pulse,conductance_uS
    d0,0,ltp,0,1.02
    d0,0,ltp,1,1.35
    ...

- ``pulse``: pulses applied so far in this phase (0 = the reading before its first pulse, optional);
  consecutive integers in each curve.
- ``conductance``: the column's name carries the unit (``conductance_uS``, ``conductance (nS)``, S, mS, uS,
  nS, pS) unless a unit is passed (``--units``).
- ``polarity``: ``ltp``/``ltd`` (also ``potentiation``/``depression``, ``set``/``reset``, ``+``/``-``).
- ``cycle``: an integer label of the potentiation/depression cycle; ``device`` (optional): a device label.

Each curve (device, cycle, polarity) is fitted by ``scipy.optimize.least_squares`` with the card's own model,
G(k) = lo + (hi − lo)·f(k/N) for potentiation and hi − (hi − lo)·f(k/N) for depression, f the normalized
exponential of ``neurosim.nonlinearity`` written with s = 1/a (s = 0 linear, s < 0 convex), N the phase's
pulse count. The card takes means (window, labels); device-to-device sigmas come from the spread of the
per-device means, less what the cycle-to-cycle scatter alone puts there; ``c2c`` comes from the one-pulse
residuals: each reading against one pulse of the device's fitted curve from the reading before, as the
model moves a cell (``DeviceArray._pulse``), away from the bounds where the model clamps.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurosim.config import ConfigError

UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9, "ps": 1e-12}
POLARITIES = {"ltp": "ltp", "potentiation": "ltp", "set": "ltp", "+": "ltp", "up": "ltp",
              "ltd": "ltd", "depression": "ltd", "reset": "ltd", "-": "ltd", "down": "ltd"}
MIN_PULSES = 3
# Bound on s = 1/a in the fit: |s| = 1e4 is a step to float precision (label 10.09 of at most 10.10).
_S_BOUND = 1e4
# One-pulse residuals within this many sigmas of a bound are left out of c2c: the model clamps there.
_CLAMP_SIGMAS = 3.0


def response(x: np.ndarray, s: float) -> np.ndarray:
    """The normalized exponential with s = 1/a: (1 − e^(−s·x)) / (1 − e^(−s)), x for s = 0, and for s < 0 the
    point reflection 1 − f_|s|(1 − x) (the form that does not overflow)."""
    x = np.asarray(x, dtype=float)
    if abs(s) < 1e-9:
        return x + 0.5 * s * x * (1.0 - x)   # the first-order term keeps the fit's Jacobian right at s = 0
    if s < 0:
        return 1.0 - response(1.0 - x, -s)
    return np.expm1(-s * x) / np.expm1(-s)


def inverse(y: np.ndarray, s: float) -> np.ndarray:
    """x in [0, 1] with response(x, s) = y (y clipped to [0, 1])."""
    y = np.clip(np.asarray(y, dtype=float), 0.0, 1.0)
    if abs(s) < 1e-9:
        return y
    if s < 0:
        return 1.0 - inverse(1.0 - y, -s)
    with np.errstate(divide="ignore"):
        return np.clip(-np.log1p(y * np.expm1(-s)) / s, 0.0, 1.0)


def label_of(s: float) -> float:
    """The nonlinearity label of s = 1/a (negative for a convex curve, 0 for linear)."""
    from neurosim.nonlinearity import label_from_a

    return 0.0 if s == 0 else float(label_from_a(1.0 / s))


def s_of_label(label: float) -> float:
    from neurosim.nonlinearity import a_from_label

    return 0.0 if label == 0 else math.copysign(1.0 / float(a_from_label(abs(label))), label)


@dataclass
class Curve:
    """One measured phase: pulses k and conductances g (S), and its fit."""

    device: str
    cycle: str
    polarity: str
    first_row: int
    k: np.ndarray
    g: np.ndarray
    n: int = 0
    lo: float = math.nan
    hi: float = math.nan
    s: float = math.nan
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def model(self, k: np.ndarray) -> np.ndarray:
        """The fitted nominal curve through this phase: from the position of its first reading on the device's
        curve, one nominal pulse per pulse (what the card's model predicts without noise)."""
        span = self.hi - self.lo
        y0 = (self.g[0] - self.lo) / span if self.polarity == "ltp" else (self.hi - self.g[0]) / span
        x = np.clip(inverse(y0, self.s) + (np.asarray(k, dtype=float) - self.k[0]) / self.n, 0.0, 1.0)
        f = response(x, self.s)
        return self.lo + span * f if self.polarity == "ltp" else self.hi - span * f


@dataclass
class Fit:
    """What ``fit_card`` found: the card's data (a dict for ``dump_toml``) and the fitted curves."""

    card: dict
    curves: list[Curve]
    rms: dict[str, float]
    r2: dict[str, float]
    c2c_residuals: np.ndarray
    devices: list[str]
    per_device: dict = field(default_factory=dict)   # device -> {"lo", "hi": (S, se), "labels": {p: (label, se)}}


def _unit_of_header(name: str) -> float | None:
    text = name.strip().lower().removeprefix("conductance").strip(" _[]()")
    return UNITS.get(text) if text else None


def read_measurements(path: str | Path, units: str | None = None) -> list[Curve]:
    """The curves of a measurement CSV, checked; a defect raises ConfigError naming the row or column."""
    path = Path(path)
    where = str(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError("", str(path), f"cannot read the measurement file ({e.strerror})") from None
    with handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ConfigError("", str(path), "is empty (expected a header: device,cycle,polarity,pulse,conductance)")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    cols = {}
    for name in ("pulse", "polarity", "cycle", "device"):
        if name in lower:
            cols[name] = lower.index(name)
        elif name != "device":
            raise ConfigError(f"column {name}", None, f"missing from the header {header}", where)
    g_cols = [i for i, h in enumerate(lower) if h.startswith("conductance")]
    if len(g_cols) != 1:
        raise ConfigError("column conductance", None, f"expected exactly one conductance column in {header}", where)
    gi = g_cols[0]
    scale = _unit_of_header(header[gi])
    if units is not None:
        if units.strip().lower() not in UNITS:
            raise ConfigError("units", units, f"unknown unit (one of {', '.join(sorted(UNITS))})", where)
        scale = UNITS[units.strip().lower()]
    if scale is None:
        raise ConfigError(f"column {header[gi]}", None, "no unit: name it in the header (conductance_uS) or "
                          "pass --units", where)
    curves: dict[tuple[str, str, str], Curve] = {}
    order: list[tuple[str, str, str]] = []
    data: dict[tuple[str, str, str], tuple[list[int], list[float], int]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise ConfigError(f"row {line}", ",".join(row), f"has {len(row)} columns, the header {len(header)}",
                              where)
        pol = row[cols["polarity"]].strip().lower()
        if pol not in POLARITIES:
            raise ConfigError(f"row {line}, column polarity", row[cols["polarity"]],
                              "must be ltp or ltd (potentiation/depression, set/reset, +/-)", where)
        try:
            k = float(row[cols["pulse"]])
        except ValueError:
            k = math.nan
        if not (math.isfinite(k) and k == int(k) and k >= 0):
            raise ConfigError(f"row {line}, column pulse", row[cols["pulse"]], "must be an integer >= 0", where)
        try:
            g = float(row[gi]) * scale
        except ValueError:
            g = math.nan
        if not math.isfinite(g):
            raise ConfigError(f"row {line}, column {header[gi]}", row[gi], "must be a finite number", where)
        if g < 0:
            raise ConfigError(f"row {line}, column {header[gi]}", row[gi], "a conductance cannot be negative", where)
        dev = row[cols["device"]].strip() if "device" in cols else ""
        cyc = row[cols["cycle"]].strip()
        if not cyc:
            raise ConfigError(f"row {line}, column cycle", cyc, "must name the cycle", where)
        key = (dev, cyc, POLARITIES[pol])
        if key not in data:
            data[key] = ([], [], line)
            order.append(key)
        ks, gs, _ = data[key]
        if ks and int(k) != ks[-1] + 1:
            raise ConfigError(f"row {line}, column pulse", int(k), f"follows pulse {ks[-1]} of device "
                              f"{dev or '-'} cycle {cyc} {POLARITIES[pol]}: pulses of a curve must be consecutive, "
                              "in the order measured", where)
        if not ks and int(k) > 1:
            raise ConfigError(f"row {line}, column pulse", int(k), "a curve starts at pulse 0 or 1", where)
        ks.append(int(k))
        gs.append(g)
    if not data:
        raise ConfigError("", str(path), "has a header but no data rows", where)
    for key in order:
        dev, cyc, pol = key
        ks, gs, first = data[key]
        other = (dev, cyc, "ltd" if pol == "ltp" else "ltp")
        if other not in data:
            raise ConfigError(f"row {first}, column polarity", pol, f"device {dev or '-'} cycle {cyc} has no "
                              f"{other[2]} rows: each cycle needs both polarities", where)
        pulses = ks[-1]
        if pulses < MIN_PULSES:
            raise ConfigError(f"row {first}, column pulse", pulses, f"device {dev or '-'} cycle {cyc} {pol} has "
                              f"{pulses} pulse(s): at least {MIN_PULSES} are needed to fit a curve", where)
        garr = np.asarray(gs)
        net = garr[-1] - garr[0]
        if garr.max() == garr.min():
            raise ConfigError(f"row {first}, column {header[gi]}", gs[0] / scale,
                              f"device {dev or '-'} cycle {cyc} {pol}: the conductance does not change "
                              "(a window of zero width)", where)
        if (net <= 0) if pol == "ltp" else (net >= 0):
            raise ConfigError(f"row {first}, column {header[gi]}", gs[0] / scale, f"device {dev or '-'} cycle {cyc} "
                              f"{pol} goes {'down' if pol == 'ltp' else 'up'} from its first to its last reading "
                              f"({gs[0]:.4g} -> {gs[-1]:.4g} S): not a "
                              f"{'potentiation' if pol == 'ltp' else 'depression'} curve", where)
        curves[key] = Curve(dev, cyc, pol, first, np.asarray(ks, dtype=float), garr, n=pulses)
    counts = {c.polarity: set() for c in curves.values()}
    for c in curves.values():
        counts[c.polarity].add(c.n)
    for pol, ns in counts.items():
        if len(ns) > 1:
            c = next(c for c in curves.values() if c.polarity == pol and c.n != min(ns))
            raise ConfigError(f"row {c.first_row}, column pulse", c.n, f"{pol} curves have {sorted(ns)} pulses: "
                              "the card has one pulse count per polarity (measure every cycle alike)", where)
    return [curves[k] for k in order]


def _clamped_mean(m: np.ndarray, lo: float, hi: float, sigma: float) -> np.ndarray:
    """E[clip(m + sigma·z, lo, hi)], z standard normal: the mean reading after a pulse whose noise-free result is
    m, since the model clamps a noisy pulse at the window's bounds (each bound's term on its own: the window
    is many sigmas wide wherever this matters)."""
    if sigma <= 0:
        return np.clip(m, lo, hi)
    from scipy.special import ndtr

    a = (hi - m) / sigma
    b = (m - lo) / sigma
    pdf = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)  # noqa: E731
    return m - sigma * (pdf(a) - a * ndtr(-a)) + sigma * (pdf(b) - b * ndtr(-b))


def fit_device(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Least squares of the model's one-pulse map on every pulse of one device's curves: parameters (lo, hi,
    s_ltp, s_ltd), each reading predicted from the reading before by one nominal pulse plus the mean effect of
    the window's clamp on a noisy pulse (``_clamped_mean``), as ``DeviceArray`` moves a cell. Fitting the map
    rather than whole curves keeps the accumulated cycle-to-cycle noise (a random walk along the curve) out of
    the shape; the clamp term keeps it out of the window (without it, pulses that the bound cuts pull each
    bound inwards: measured 3 to 5 standard errors). Two passes: the first, without the clamp term, gives the
    noise sigma the second uses. Returns the parameters in S, their standard errors (from the Jacobian), the
    residuals (S) and each residual's prediction (S)."""
    from scipy.optimize import least_squares

    g0 = min(c.g.min() for c in curves)
    scale = max(c.g.max() for c in curves) - g0
    ys = [((c.g - g0) / scale, c.n, c.polarity == "ltp") for c in curves]

    def predict(p: np.ndarray, sigma: float) -> np.ndarray:
        lo, hi, s_ltp, s_ltd = p
        m = np.concatenate([_step_map(y[:-1], lo, hi, s_ltp if up else s_ltd, n, up) for y, n, up in ys])
        return _clamped_mean(np.clip(m, lo, hi), lo, hi, sigma)

    obs = np.concatenate([y[1:] for y, _, _ in ys])
    best, sigma = None, 0.0
    for _ in range(2):
        start = best.x if best is not None else None
        best = None
        for s0 in ((0.0, 3.0, -3.0) if start is None else (None,)):  # a shallow second minimum can sit on the
            x0 = start if s0 is None else np.array([0.0, 1.0, s0, s0])  # other side of linear
            sol = least_squares(lambda p, sg=sigma: obs - predict(p, sg), x0,
                                bounds=([-10.0, -10.0, -_S_BOUND, -_S_BOUND], [11.0, 11.0, _S_BOUND, _S_BOUND]),
                                xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5000)
            if best is None or sol.cost < best.cost:
                best = sol
        pred = obs - best.fun
        lo, hi = best.x[:2]
        far = np.minimum(pred - lo, hi - pred) > _CLAMP_SIGMAS * max(sigma, 1e-12)
        sigma = float(np.sqrt(np.mean(best.fun[far] ** 2))) if far.sum() > 1 else float(np.std(best.fun))
    dof = max(1, best.fun.size - 4)
    cov = np.linalg.pinv(best.jac.T @ best.jac) * (float(best.fun @ best.fun) / dof)
    se = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    lo, hi, s_ltp, s_ltd = best.x
    params = np.array([g0 + scale * lo, g0 + scale * hi, s_ltp, s_ltd])
    return params, se * np.array([scale, scale, 1.0, 1.0]), best.fun * scale, g0 + scale * (obs - best.fun)


def _between_var(per_device: np.ndarray, se2: np.ndarray) -> float:
    """Device-to-device variance: the spread of per-device estimates less the part their estimation errors put
    there (floored at 0)."""
    if len(per_device) < 2:
        return 0.0
    return max(0.0, float(np.var(per_device, ddof=1) - np.mean(se2)))


def _step_map(g_prev: np.ndarray, lo: float, hi: float, s: float, n: int, up: bool) -> np.ndarray:
    """One nominal pulse of the model from conductances g_prev on the curve (lo, hi, s, n pulses)."""
    span = hi - lo
    y = (g_prev - lo) / span if up else (hi - g_prev) / span
    x = np.clip(inverse(y, s) + 1.0 / n, 0.0, 1.0)
    f = response(x, s)
    return lo + span * f if up else hi - span * f


def _label_and_se(s: float, se: float) -> tuple[float, float]:
    lab = label_of(s)
    lo, hi = label_of(s - se), label_of(s + se)
    return lab, 0.5 * abs(hi - lo)


def fit_card(curves: list[Curve], source: str, name: str | None = None, technology: str = "measured"
             ) -> Fit:
    """Fit every device and aggregate into card data (see the module's docstring)."""
    devices = list(dict.fromkeys(c.device for c in curves))
    src = Path(source).name
    fits = {}
    for d in devices:
        mine = [c for c in curves if c.device == d]
        params, se, res, pred = fit_device(mine)
        lo, hi, s_ltp, s_ltd = params
        if not hi > lo:
            raise ConfigError(f"device {d or '-'}", float(hi), f"the fitted window {lo:.4g} .. {hi:.4g} S has no "
                              "width", source)
        for c in mine:
            c.lo, c.hi, c.s = float(lo), float(hi), float(s_ltp if c.polarity == "ltp" else s_ltd)
            c.residuals = c.g - c.model(c.k)
        labels = {p: _label_and_se(float(v), float(e)) for p, v, e in (("ltp", s_ltp, se[2]), ("ltd", s_ltd, se[3]))}
        fits[d] = {"lo": (lo, se[0]), "hi": (hi, se[1]), "labels": labels, "res": res, "pred": pred}
    dev_lo = np.array([fits[d]["lo"][0] for d in devices])
    dev_hi = np.array([fits[d]["hi"][0] for d in devices])
    g_min, g_max = float(dev_lo.mean()), float(dev_hi.mean())
    notes_extra = []
    labels, label_se, label_var = {}, {}, {}
    for p in ("ltp", "ltd"):
        by_dev = np.array([fits[d]["labels"][p][0] for d in devices])
        se_dev = np.array([fits[d]["labels"][p][1] for d in devices])
        mean = float(by_dev.mean())
        se = float(by_dev.std(ddof=1) / math.sqrt(len(devices))) if len(devices) > 1 else float(se_dev[0])
        if mean < 0:
            if -mean > 3.0 * se and -mean > 1e-6:   # 1e-6: a linear curve's float-rounding noise
                raise ConfigError(f"polarity {p}", round(mean, 4), "the fitted curve is convex (starts slowly), "
                                  "which the exponential card cannot express (it takes |label|)", source)
            notes_extra.append(f"{p}: fitted label {mean:.4g} is within 3 standard errors of linear; written as 0")
            mean = 0.0
        labels[p], label_se[p] = mean, se
        label_var[p] = _between_var(by_dev, se_dev**2)
    g_min_dtod = math.sqrt(_between_var(dev_lo, np.array([fits[d]["lo"][1] for d in devices]) ** 2)) / g_min
    g_max_dtod = math.sqrt(_between_var(dev_hi, np.array([fits[d]["hi"][1] for d in devices]) ** 2)) / g_max
    nl_dtod = math.sqrt(0.5 * (label_var["ltp"] + label_var["ltd"]))
    # c2c: the one-pulse residuals, away from the bounds where the model clamps (a clamped pulse's noise is cut).
    res = np.concatenate([fits[d]["res"] for d in devices])
    margin = []                                          # each prediction's distance from the nearer bound
    for d in devices:
        pred = fits[d]["pred"]
        margin.append(np.minimum(pred - fits[d]["lo"][0], fits[d]["hi"][0] - pred))
    margin = np.concatenate(margin)
    sigma = float(np.sqrt(np.mean(res**2)))
    keep = np.ones(res.size, dtype=bool)
    for _ in range(5):
        keep = margin > _CLAMP_SIGMAS * sigma
        if keep.sum() < 2:
            keep = np.ones(res.size, dtype=bool)
            break
        sigma = float(np.sqrt(np.mean(res[keep] ** 2)))
    c2c = sigma / (g_max - g_min)
    # Fit quality per polarity: the data against each device's fitted nominal curve through each phase.
    rms, r2 = {}, {}
    for p in ("ltp", "ltd"):
        r = np.concatenate([c.residuals for c in curves if c.polarity == p])
        gs = np.concatenate([c.g for c in curves if c.polarity == p])
        rms[p] = float(np.sqrt(np.mean(r**2)))
        r2[p] = float(1.0 - np.sum(r**2) / np.sum((gs - gs.mean()) ** 2))
    n_ltp = next(c.n for c in curves if c.polarity == "ltp")
    n_ltd = next(c.n for c in curves if c.polarity == "ltd")
    n_cycles = len({(c.device, c.cycle) for c in curves})
    how = f"fitted by neurosim fit-device to {src}"
    card = {
        "name": name or Path(source).stem,
        "technology": technology,
        "description": f"fitted to {src}: {len(devices)} device(s), {n_cycles} cycle(s) in all, of {n_ltp} "
                       f"potentiation and {n_ltd} depression pulses",
        "g_min": g_min,
        "g_max": g_max,
        "states": n_ltp + 1,
    }
    if n_ltd != n_ltp:
        card["states_ltd"] = n_ltd + 1
    card.update({"nl_ltp": labels["ltp"], "nl_ltd": labels["ltd"], "c2c": c2c})
    if len(devices) > 1:
        card.update({"g_min_dtod": g_min_dtod, "g_max_dtod": g_max_dtod, "nl_dtod": nl_dtod})
    quality = "; ".join(f"{p}: RMS error {rms[p]:.4g} S ({100 * rms[p] / (g_max - g_min):.3g} % of the window), "
                        f"R^2 {r2[p]:.6f}" for p in ("ltp", "ltd"))
    notes = [f"Fitted by neurosim fit-device to {src}: {len(curves)} curves of {len(devices)} device(s); per device "
             "one scipy.optimize.least_squares fit of the model's one-pulse map (window, label of each "
             "polarity); the card takes the means over devices.",
             f"Fit quality (data against each device's nominal curve through each phase): {quality}.",
             f"Standard errors of the mean labels: ltp {label_se['ltp']:.3g}, ltd {label_se['ltd']:.3g}. c2c from "
             f"{int(keep.sum())} one-pulse residuals (those within {_CLAMP_SIGMAS:g} sigma of a bound left out).",
             "step_dtod, read noise, faults and drift are not measured by a pulse train: left at 0."]
    if len(devices) < 2:
        notes.append("One device: no device-to-device spread can be estimated; the *_dtod fields stay 0.")
    notes += notes_extra
    card["notes"] = "\n".join(notes)
    cite = {
        "g_min": f"{how}: mean over devices of the fitted low end of the window",
        "g_max": f"{how}: mean over devices of the fitted high end of the window",
        "states": f"{how}: {n_ltp} potentiation pulses per cycle + 1",
        "nl_ltp": f"{how}: mean over devices of the potentiation label",
        "nl_ltd": f"{how}: mean over devices of the depression label",
        "c2c": f"{how}: RMS of the one-pulse residuals / window",
    }
    if n_ltd != n_ltp:
        cite["states_ltd"] = f"{how}: {n_ltd} depression pulses per cycle + 1"
    if len(devices) > 1:
        cite.update({k: f"{how}: spread of the {len(devices)} devices' fits less their standard errors"
                     for k in ("g_min_dtod", "g_max_dtod", "nl_dtod")})
    cite["default"] = f"not measured by the pulse trains of {src}; left at the model's default"
    card["source"] = cite
    return Fit(card, curves, rms, r2, res[keep], devices, fits)


def fit_table_rows(curves: list[Curve]) -> dict[str, np.ndarray]:
    """The cycle mean of each polarity's curve (S) by pulse, for a table-driven card."""
    out = {}
    for p in ("ltp", "ltd"):
        mine = [c for c in curves if c.polarity == p]
        k0 = max(int(c.k[0]) for c in mine)
        out[p] = np.mean([c.g[int(k0 - c.k[0]):] for c in mine], axis=0)
    return out


def card_table(spec, cycles: int = 1, device: str = "d0") -> list[tuple]:
    """The nominal pulse trains a card implies, as CSV rows (device, cycle, polarity, pulse, conductance in S):
    potentiation from g_min by states − 1 pulses, depression from g_max by states_ltd − 1 pulses."""
    import torch

    rows = []
    for cyc in range(cycles):
        for p, n in (("ltp", spec.pulses_ltp), ("ltd", spec.pulses_ltd)):
            g = spec.curve(torch.arange(n + 1, dtype=torch.float64), p).tolist()
            rows += [(device, cyc, p, k, v) for k, v in enumerate(g)]
    return rows


def write_csv(path: str | Path, rows: list[tuple], unit: str = "S") -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["device", "cycle", "polarity", "pulse", f"conductance_{unit}"])
        scale = UNITS[unit.lower()]
        for d, c, p, k, g in rows:
            w.writerow([d, c, p, k, repr(float(g) / scale)])


def plot_fit(fit: Fit, path: str | Path, table: dict | None = None) -> None:
    """Data, fitted curves and residuals, a column per polarity (Agg, no pyplot); a table card's tables
    (``table``: the card) drawn over them in black."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    colors = {d: f"C{i % 10}" for i, d in enumerate(fit.devices)}
    for col, p in enumerate(("ltp", "ltd")):
        top, bottom = axes[0, col], axes[1, col]
        for c in (c for c in fit.curves if c.polarity == p):
            top.plot(c.k, c.g * 1e6, ".", ms=2, color=colors[c.device], alpha=0.5)
            kk = np.linspace(c.k[0], c.k[-1], 200)
            top.plot(kk, c.model(kk) * 1e6, "-", lw=0.8, color=colors[c.device])
            bottom.plot(c.k, c.residuals * 1e6, ".", ms=2, color=colors[c.device], alpha=0.5)
        if table is not None:
            values = np.asarray(table[f"table_{p}"]) * 1e6
            top.plot(np.arange(values.size), values, "k--", lw=1.2, label="table (cycle mean)")
            top.legend(loc="best", fontsize=8)
        elif col == 0 and 1 < len(fit.devices) <= 10:
            for d in fit.devices:
                top.plot([], [], "-", color=colors[d], label=d)
            top.legend(loc="best", fontsize=8, title="device")
        title = "potentiation" if p == "ltp" else "depression"
        top.set_title(f"{title}: label {fit.card['nl_' + p]:.3g}, RMS {fit.rms[p] * 1e6:.3g} µS, "
                      f"R² {fit.r2[p]:.4f}")
        top.set_ylabel("conductance (µS)")
        bottom.axhline(0.0, color="k", lw=0.5)
        bottom.set_ylabel("residual (µS)")
        bottom.set_xlabel("pulse")
    fig.savefig(path, dpi=120)


def simulate_measurements(spec, devices: int, cycles: int, seed: int = 0) -> list[tuple]:
    """Pulse trains the device model itself gives (CSV rows as ``card_table``): ``devices`` cells of the card
    (each its own device-to-device draw), programmed one pulse at a time, for ``cycles`` cycles of
    states − 1 potentiation then states_ltd − 1 depression pulses from g_min, each reading noise-free (c2c
    noise only). What the tests fit back, and how the shipped example was made."""
    import torch

    from neurosim.device import DeviceArray

    gen = torch.Generator().manual_seed(seed)
    arr = DeviceArray(spec, (devices, 1), gen, dtype=torch.float64)
    names = [f"d{i}" for i in range(devices)]
    rows = []
    for cyc in range(cycles):
        for p, n, sign in (("ltp", spec.pulses_ltp, 1.0), ("ltd", spec.pulses_ltd, -1.0)):
            trace = [arr.conductance().reshape(-1).clone()]
            for _ in range(n):
                arr.program(torch.full((devices, 1), sign, dtype=torch.float64))
                trace.append(arr.conductance().reshape(-1).clone())
            g = torch.stack(trace).T.tolist()
            rows += [(names[d], cyc, p, k, v) for d in range(devices) for k, v in enumerate(g[d])]
    return rows


def _monotone(values: np.ndarray, increasing: bool) -> tuple[np.ndarray, str]:
    """The least-squares monotone sequence nearest ``values`` (scipy's isotonic regression; scipy < 1.12 lacks
    it: a running maximum/minimum then, which the notes name)."""
    try:
        from scipy.optimize import isotonic_regression
    except ImportError:  # pragma: no cover - old scipy
        acc = np.maximum.accumulate if increasing else np.minimum.accumulate
        return acc(values), "a running maximum/minimum"
    return np.asarray(isotonic_regression(values, increasing=increasing).x), "isotonic regression"


def _spread_ties(values: np.ndarray) -> np.ndarray:
    """A monotone sequence made strictly monotone: each run of equal entries (where the cycle mean turned back
    and the isotonic fit pooled it) is spread linearly from its value to the next distinct one (the last run:
    from the previous distinct value to its own). A card's table must move at every pulse (a plateau would
    leave a cell's place on it unknown); the change is within the scatter the pooling averaged."""
    out = values.astype(float).copy()
    n = len(out)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and out[j + 1] == out[i]:
            j += 1
        if j > i:
            if j + 1 < n:
                out[i:j + 1] = np.linspace(values[i], values[j + 1], j - i + 2)[:-1]
            elif i > 0:
                out[i:j + 1] = np.linspace(values[i - 1], values[i], j - i + 2)[1:]
        i = j + 1
    return out


def table_card(fit: Fit, source: str) -> dict:
    """The fitted card made a table card: the cycle mean of each polarity's curves (all devices and cycles) as
    table_ltp/table_ltd, made monotone, the window from the tables' ends; c2c keeps its absolute sigma, the
    window spreads stay; the label spread has no meaning for a table and is dropped (the notes say so)."""
    src = Path(source).name
    tables, how = {}, ""
    for p in ("ltp", "ltd"):
        mine = [c for c in fit.curves if c.polarity == p]
        late = next((c for c in mine if c.k[0] != 0), None)
        if late is not None:
            raise ConfigError(f"row {late.first_row}, column pulse", int(late.k[0]), "--table needs every curve's "
                              "reading before its first pulse (pulse 0)", source)
        mono, how = _monotone(np.mean([c.g for c in mine], axis=0), p == "ltp")
        tables[p] = _spread_ties(mono)
    card = {k: v for k, v in fit.card.items() if k not in ("nl_ltp", "nl_ltd", "nl_dtod", "source", "notes")}
    old_span = card["g_max"] - card["g_min"]
    card["g_min"] = float(0.5 * (tables["ltp"][0] + tables["ltd"][-1]))
    card["g_max"] = float(0.5 * (tables["ltp"][-1] + tables["ltd"][0]))
    card["c2c"] = fit.card["c2c"] * old_span / (card["g_max"] - card["g_min"])
    card["table_ltp"] = [float(v) for v in tables["ltp"]]
    card["table_ltd"] = [float(v) for v in tables["ltd"]]
    n_curves = len(fit.curves) // 2
    cite = dict(fit.card["source"])
    for k in ("nl_ltp", "nl_ltd", "nl_dtod"):
        cite.pop(k, None)
    base = f"fitted by neurosim fit-device --table to {src}"
    cite["g_min"] = f"{base}: mean of the potentiation table's first and the depression table's last entry"
    cite["g_max"] = f"{base}: mean of the potentiation table's last and the depression table's first entry"
    cite["c2c"] = (f"{base}: RMS of the one-pulse residuals of the exponential fit (absolute sigma kept) / "
                   "the table's window")
    cite["table_ltp"] = (f"{base}: mean over the {n_curves} potentiation curves at each pulse, made monotone "
                          f"({how}; ties spread linearly)")
    cite["table_ltd"] = (f"{base}: mean over the {n_curves} depression curves at each pulse, made monotone "
                          f"({how}; ties spread linearly)")
    card["source"] = cite
    notes = [f"Table card: the device follows the cycle mean of {src} (table_ltp, table_ltd), interpolated "
             "linearly between pulses; the noise and spreads come from the exponential fit below."]
    if "nl_dtod" in fit.card:
        notes.append(f"The exponential fit's label spread (nl_dtod = {fit.card['nl_dtod']:.3g}) has no meaning for a "
                     "table and is not applied: device-to-device differences of shape are left out.")
    card["notes"] = "\n".join([*notes, fit.card["notes"]])
    return card
