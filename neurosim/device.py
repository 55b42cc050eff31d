"""Synaptic devices: a validated card (``DeviceSpec``) and a tensor of cells built from it (``DeviceArray``).

Pulse response (the exponential model used by NeuroSim and most device benchmarks):
potentiation from g_min by p pulses gives G(p) = g_min + B·(1 − exp(−p/A)), B = (g_max − g_min)/(1 − exp(−P/A)),
P = states − 1; depression is the same curve mirrored from g_max with its own A and pulse count. A pulse applied
to a cell at conductance G first finds G on the curve of that pulse's polarity (inverting the closed form),
moves along it, and reads the new G -- so potentiation and depression can differ (asymmetry), and every cell has
a finite number of levels between its bounds. A pulse starts from the conductance the cell has now (drift
included) and restarts its drift. Idealized writes (``set_conductance``) place a cell on the nearest level it
can reach by potentiation pulses from g_min. All cells of an array live in tensors; no Python loop over cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neurosim.config import ConfigError, build, load_toml, setting
from neurosim.random_streams import NUMBA

# Fields that carry a number of the card; each one set away from its default must cite a source.
_NUMERIC_FIELDS = (
    "g_min", "g_max", "states", "states_ltd", "nl_ltp", "nl_ltd", "a_ltp", "a_ltd", "c2c", "read_noise",
    "g_min_dtod", "g_max_dtod", "nl_dtod", "step_dtod", "stuck_at_gmin", "stuck_at_gmax", "drift_nu",
    "drift_nu_dtod", "drift_t0", "pulse_voltage_ltp", "pulse_voltage_ltd", "pulse_width", "table_ltp", "table_ltd",
)

# A normalized A above this is treated as linear (the curve then deviates from a line by < 1e-7 of the range).
_LINEAR_A = 1e6
# A normalized |A| below this is a step response to float precision for every pulse count a card accepts (one
# pulse moves x by at least 0.05/65536 = 7.6e-7 = 7.6e5·A: exp(−7.6e5) = 0); the floor keeps 1/A finite.
_STEP_A = 1e-12
# Conductances a card may give (S): outside, no synaptic device exists, and float32 products such as G² (the
# read-noise variance) would leave the format's range.
G_RANGE = (1e-15, 1.0)
# The smallest step of a linear device across the window, relative to g_max: float32 (24-bit mantissa) then
# holds every step to 1/128 or better, so that a card's states are states of the simulation too.
MIN_STEP = 2.0**-16
#: Largest read_noise: a read G·(1 + σz) is clamped at 0 (a conductance is not negative), and at σ ≤ 0.2 the
#: clamp touches 2.9e-7 of the reads, so the crossbar's column-summed Gaussian (which cannot clamp per cell) and
#: the per-cell reads are the same distribution to < 1e-6 (mean 1.1e-8, sigma 2.8e-7 relative).
MAX_READ_NOISE = 0.2


@dataclass(frozen=True)
class DeviceSpec:
    """One device card: every field documented, every number with its source."""

    name: str = setting(doc="display name of the device")
    g_min: float = setting(doc="lowest programmable conductance (S)", gt=0.0)
    g_max: float = setting(doc="highest programmable conductance (S)", gt=0.0)
    states: int = setting(doc="distinct conductance levels on the potentiation curve, g_min..g_max", ge=2)
    technology: str = setting("unknown", "RRAM, PCM, FeFET, ECRAM, ideal, ...")
    description: str = setting("", "one sentence on the device")
    states_ltd: int | None = setting(None, "levels on the depression curve (default: states)", ge=2)
    nl_ltp: float = setting(0.0, "NeuroSim nonlinearity label of potentiation (0 = linear)")
    nl_ltd: float = setting(0.0, "NeuroSim nonlinearity label of depression (sign as published; |label| used)")
    a_ltp: float | None = setting(None, "A of potentiation normalized by its pulse count (overrides nl_ltp)", gt=0.0)
    a_ltd: float | None = setting(None, "A of depression normalized by its pulse count (overrides nl_ltd)", gt=0.0)
    c2c: float = setting(0.0, "cycle-to-cycle sigma of one pulse's conductance change, fraction of g_max-g_min",
                         ge=0.0)
    read_noise: float = setting(0.0, f"sigma of one read, fraction of the cell's conductance (reads clamp at 0; "
                                f"at most {MAX_READ_NOISE})", ge=0.0)
    g_min_dtod: float = setting(0.0, "device-to-device relative sigma of g_min", ge=0.0)
    g_max_dtod: float = setting(0.0, "device-to-device relative sigma of g_max", ge=0.0)
    nl_dtod: float = setting(0.0, "device-to-device sigma of the nonlinearity label, absolute, in label units "
                             "(NeuroSim's sigmaDtoD); each polarity drawn on its own", ge=0.0)
    step_dtod: float = setting(0.0, "device-to-device relative sigma of the step per pulse", ge=0.0)
    stuck_at_gmin: float = setting(0.0, "fraction of cells stuck at g_min", ge=0.0, le=1.0)
    stuck_at_gmax: float = setting(0.0, "fraction of cells stuck at g_max", ge=0.0, le=1.0)
    drift_nu: float = setting(0.0, "drift exponent: G(t) = G(t0)·(t/t0)^-nu", ge=0.0)
    drift_nu_dtod: float = setting(0.0, "device-to-device relative sigma of the drift exponent", ge=0.0)
    drift_t0: float = setting(1.0, "reference time of drift (s)", gt=0.0)
    pulse_voltage_ltp: float | None = setting(None, "potentiation pulse amplitude (V), for energy estimates")
    pulse_voltage_ltd: float | None = setting(None, "depression pulse amplitude (V), for energy estimates")
    pulse_width: float | None = setting(None, "programming pulse width (s)", gt=0.0)
    table_ltp: tuple[float, ...] | None = setting(
        None, "measured mean conductance (S) after 0, 1, ..., states − 1 potentiation pulses: the device follows "
        "this table (interpolated linearly; its shape, scaled to each cell's window) instead of the exponential")
    table_ltd: tuple[float, ...] | None = setting(
        None, "measured mean conductance (S) after 0, 1, ..., states_ltd − 1 depression pulses (with table_ltp)")
    notes: str = setting("", "free text: how numbers were derived, what is unknown")
    source: dict = setting(default_factory=dict, doc="citation for each numeric field (key 'default' covers zeros)")

    def validate(self) -> None:
        lo, hi = G_RANGE
        for name in ("g_min", "g_max"):
            if not lo <= getattr(self, name) <= hi:
                raise ConfigError(name, getattr(self, name), f"must lie in [{lo:g}, {hi:g}] S (no synaptic device "
                                  "outside; float32 products of conductances would leave their range)")
        if self.g_max <= self.g_min:
            raise ConfigError("g_max", self.g_max, f"must be greater than g_min ({self.g_min})")
        pulses = max(self.pulses_ltp, self.pulses_ltd)
        if (self.g_max - self.g_min) / pulses < MIN_STEP * self.g_max:
            field = "g_max" if pulses == 1 else "states" if self.pulses_ltp >= self.pulses_ltd else "states_ltd"
            value = self.g_max if pulses == 1 else pulses + 1
            raise ConfigError(field, value, f"a window of {self.g_min:g} .. {self.g_max:g} S in {pulses} step(s) "
                              "gives steps below 2^-16 of g_max, finer than float32 resolves: widen the window "
                              "or use fewer states")
        from neurosim.nonlinearity import MAX_LABEL

        for name in ("nl_ltp", "nl_ltd"):
            if abs(getattr(self, name)) >= MAX_LABEL:
                raise ConfigError(name, getattr(self, name), f"|label| must be below {MAX_LABEL:.2f} (a step response)")
        if self.read_noise > MAX_READ_NOISE:
            raise ConfigError("read_noise", self.read_noise, f"must be <= {MAX_READ_NOISE}: above it a Gaussian read "
                              "G(1 + sigma z) falls below 0 S often enough that clamping it (a conductance is not "
                              "negative) and the crossbar's column-summed Gaussian differ")
        if self.stuck_at_gmin + self.stuck_at_gmax > 1.0:
            raise ConfigError("stuck_at_gmax", self.stuck_at_gmax, "stuck_at_gmin + stuck_at_gmax must be <= 1")
        if self.table_ltp is not None or self.table_ltd is not None:
            self._validate_tables()
        for key, text in self.source.items():
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"source.{key}", text, "must be a non-empty citation string")
            if key != "default" and key not in _NUMERIC_FIELDS:
                raise ConfigError(f"source.{key}", text, "cites a field the card does not have")

    def _validate_tables(self) -> None:
        """A table card: both tables, one entry per state, conductances that move the polarity's way at every
        pulse, and no exponential shape fields beside them."""
        for name, other in (("table_ltp", "table_ltd"), ("table_ltd", "table_ltp")):
            if getattr(self, name) is None:
                raise ConfigError(name, None, f"a table card needs both tables ({other} is given)")
        for name in ("nl_ltp", "nl_ltd", "a_ltp", "a_ltd", "nl_dtod"):
            if getattr(self, name) not in (None, 0.0):
                raise ConfigError(name, getattr(self, name), "a table card takes its curves from table_ltp and "
                                  "table_ltd: no nonlinearity label, A or label spread beside them")
        lo, hi = G_RANGE
        for name, count, up in (("table_ltp", self.states, True), ("table_ltd", self.states_ltd or self.states,
                                                                   False)):
            t = getattr(self, name)
            if len(t) != count:
                what = "states" if name == "table_ltp" else "states_ltd (default: states)"
                raise ConfigError(name, f"{len(t)} entries", f"needs one entry per state: {what} = {count}")
            for i, v in enumerate(t):
                if not lo <= v <= hi:
                    raise ConfigError(f"{name}[{i}]", v, f"must lie in [{lo:g}, {hi:g}] S")
                if i and ((v <= t[i - 1]) if up else (v >= t[i - 1])):
                    raise ConfigError(f"{name}[{i}]", v, f"does not {'rise above' if up else 'fall below'} "
                                      f"{t[i - 1]!r}: a {'potentiation' if up else 'depression'} table must move "
                                      "every pulse (a cell's conductance is its state: on a plateau or a turn "
                                      "back its place on the curve would be unknown)")

    def table_shape(self, polarity: str) -> tuple[float, ...] | None:
        """The normalized table of a polarity, 0 at its first entry and 1 at its last (None: exponential)."""
        t = self.table_ltp if polarity == "ltp" else self.table_ltd
        if t is None:
            return None
        first, span = t[0], t[-1] - t[0]
        return tuple((v - first) / span for v in t)

    # -- derived quantities -------------------------------------------------------------------------------
    @property
    def pulses_ltp(self) -> int:
        """Pulses that take a nominal cell from g_min to g_max."""
        return self.states - 1

    @property
    def pulses_ltd(self) -> int:
        return (self.states_ltd or self.states) - 1

    @property
    def on_off_ratio(self) -> float:
        return self.g_max / self.g_min

    def label(self, polarity: str) -> float:
        """The nonlinearity label of a polarity's curve as the model uses it: |label|, or the label of a_ltp/a_ltd."""
        a, label = (self.a_ltp, self.nl_ltp) if polarity == "ltp" else (self.a_ltd, self.nl_ltd)
        if a is None:
            return abs(label)
        from neurosim.nonlinearity import label_from_a

        return float(label_from_a(a))

    def a_norm(self, polarity: str) -> float:
        """A divided by the pulse count; math.inf for a linear response."""
        a, label = (self.a_ltp, self.nl_ltp) if polarity == "ltp" else (self.a_ltd, self.nl_ltd)
        if a is not None:
            return a
        if label == 0:
            return math.inf
        from neurosim.nonlinearity import a_from_label

        return float(a_from_label(abs(label)))

    def nearest_level(self, g: torch.Tensor) -> torch.Tensor:
        """The level of a nominal cell (no spread) nearest ``g`` among those potentiation pulses reach from g_min,
        in g's dtype: what a controller that knows the card believes an idealized write placed (the same
        arithmetic as ``DeviceArray.nearest_level``, so the same bits for an array without spreads)."""
        kw = {"device": g.device, "dtype": g.dtype}
        if self.table_ltp is not None:
            shape = torch.tensor(self.table_shape("ltp"), **kw)
            return _nearest_level_table(g, torch.tensor(self.g_min, **kw), torch.tensor(self.g_max, **kw), shape,
                                        torch.tensor(1.0, **kw) / float(self.pulses_ltp))
        a = torch.tensor(min(self.a_norm("ltp"), _LINEAR_A), **kw)
        per = torch.tensor(1.0, **kw) / float(self.pulses_ltp)
        return _nearest_level(g, torch.tensor(self.g_min, **kw), torch.tensor(self.g_max, **kw), list(_constants(a)),
                              per)

    def curve(self, pulses: torch.Tensor, polarity: str = "ltp") -> torch.Tensor:
        """Closed-form nominal conductance after ``pulses`` pulses from the start of a curve (reference for
        tests and plots)."""
        p_max = self.pulses_ltp if polarity == "ltp" else self.pulses_ltd
        shape = self.table_shape(polarity)
        if shape is not None:
            frac = table_response((pulses / p_max).clamp(0.0, 1.0), torch.tensor(shape, dtype=pulses.dtype,
                                                                                 device=pulses.device))
        else:
            frac = normalized_response(pulses / p_max, torch.full_like(pulses, self.a_norm(polarity)))
        span = self.g_max - self.g_min
        return self.g_min + span * frac if polarity == "ltp" else self.g_max - span * frac


def _curve(x: torch.Tensor, a: torch.Tensor, em: torch.Tensor, linear: torch.Tensor, convex: torch.Tensor
           ) -> torch.Tensor:
    """normalized_response with the per-cell constants of ``_constants`` already computed (a mask that is one
    value for all cells skips the branch it rules out)."""
    flip = bool(convex.dim()) or bool(convex)
    xr = torch.where(convex, 1.0 - x, x) if flip else x
    if linear.dim() == 0:
        y = xr if bool(linear) else torch.expm1(-xr / a) / em
    else:
        y = torch.where(linear, xr, torch.expm1(-xr / a) / em)
    return torch.where(convex, 1.0 - y, y) if flip else y


def _inverse(y: torch.Tensor, a: torch.Tensor, em: torch.Tensor, linear: torch.Tensor, convex: torch.Tensor
             ) -> torch.Tensor:
    """The curve position x in [0, 1] of y in [0, 1]; finite for every cell (a steep cell's flat end maps to
    the end of the curve instead of ±inf)."""
    flip = bool(convex.dim()) or bool(convex)
    yr = torch.where(convex, 1.0 - y, y) if flip else y
    if linear.dim() == 0:
        x = yr.clamp(0.0, 1.0) if bool(linear) else (-a * torch.log1p(yr * em)).clamp_(0.0, 1.0)
    else:
        x = torch.where(linear, yr, -a * torch.log1p(yr * em)).clamp_(0.0, 1.0)
    return torch.where(convex, 1.0 - x, x) if flip else x


def _constants(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|a| within [_STEP_A, _LINEAR_A], expm1(−1/|a|), linear mask, convex mask): what the curve needs of a
    signed normalized A (negative: the point-reflected, convex curve), computed once per cell."""
    a = torch.as_tensor(a)
    convex = a < 0
    mag = a.abs()
    linear = mag >= _LINEAR_A
    mag = mag.clamp(_STEP_A, _LINEAR_A)
    return mag, torch.expm1(-1.0 / mag), linear, convex


def normalized_response(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(1 − exp(−x/a)) / (1 − exp(−1/a)) for x in [0, 1] pulses-fractions: 0 → 0, 1 → 1; linear as |a| → ∞;
    a negative a is the point reflection 1 − g_|a|(1 − x) (a curve that starts slowly)."""
    return _curve(x, *_constants(a))


def inverse_response(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The fraction of pulses x in [0, 1] whose normalized_response is y (y in [0, 1])."""
    return _inverse(y, *_constants(a))


def _nearest_level(g: torch.Tensor, g_min: torch.Tensor, g_max: torch.Tensor, curve: list[torch.Tensor],
                   per: torch.Tensor) -> torch.Tensor:
    """The level nearest g among G_k = g_min + span·f(min(k·per, 1)), k = 0, 1, ...: the conductances whole
    potentiation pulses reach from g_min (``per``: curve fraction per pulse; ``curve``: ``_constants``)."""
    span = g_max - g_min
    y = ((g - g_min) / span).clamp(0.0, 1.0)
    k = torch.floor(_inverse(y, *curve) / per)          # the level below y, or one less by rounding
    below = _curve((k * per).clamp(max=1.0), *curve)
    above = _curve(((k + 1) * per).clamp(max=1.0), *curve)
    return g_min + span * torch.where(y - below <= above - y, below, above)


def table_response(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """A table's normalized conductance at curve positions x in [0, 1]: linear between its entries, which sit
    at x = k/(len − 1) (``shape``: the table normalized to 0 … 1, rising)."""
    n = shape.numel() - 1
    t = x * n
    i = t.floor().clamp_(0, n - 1)
    frac = t - i
    i = i.long()
    left = shape[i]
    return left + (shape[i + 1] - left) * frac


def table_position(y: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The curve position x in [0, 1] of normalized conductances y on a table (the inverse of
    ``table_response``; the table rises strictly, which validation ensures)."""
    n = shape.numel() - 1
    y = y.clamp(0.0, 1.0)
    i = (torch.searchsorted(shape, y.contiguous(), right=True) - 1).clamp_(0, n - 1)
    left, right = shape[i], shape[i + 1]
    width = right - left
    frac = torch.where(width > 0, (y - left) / torch.where(width > 0, width, torch.ones_like(width)),
                       torch.zeros_like(y)).clamp_(0.0, 1.0)
    return (i.to(y.dtype) + frac) / n


def _nearest_level_table(g: torch.Tensor, g_min: torch.Tensor, g_max: torch.Tensor, shape: torch.Tensor,
                         per: torch.Tensor) -> torch.Tensor:
    """``_nearest_level`` for a table card: the level nearest g among the conductances whole potentiation
    pulses reach from g_min along the table."""
    span = g_max - g_min
    y = ((g - g_min) / span).clamp(0.0, 1.0)
    k = torch.floor(table_position(y, shape) / per)
    below = table_response((k * per).clamp(0.0, 1.0), shape)
    above = table_response(((k + 1) * per).clamp(0.0, 1.0), shape)
    return g_min + span * torch.where(y - below <= above - y, below, above)


def truncated_normal(mean: float, sigma: float, bound: float, shape: tuple[int, ...], generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """Gaussian draws N(mean, sigma²) conditioned on |value| < bound (float64), by the inverse CDF: one uniform
    number per draw, no pile-up at the bound (a draw beyond it is redrawn in distribution, not clamped). The
    CDF is taken as erf around the centre, so that a huge sigma (bounds at a tiny fraction of it) still gives
    its limit, the uniform distribution, instead of rounding every draw to the mean."""
    lo, hi = (-bound - mean) / sigma / math.sqrt(2.0), (bound - mean) / sigma / math.sqrt(2.0)
    e_lo, e_hi = math.erf(lo), math.erf(hi)
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64).add_(2.0**-54)  # in (0, 1)
    z = torch.erfinv(u.mul_(e_hi - e_lo).add_(e_lo)).clamp_(lo, hi)
    return z.mul_(sigma * math.sqrt(2.0)).add_(mean).clamp_(-bound, bound)


def load_card(path_or_name: str | Path) -> DeviceSpec:
    """A card from a file path, or a shipped card by name (``"ag_asi"``); errors name the file and field."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        shipped = shipped_card_paths()
        if str(path_or_name) not in shipped:
            names = ", ".join(sorted(shipped))
            raise ConfigError("device", str(path_or_name), f"no such shipped device card (shipped: {names})")
        path = shipped[str(path_or_name)]
    data = load_toml(path)
    spec = build(DeviceSpec, data, source=str(path))
    _check_sources(data, spec, str(path))
    return spec


def _check_sources(data: dict, spec: DeviceSpec, where: str) -> None:
    """Every number written in a card file cites a source; 'default' may cover numbers left at zero."""
    for name in _NUMERIC_FIELDS:
        if name not in data or name in spec.source:
            continue
        if data[name] == 0 and "default" in spec.source:
            continue
        raise ConfigError(f"source.{name}", None, f"the number in '{name}' ({data[name]!r}) cites no source",
                          where)


def shipped_card_paths() -> dict[str, Path]:
    """name -> path of every card installed with the package (the repository's devices/ folder)."""
    from importlib import resources

    folder = resources.files("neurosim.cards")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def shipped_cards() -> dict[str, DeviceSpec]:
    return {name: load_card(path) for name, path in sorted(shipped_card_paths().items())}


class DeviceArray:
    """A (rows, cols) array of cells of one card: conductances plus per-cell parameters sampled once.

    The generator is used once at construction (device-to-device sampling and faults); cycle-to-cycle and read
    noise draw from a second generator, so that the same seed gives the same chip whatever is done with it.
    """

    def __init__(self, spec: DeviceSpec, shape: tuple[int, int], generator: torch.Generator,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 noise_generator: torch.Generator | None = None):
        self.spec = spec
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.noise_generator = noise_generator or generator
        # The cycle-to-cycle stream of training writes through ``program_pairs`` (a crossbar gives both arrays
        # of a pair its Philox stream, so that the fused CPU pass draws the same numbers as the torch pass);
        # None: those writes draw from ``noise_generator`` like every other write.
        self.pulse_stream = None
        kw = {"device": self.device, "dtype": dtype}
        g = generator

        def spread(nominal: float, sigma: float) -> torch.Tensor:
            # A positive parameter with relative spread sigma: lognormal with mean `nominal` and standard deviation
            # sigma·nominal, so no cell needs a floor and none piles up at one, at any sigma (a relative Gaussian
            # clamped at a floor put 16 % of cells on it at sigma = 1). Without a spread the parameter is one
            # broadcast scalar: no memory per cell, no gather when programming.
            if sigma == 0 or nominal == 0:
                return torch.tensor(nominal, **kw)
            s = math.sqrt(math.log1p(sigma * sigma))
            z = torch.randn(self.shape, generator=g, dtype=torch.float64, device=self.device)
            return (nominal * torch.exp(s * z - 0.5 * s * s)).to(dtype)

        self.g_min = spread(spec.g_min, spec.g_min_dtod)
        g_max = spread(spec.g_max, spec.g_max_dtod)
        # A cell's window stays open: at least 1% of the nominal range above its own g_min.
        self.g_max = torch.maximum(g_max, self.g_min + 0.01 * (spec.g_max - spec.g_min))
        # Signed normalized A per cell and polarity (negative: the cell's curve bends the other way).
        self.a_ltp, self.a_ltd = self._nonlinearity("ltp", g), self._nonlinearity("ltd", g)
        # Per cell, per polarity: (|A| clamped, expm1(−1/|A|), linear mask, convex mask, pulses across the window).
        self._curves = {"ltp": (*_constants(self.a_ltp), float(spec.pulses_ltp)),
                        "ltd": (*_constants(self.a_ltd), float(spec.pulses_ltd))}
        self.step = spread(1.0, spec.step_dtod)
        # A table card: the normalized table of each polarity (the exponential columns of the pulse table are
        # then placeholders of a linear curve, never used).
        self._shapes = None if spec.table_ltp is None else tuple(
            torch.tensor(spec.table_shape(p), device=self.device, dtype=dtype) for p in ("ltp", "ltd"))
        self.drift_nu = spread(spec.drift_nu, spec.drift_nu_dtod)
        u = torch.rand(self.shape, generator=g, **kw)
        self.stuck_low = u < spec.stuck_at_gmin
        self.stuck_high = (u >= spec.stuck_at_gmin) & (u < spec.stuck_at_gmin + spec.stuck_at_gmax)
        self.stuck = self.stuck_low | self.stuck_high
        self.any_stuck = bool(self.stuck.any())
        # Whether any pulse parameter differs between cells (stuck cells aside): else every cell has the levels
        # of the nominal card.
        self.varies = any(t.dim() for t in (self.g_min, self.g_max, self.step, self.a_ltp, self.a_ltd))
        if self.any_stuck and spec.drift_nu > 0:  # a stuck cell holds its value: it does not drift either
            self.drift_nu = torch.where(self.stuck, 0.0, self.drift_nu.expand(self.shape))
        self._table = self._pulse_table()
        self.g = self._apply_stuck(self.g_min.expand(self.shape).clone())
        self.t_programmed = torch.zeros(self.shape, **kw)
        self.time_s = 0.0  # the chip's clock, advanced by whoever owns the timeline (drift)
        self.version = 0  # bumped on every write, so readers can cache derived tensors

    def _nonlinearity(self, polarity: str, generator: torch.Generator) -> torch.Tensor:
        """Signed normalized A of every cell for one polarity. The device-to-device spread is drawn where
        NeuroSim draws it (``getParamA(NL + N(0, sigmaDtoD))``): a Gaussian of absolute sigma ``nl_dtod`` on the
        label, conditioned on |label| < MAX_LABEL (a step response) so that nothing piles up at a bound. A cell
        whose label crosses 0 bends the other way (negative A); a linear card's cells scatter around linear."""
        spec = self.spec
        if spec.nl_dtod == 0:
            a = min(max(spec.a_norm(polarity), _STEP_A), _LINEAR_A)
            return torch.tensor(a, device=self.device, dtype=self.dtype)
        from neurosim.nonlinearity import MAX_LABEL, a_from_label_tensor

        labels = truncated_normal(spec.label(polarity), spec.nl_dtod, MAX_LABEL * (1.0 - 2.0**-40), self.shape,
                                  generator, self.device)
        return a_from_label_tensor(labels).clamp_(-_LINEAR_A, _LINEAR_A).to(self.dtype)

    # -- state --------------------------------------------------------------------------------------------
    def _apply_stuck(self, g: torch.Tensor) -> torch.Tensor:
        if not self.any_stuck:
            return g
        return torch.where(self.stuck_low, self.g_min, torch.where(self.stuck_high, self.g_max, g))

    def set_conductance(self, g: torch.Tensor, snap: bool = True) -> None:
        """Place every cell at a conductance directly: an idealized write (``program`` and write-and-verify are
        the physical paths). Each cell lands on the level nearest ``g`` that it can reach by potentiation pulses
        from g_min along its own curve (``nearest_level``); stuck cells stay stuck. ``snap=False`` places the
        values themselves (clipped to each window), levels the device may not be able to hold: for references
        and tests of other parts only."""
        g = torch.as_tensor(g, device=self.device, dtype=self.dtype).expand(self.shape)
        g = self.nearest_level(g) if snap else torch.clamp(g, self.g_min, self.g_max)
        self.g = self._apply_stuck(g)
        self.t_programmed.fill_(self.time_s)
        self.version += 1

    def nearest_level(self, g: torch.Tensor) -> torch.Tensor:
        """The conductance nearest ``g`` among the levels each cell reaches by whole potentiation pulses from
        g_min (its own window, step and curve). Stuck cells are not treated specially here."""
        g = torch.as_tensor(g, device=self.device, dtype=self.dtype).expand(self.shape)
        *curve, count = self._curves["ltp"]
        if self._shapes is not None:
            return _nearest_level_table(g, self.g_min, self.g_max, self._shapes[0], self.step / count)
        return _nearest_level(g, self.g_min, self.g_max, curve, self.step / count)

    def _now(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Conductances of flat cells ``idx`` (None: all) now, drift included: the same arithmetic as
        ``conductance()``, so the same bits. A pulse starts from here."""
        g = self.g.reshape(-1) if idx is None else flat_view(self, self.g).index_select(0, idx)
        if not self.drifting:
            return g
        t = self.t_programmed.reshape(-1) if idx is None else flat_view(self, self.t_programmed).index_select(0, idx)
        neg_nu = self._neg_nu()
        if neg_nu.dim():
            if idx is None:
                neg_nu = neg_nu.reshape(-1)
            else:
                flat = flat_view(self, neg_nu) if neg_nu.is_contiguous() else neg_nu.reshape(-1)
                neg_nu = flat.index_select(0, idx)
        return self._drifted(g, t, neg_nu)

    def max_drift_nu(self) -> float:
        """The largest drift exponent of any cell (kept until ``drift_nu`` is replaced)."""
        if getattr(self, "_max_nu_of", None) is not self.drift_nu:
            self._max_nu_of, self._max_nu_value = self.drift_nu, float(self.drift_nu.max())
        return self._max_nu_value

    def _neg_nu(self) -> torch.Tensor:
        """−ν of every cell (or one scalar), kept until ``drift_nu`` is replaced: drift needs it at every read."""
        if getattr(self, "_neg_nu_of", None) is not self.drift_nu:
            self._neg_nu_of, self._neg_nu_value = self.drift_nu, self.drift_nu.neg()
        return self._neg_nu_value

    _numpy_memo: tuple | None = None   # (data pointers, flat numpy views), see numpy_views

    def numpy_views(self) -> tuple:
        """Flat numpy views (g, t_programmed, −ν flat or one value) for the CPU kernels, remembered for the
        tensors' data pointers (the views keep that memory alive, so no other tensor can take a remembered
        pointer): a training step's write and the read cache's rebuild pass them to numba, and making them
        anew took a dozen operations a step."""
        nu = self._neg_nu()
        ptrs = (self.g.data_ptr(), self.t_programmed.data_ptr(), nu.data_ptr())
        memo = self._numpy_memo
        if memo is None or memo[0] != ptrs:
            memo = self._numpy_memo = (ptrs, (self.g.view(-1).numpy(), self.t_programmed.view(-1).numpy(),
                                              nu.reshape(-1).numpy()))
        return memo[1]

    def _pair_numpy(self) -> np.ndarray:
        """The pair's shared pulse table (``pair_arrays``) as a numpy array, remembered while it is the same."""
        shared = self._pair[1]
        memo = self.__dict__.get("_pair_np")
        if memo is None or memo[0] != shared.data_ptr():   # (the view keeps its memory: no pointer reuse)
            memo = self._pair_np = (shared.data_ptr(), shared.numpy())
        return memo[1]

    def _drifted(self, g: torch.Tensor, t: torch.Tensor, neg_nu: torch.Tensor, ahead: float = 0.0) -> torch.Tensor:
        """G·(max(t_now − t_prog, t0)/t0)^−ν as exp(−ν·ln(age/t0)) in one fresh buffer, in place: a drifting
        chip rebuilds its read tensors at every step, and a power of a tensor to a tensor costs as much as a
        logarithm and an exponential together, plus five temporaries. (Since 2026-12-01; before, ``pow``:
        the same function, rounded differently in the last bits.)"""
        return self._log_age(t, ahead).mul_(neg_nu).exp_().mul_(g)

    def _log_age(self, t: torch.Tensor, ahead: float = 0.0) -> torch.Tensor:
        """ln(max(t_now − t_prog, t0)/t0) of programming times ``t``, in a fresh buffer (t_now: the clock, plus
        ``ahead`` seconds)."""
        t0 = self.spec.drift_t0
        a = torch.rsub(t, self.time_s + ahead).clamp_(min=t0)
        if t0 != 1.0:
            a.div_(t0)
        return a.log_()

    def pulse_position(self, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each cell sits on its potentiation and depression curves, in nominal pulses (0 … pulse count,
        finite): of ``g``, or of the conductance now (drift included)."""
        g = self.conductance() if g is None else g
        y = ((g - self.g_min) / (self.g_max - self.g_min)).clamp(0.0, 1.0)
        *ltp, n_ltp = self._curves["ltp"]
        *ltd, n_ltd = self._curves["ltd"]
        if self._shapes is not None:
            return table_position(y, self._shapes[0]) * n_ltp, table_position(1.0 - y, self._shapes[1]) * n_ltd
        return _inverse(y, *ltp) * n_ltp, _inverse(1.0 - y, *ltd) * n_ltd

    def after_pulses(self, pulses: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Conductances that signed pulse counts (> 0 potentiation, < 0 depression) would give, without
        changing the array: each cell moves from its conductance now (drift included) along the curve of the
        pulses' polarity by |n| times its own step, stops at its bounds, and gets cycle-to-cycle noise of sigma
        c2c·(g_max − g_min)·sqrt(|n|) (independent noise per pulse). Stuck cells stay where they are; cells
        without pulses keep their conductance now (``conductance()``)."""
        n = torch.as_tensor(pulses, device=self.device, dtype=self.dtype).expand(self.shape).reshape(-1)
        hit = n != 0  # stuck cells are pulsed too, and stay put (their bounds in the table)
        if bool(hit.all()):  # every cell (DGC perturbs them all): no gathers
            return self._moved(None, n, noise).reshape(self.shape).clone()
        idx = hit.nonzero().squeeze(1)
        out = self._now().clone()
        if idx.numel():
            out[idx] = self._moved(idx, n[idx], noise)
        return out.reshape(self.shape)

    def pulsed(self, g: torch.Tensor, pulses: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Conductances that signed pulse counts would give to cells at conductances ``g`` (full shape), every
        cell pulsed, without changing the array: what DGC's perturbing and restoring pulses do to all cells
        of a layer (each cell on its own, as the chip does one after another)."""
        n = torch.as_tensor(pulses, device=self.device, dtype=self.dtype).expand(self.shape).reshape(-1)
        saved = self.g, self.t_programmed
        try:  # g is what the cells hold now: no drift on top of it
            self.g, self.t_programmed = g.reshape(self.shape), torch.full_like(saved[1], self.time_s)
            return self._moved(None, n, noise).reshape(self.shape).clone()
        finally:
            self.g, self.t_programmed = saved

    def _pulse_table(self) -> tuple[torch.Tensor, tuple[bool, bool]]:
        """What a pulse needs of a cell, packed so that the sparse path fetches it with one gather, in affine
        form so that the pulse takes few operations: rows (cell, polarity) -- or just (polarity) when every cell
        is alike -- and columns

            0, 1  position on the saturating curve from G: c0 + c1·G  (LTP: (G − g_min)/span; LTD: 1 − that)
            2     curve fraction per pulse, signed like the pulse: ±step / pulse count
            3, 4  −|A| and expm1(−1/|A|) of the curve
            5, 6  G from a curve position: c5 + c6·y
            7, 8  lower and upper bound of G (both the stuck value for a stuck cell, which then stays put)

        A convex curve (negative A: the cell's label crossed 0) is the saturating curve of |A| point-reflected:
        its columns are the other polarity's frame with the step's sign reversed, so one formula serves both.
        The flags are per polarity (every cell linear: the cheap form) plus whether any cell is convex; a cell
        whose |A| reaches _LINEAR_A follows the exponential form, which is then linear to < 1e-7."""
        per_cell = self.any_stuck or any(t.dim() for t in (self.g_min, self.g_max, self.step, self.a_ltp,
                                                           self.a_ltd))
        shape = self.shape if per_cell else ()
        lo, hi = self.g_min.expand(shape), self.g_max.expand(shape)
        span = hi - lo
        low, high = self._apply_stuck(lo), self._apply_stuck(hi)  # unchanged when no cell is stuck
        columns, linear, any_convex = [], [], False
        up = (-lo / span, 1.0 / span, lo, span)                  # frame measured from g_min upwards
        down = (1.0 + lo / span, -1.0 / span, hi, -span)         # frame measured from g_max downwards
        for name, sign in (("ltp", 1.0), ("ltd", -1.0)):
            a, em, lin, convex, count = self._curves[name]
            linear.append(bool(lin.all()))
            frame, per = (up, sign * self.step / count) if sign > 0 else (down, sign * self.step / count)
            if bool(convex.any()):
                any_convex = True
                other = down if sign > 0 else up
                frame = tuple(torch.where(convex, o, f) for f, o in zip(frame, other, strict=True))
                per = torch.where(convex, -per, per)
            c0, c1, y0, dy = frame
            cols = (c0, c1, per, -a, em, y0, dy, low, high)
            columns.append(torch.stack([torch.as_tensor(c, dtype=self.dtype, device=self.device)
                                        .expand(shape).reshape(-1) for c in cols], dim=-1))
        table = torch.stack(columns, dim=-2)                     # (cells or 1, 2 polarities, 9)
        return table.reshape(-1, 9).contiguous(), (linear[0], linear[1], any_convex)

    def _moved(self, idx: torch.Tensor | None, ns: torch.Tensor, noise: bool) -> torch.Tensor:
        """New conductances of cells ``idx`` (flat; None: all) after signed pulse counts ``ns`` (non-zero).

        Only pulsed cells are computed, each on the one curve of its polarity, with one gather of the packed
        table: a training step pulses a small fraction of the cells, and this is the simulator's hottest path,
        where the cost is the number of operations rather than their size."""
        down = ns < 0
        if idx is None:
            t = self._table[0].view(-1, 2, 9)
            some_down = bool(down.any())
            if some_down and not bool(down.all()):
                constants = torch.where(down.unsqueeze(1), t[:, 1], t[:, 0])
            else:  # one polarity for all (DGC's perturbations): the table's rows as they are, no selection
                constants = t[:, 1] if some_down else t[:, 0]
            g = self._now()
        else:
            constants, g = self._gather(idx, down)
        return self._pulse(constants, g, ns, down, noise)

    def _gather(self, idx: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The table rows of cells ``idx`` for their pulses' polarity, and their conductances now."""
        table = self._table[0]
        rows = down.long() if table.shape[0] == 2 else idx.mul(2).add_(down)
        return table.index_select(0, rows), self._now(idx)

    def _pulse(self, constants: torch.Tensor, g: torch.Tensor, ns: torch.Tensor, down: torch.Tensor | None,
               noise: bool, stream: Any = None) -> torch.Tensor:
        """The pulse response on gathered rows of the table (see ``_pulse_table`` for the columns); ``down``
        (ns < 0) is needed only when one polarity is linear and the other not (None: computed here). ``stream``:
        a PhiloxStream for the cycle-to-cycle draws (draw k for cell k of 1-d ``ns``), else the noise generator.
        The oracle of the fused CPU pass (neurosim._pulse_numba)."""
        lin_p, lin_d, convex = self._table[1]
        c0, c1, per_pulse, neg_a, em, y0, dy, low, high = constants.unbind(1)
        pos = torch.addcmul(c0, c1, g).clamp_(0.0, 1.0)   # where the cell is on the curve of its polarity
        step = ns * per_pulse                              # |n| pulses along that curve (backwards: convex)
        if self._shapes is not None:                       # a table card (no convex cells: no label spread)
            down = ns < 0 if down is None else down
            up_shape, down_shape = self._shapes
            x = torch.where(down, table_position(pos, down_shape), table_position(pos, up_shape))
            x = x.add_(step).clamp_(0.0, 1.0)
            moved = torch.where(down, table_response(x, down_shape), table_response(x, up_shape))
        elif lin_p and lin_d:
            moved = pos.add_(step).clamp_(0.0, 1.0)
        else:
            x = torch.log1p(pos * em).mul_(neg_a)          # +inf at a steep curve's flat end: the end, x = 1
            if convex:
                x.clamp_(max=1.0)                          # before a backward step, so that the step counts
            x = x.add_(step).clamp_(0.0, 1.0)
            moved = torch.expm1(x.div_(neg_a)).div_(em)
            if lin_p or lin_d:
                down = ns < 0 if down is None else down
                moved = torch.where(down if lin_d else ~down, (pos + step).clamp_(0.0, 1.0), moved)
        g_new = torch.addcmul(y0, dy, moved)
        if noise and self.spec.c2c > 0:
            if stream is not None:
                draw = stream.normal(ns.shape, dtype=self.dtype)
            else:
                draw = torch.randn(ns.shape, generator=self.noise_generator, device=self.device, dtype=self.dtype)
            g_new.addcmul_(draw, ns.abs().sqrt_(), value=self.spec.c2c * (self.spec.g_max - self.spec.g_min))
        return torch.minimum(torch.maximum(g_new, low), high)

    def program(self, pulses: torch.Tensor) -> None:
        """Apply signed pulse counts to every cell at once (see ``after_pulses``)."""
        n = torch.as_tensor(pulses, device=self.device, dtype=self.dtype).expand(self.shape).reshape(-1)
        idx = (n != 0).nonzero().squeeze(1)
        self.program_cells(idx, n[idx])

    def program_cells(self, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """Apply signed pulse counts to the cells of flat indices ``idx`` only, in place: a training update
        pulses a few percent of the cells, so nothing scans or copies the whole array. Stuck cells take the
        pulses and stay put (and, not drifting, their age does not matter)."""
        if idx.numel() == 0:
            return
        if idx.numel() == self.g.numel():  # every cell: no gathers
            if not bool((idx[1:] > idx[:-1]).all()):  # sparse sampling returns cells in no order
                counts = counts.index_select(0, idx.argsort())
            self.g = self._moved(None, counts, True).reshape(self.shape).clone()
            if self.spec.drift_nu > 0:
                self.t_programmed.fill_(self.time_s)
            self.version += 1
        else:
            self._store(idx, self._moved(idx, counts, True))

    def _store(self, idx: torch.Tensor, g: torch.Tensor) -> None:
        """Write new conductances of cells ``idx`` (flat), their programming time and the version."""
        flat_view(self, self.g).index_copy_(0, idx, g)
        if self.spec.drift_nu > 0:  # the age of a cell matters only where it drifts
            flat_view(self, self.t_programmed).index_fill_(0, idx, self.time_s)
        self.version += 1

    def pulses_for(self, g_target: torch.Tensor, g_now: torch.Tensor | None = None) -> torch.Tensor:
        """(Fractional) signed pulse counts that would move each cell from ``g_now`` (default: its conductance
        now, drift included; write-and-verify passes what it read) to ``g_target`` along the curve of the needed
        polarity, as a controller that has characterized every cell's curve would compute them. Finite for
        every cell: positions lie in 0 … pulse count."""
        g_now = self.conductance() if g_now is None else g_now
        p, q = self.pulse_position(g_now)
        p_t, q_t = self.pulse_position(torch.clamp(g_target, self.g_min, self.g_max))
        up = (p_t - p) / self.step
        down = -(q_t - q) / self.step
        return torch.where(g_target >= g_now, up.clamp(min=0), down.clamp(max=0))

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def drifting(self) -> bool:
        """Whether conductance() differs from g: drift on, and the clock past t0."""
        return self.spec.drift_nu > 0 and self.time_s > self.spec.drift_t0

    def read_key(self) -> tuple:
        """Changes whenever conductance() may: a write, or the clock moving while drifting."""
        return (self.version, self.time_s if self.drifting else None)

    def conductance(self, rows: int | slice | None = None, ahead: float = 0.0) -> torch.Tensor:
        """Noise-free conductance now, drift included: G·((t − t_prog)/t0)^-nu once t − t_prog exceeds t0.
        ``rows``: only the first rows, or a slice of rows (a crossbar's padded rows carry no current; their
        drift is not needed). ``ahead``: drift as it will be that many seconds past the clock, the writes
        unchanged (a crossbar's read cache computes its drift for the middle of its validity window)."""
        if rows is None:
            rows = slice(None)
        elif not isinstance(rows, slice):
            rows = slice(None, rows)
        g = self.g[rows]
        if not self.drifting:
            return g  # no cell is older than t0 yet
        neg_nu = self._neg_nu()
        return self._drifted(g, self.t_programmed[rows], neg_nu[rows] if neg_nu.dim() else neg_nu, ahead)

    def read(self) -> torch.Tensor:
        """Conductance as one read sees it: drift plus read noise of relative sigma read_noise."""
        g = self.conductance()
        if self.spec.read_noise == 0:
            return g
        noise = torch.randn(self.shape, generator=self.noise_generator, device=self.device, dtype=self.dtype)
        return (g * (1.0 + self.spec.read_noise * noise)).clamp(min=0.0)

    def advance(self, seconds: float) -> None:
        """Move the array's clock forward (drift)."""
        if seconds < 0:
            raise ValueError(f"advance: seconds must be >= 0, got {seconds}")
        self.time_s += seconds  # read_key() follows the clock once conductances drift

    def state_dict(self) -> dict[str, Any]:
        """Every per-cell tensor at the array's full shape (scalar parameters expanded)."""
        names = ("g", "g_min", "g_max", "a_ltp", "a_ltd", "step", "drift_nu", "stuck_low", "stuck_high",
                 "t_programmed")
        return {k: getattr(self, k).expand(self.shape) for k in names}


def flat_view(owner: object, t: torch.Tensor) -> torch.Tensor:
    """``t.view(-1)``, kept on ``owner`` while ``t`` is alive and the same tensor: the sparse write of a training
    step takes a dozen flat views of the same few tensors (conductances, programming times, beliefs), each
    an operation of its own. A few entries at most (old ones are dropped once the owner's tensors change)."""
    cache = owner.__dict__.get("_flat_views")
    if cache is None:
        cache = owner.__dict__["_flat_views"] = {}
    hit = cache.get(id(t))
    if hit is None or hit[0] is not t or hit[1].data_ptr() != t.data_ptr():   # (a copy of the owner: remade)
        if len(cache) >= 8:
            cache.clear()
        hit = cache[id(t)] = (t, t.view(-1))
    return hit[1]


def pair_conductances(first: DeviceArray, second: DeviceArray, rows: int | slice | None = None,
                      ahead: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``conductance(rows, ahead)`` of both devices of a pair, the same bits. The two are written together
    (pulses, placement, write-and-verify at one clock), so their programming times are usually equal: then the
    logarithm of the age, the dearer half of drift, is taken once for both."""
    if not (first.drifting and second.drifting and first.time_s == second.time_s
            and first.spec.drift_t0 == second.spec.drift_t0):
        return first.conductance(rows, ahead), second.conductance(rows, ahead)
    if rows is None:
        rows = slice(None)
    elif not isinstance(rows, slice):
        rows = slice(None, rows)
    t1, t2 = first.t_programmed[rows], second.t_programmed[rows]
    if not torch.equal(t1, t2):
        return first.conductance(rows, ahead), second.conductance(rows, ahead)
    nu1, nu2 = (nu[rows] if nu.dim() else nu for nu in (first._neg_nu(), second._neg_nu()))
    log_age = first._log_age(t1, ahead)
    return torch.mul(log_age, nu1).exp_().mul_(first.g[rows]), log_age.mul_(nu2).exp_().mul_(second.g[rows])


def pair_arrays(first: DeviceArray, second: DeviceArray) -> None:
    """Make the two pulse tables halves of one tensor, so that ``program_pair`` fetches the rows of both
    devices of the pulsed pairs with one gather (no extra memory: the halves are views)."""
    shared = torch.cat([first._table[0], second._table[0]])
    m = first._table[0].shape[0]
    # One pass serves both devices, so its flags must hold for both: the cheap linear form only where both are
    # linear, the convex clamp where either has a convex cell (a no-op for the other cells).
    (lp1, ld1, cv1), (lp2, ld2, cv2) = first._table[1], second._table[1]
    flags = (lp1 and lp2, ld1 and ld2, cv1 or cv2)
    first._table, second._table = (shared[:m], flags), (shared[m:], flags)
    first._pair = (second, shared)


def program_pair(first: DeviceArray, second: DeviceArray, idx: torch.Tensor, counts: torch.Tensor
                 ) -> torch.Tensor | None:
    """Differential pairs: cells ``idx`` of ``first`` get ``counts`` pulses and the same cells of ``second``
    get −counts, in one pass over both (half the operations of two ``program_cells`` calls, which is what a
    training step's cost is made of). Returns the new conductances (first's, then second's), or None when
    it fell back to two separate calls (arrays not paired by ``pair_arrays``, or every cell pulsed)."""
    return program_pairs([(first, second, idx, counts)])[0]


def program_pairs(writes: list[tuple[DeviceArray, DeviceArray, torch.Tensor, torch.Tensor]]
                  ) -> list[torch.Tensor | None]:
    """``program_pair`` for several pairs of arrays (the layers of a network) in one pass of the device model.
    The pairs must share the card (the first pair's cycle-to-cycle stream draws for all); a pair that
    cannot join (not paired, or every cell pulsed) is programmed on its own. Returns, per pair, the new
    conductances of its cells (first's, then second's) or None where it fell back."""
    return _program_pairs(writes, halves=False)


def _program_pairs(writes: list[tuple[DeviceArray, DeviceArray, torch.Tensor, torch.Tensor]], halves: bool
                   ) -> list:
    """``program_pairs``; ``halves``: each pair's new conductances as (first's, second's), split once for all
    pairs (a crossbar's read-cache patch wants them so). A write may carry a fifth item, a crossbar's request
    to patch its read cache in the same pass: [(ŵ, ΣG², bfloat16 bits, k·w_max), done]; the CPU kernel
    patches and sets done = True, the torch pass leaves it to the crossbar (a pair so patched gets its 2n
    values unsplit: nobody reads them)."""
    out: list = [None] * len(writes)
    joined, others = [], []
    targets = {}
    for i, (first, second, idx, counts, *target) in enumerate(writes):
        if target and target[0] is not None:
            targets[i] = target[0]
        n = idx.numel()
        paired = getattr(first, "_pair", None)
        if n == 0:
            continue
        if n == first.g.numel() or paired is None or paired[0] is not second:
            first.program_cells(idx, counts)
            second.program_cells(idx, -counts)
            continue
        lead = joined[0][1] if joined else first
        if (first.spec, first._table[1], first.dtype, first.device) != (lead.spec, lead._table[1], lead.dtype,
                                                                       lead.device):
            others.append(i)  # another card: its own pass
            continue
        joined.append((i, first, second, idx, counts))
    if others:
        for i, part in zip(others, _program_pairs([writes[i] for i in others], halves), strict=True):
            out[i] = part
    if not joined:
        return out
    if _fused(joined):
        _pulse_pairs_kernel(joined, halves, out, targets)
        return out
    lead = joined[0][1]
    gathered = []
    for _, first, second, idx, counts in joined:
        shared = first._pair[1]
        m = first._table[0].shape[0]
        down = (counts < 0).long()
        if m == 2:                                   # every cell alike: rows are (first, second) × polarity
            rows = torch.cat([down, 3 - down])
        else:
            base = idx * 2
            rows = torch.cat([base + down, base.add_(m + 1).sub_(down)])
        gathered.append((shared.index_select(0, rows), first._now(idx), second._now(idx)))
    # The pass's operands, pair after pair (first's cells, then second's): one concatenation each, the same
    # values in the same places as concatenating per pair first.
    constants = gathered[0][0] if len(gathered) == 1 else torch.cat([j[0] for j in gathered])
    g = torch.cat([t for j in gathered for t in (j[1], j[2])])
    ns = torch.cat([t for j in joined for t in (j[4], j[4].neg())])
    new = lead._pulse(constants, g, ns, None, True, lead.pulse_stream)
    if halves:
        pieces = iter(new.split([j[3].numel() for j in joined for _ in range(2)]))
        for i, first, second, idx, _ in joined:
            out[i] = (next(pieces), next(pieces))
            first._store(idx, out[i][0])
            second._store(idx, out[i][1])
        return out
    for (i, first, second, idx, _), part in zip(joined, new.split([2 * j[3].numel() for j in joined]), strict=True):
        for array, half in zip((first, second), part.split(idx.numel()), strict=True):
            array._store(idx, half)
        out[i] = part
    return out


def _fused(joined: list) -> bool:
    """Whether a joined pass runs as the CPU kernel (neurosim._pulse_numba): the analytic card model (a table
    card stays in torch), float32/float64 contiguous CPU tensors, and the pairs' Philox stream drawing through
    numba (so that both paths draw the same numbers). The drift of the starting conductances is computed in the
    kernel too (``DeviceArray._now``'s operations)."""
    lead = joined[0][1]
    stream = lead.pulse_stream
    if (stream is None or lead._shapes is not None or lead.device.type != "cpu"
            or lead.dtype not in (torch.float32, torch.float64) or stream.kernel != "numba"):
        return False
    for _, first, second, idx, counts in joined:
        for a in (first, second):
            if not (a.g.is_contiguous() and a.t_programmed.is_contiguous()):
                return False
        if (idx.dtype != torch.long or counts.dtype != lead.dtype or not idx.is_contiguous()
                or not counts.is_contiguous() or not first._pair[1].is_contiguous()):
            return False
    return True


def _pulse_pairs_kernel(joined: list, halves: bool, out: list, targets: dict | None = None) -> None:
    """``_program_pairs``' joined pass as one numba call per pair: the same draws (one stream call for the
    pass, the pairs' cells in the torch path's order), the same stores and version bumps; and the read-cache
    patches requested in ``targets`` (write index → [cache operands, done]) of float32 pairs."""
    lead = joined[0][1]
    stream = lead.pulse_stream
    spec = lead.spec
    noise = spec.c2c > 0
    total = sum([2 * j[3].numel() for j in joined])
    ctr = stream._take(total) if noise else 0
    k0, k1 = stream._key & 0xFFFFFFFF, stream._key >> 32
    scale = spec.c2c * (spec.g_max - spec.g_min) if noise else None
    stamp = spec.drift_nu > 0
    at = 0
    for i, first, second, idx, counts in joined:
        target = None if targets is None else targets.get(i)
        cache = target[0] if target is not None and first.dtype == torch.float32 else None
        (g1, t1, nu1), (g2, t2, nu2) = first.numpy_views(), second.numpy_views()
        new = torch.from_numpy(NUMBA.pulse.pulse_pair(
            first._pair_numpy(), first._table[0].shape[0], idx.numpy(), counts.numpy(), g1, g2, t1, t2,
            (first.time_s, second.time_s), stamp, (nu1 if first.drifting else None,
                                                   nu2 if second.drifting else None), spec.drift_t0,
            first._table[1], scale, ctr, k0, k1, at, cache))
        if cache is not None:
            target[1] = True
        at += new.numel()
        first.version += 1
        second.version += 1
        n = idx.numel()
        # A pair whose read cache this pass patched needs its values no more: no split (two operations)
        out[i] = (new[:n], new[n:]) if halves and cache is None else new
