"""Where linearized DGC may stand in for exact DGC: measured on the chip at hand, refused outside.

Linearized DGC differentiates the noise-free model with the converters straight through. The chip instead
measures a finite cost difference through its ADCs (and DACs): without noise before a converter, a small
perturbation changes the measured cost only when it moves some value across a converter step, so a
single-pulse perturbation on a 6- to 12-bit chip measures mostly zeros and a few spikes (docs/training.md,
"Linearized DGC: validity envelope"). Noise before a converter dithers it: the *expected* measurement then
follows the Gaussian-smoothed staircase, whose slope is the straight-through one, and what remains is the
measurement noise the linearized mode already adds.

So the question is whether the expected exact measurement equals what the linearized mode assumes, g·Δw.
``linearized_agreement`` answers it for one layer, once, before training: it measures a sample of real
perturbations through the chip's own forward path (every converter and neuron circuit; dropout, a
regularizer both modes share, off), averaged over noise draws with common random numbers (the base and the
perturbed chip see the same noise, so the average converges to E[C(w+Δ)] − E[C(w)] fast), and takes the
cosine with the linearized prediction g_lin·Δ for the same real Δ. Where a converter is surely dithered (an
underestimate of the noise reaching it has sigma >= half its step in 95 % of its conversions) it is replaced
in this average by its expectation, the identity within its range: the smoothed staircase's slope departs
from 1 by at most 2·exp(−π²/2) = 1.4 % there, and the average needs far fewer draws.
``check_linearized_validity`` refuses (ConfigError on ``training.dgc.mode``) below ``MIN_COSINE``. The check
draws from the chip's random streams and puts their states back, so a run's numbers do not depend on whether
it was checked.

Not compared: the spread of the measurements. The linearized mode draws Gaussian noise of the measured cost
spread, which is right by construction when measurements are independent.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from neurosim.config import ConfigError
from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.config import DGCConfig
from neurosim.training.cost import cost_per_sample, noise_free
from neurosim.training.dgc import linearized_gradients, perturbation_effect

MIN_COSINE = 0.9   # below this cosine with the expected exact measurement, linearized DGC is refused
SAMPLE = 128       # perturbations measured per layer
DRAWS = 16         # noise draws averaged per perturbation when the chip has per-evaluation noise
MAX_DRAWS = 256    # ... doubled up to this many while the cosine is too close to the threshold to tell
ACCEPT_DRAWS = 64  # a noisy chip is accepted only on at least this many draws (see linearized_agreement)
_FINE_BITS = 24    # a dithered converter's stand-in: the same range, a step far below any perturbation


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How well linearized DGC predicts the expected exact measurement of one layer, and why."""

    layer: str
    cosine: float            # cosine of g_lin·Δ with E[ΔC] over the sampled perturbations
    perturbations: int       # how many were measured
    draws: int               # noise draws averaged per perturbation (1: the chip has no per-evaluation noise)
    silent: float            # fraction of them whose every measurement was exactly zero (no step crossed)
    adc_step: float | None   # the layer's ADC step, normalized units of Σ x̂·ŵ (None: ideal ADC)
    column_change: float     # a perturbation's typical change of a column sum: median |x̂|·median |Δŵ|
    adc_noise: float         # median sigma of the noise reaching the layer's ADC, same units

    def describe(self) -> str:
        text = (f"layer {self.layer}: cosine {self.cosine:.2f} with exact DGC over {self.perturbations} "
                f"perturbations")
        if self.silent > 0:
            text += f", {100 * self.silent:.0f} % of which measure no change at all"
        if self.adc_step is not None:
            ratio = self.adc_step / max(self.column_change, 1e-30)
            text += (f" (ADC step {self.adc_step:.3g} = {ratio:.3g}x a perturbation's typical column change "
                     f"{self.column_change:.3g}; noise sigma at the ADC {self.adc_noise:.3g})")
        return text


@dataclasses.dataclass(frozen=True)
class _Converters:
    """The noise reaching one layer's converters (an underestimate, see ``_converters``), normalized like
    their inputs: the median sigma at the ADC, the sigma at the DAC, and whether each is surely dithered."""

    adc_step: float | None
    adc_noise: float
    dac_noise: float
    adc_dithered: bool
    dac_dithered: bool


def _step(bits: int | None, limit: float) -> float | None:
    return None if bits is None else limit / (2 ** (bits - 1) - 1)


def _converters(network: AnalogNetwork, x: torch.Tensor) -> dict[str, _Converters]:
    """Per analog layer, the noise at its DAC and ADC inputs, from one noise-free pass (the chip as it is
    otherwise). An underestimate, so that a converter is never called dithered when it is not: the read
    noise of the layer's own read, plus the output noise of the neuron circuits of the layer below when it
    reaches the layer unchanged (through flatten or dropout; not through pooling, which averages or selects
    noisy values, nor from circuits with an output clip); the read noise of lower layers carried up is left
    out. An ADC counts as dithered when 95 % of its conversions see sigma >= half a step."""
    out: dict[str, _Converters] = {}
    h, sigma_in = x, 0.0
    with torch.no_grad():
        reads = {layer.name: layer.crossbar._read_tensors()[1] for layer in network.analog_layers}
        neuron = {layer.name: layer.activation.config.noise for layer in network.analog_layers}
        with noise_free(network), _without_dropout(network):
            for stage in network.stages:
                if not isinstance(stage, AnalogLayer):
                    h = stage(h)
                    if not isinstance(stage, nn.Flatten | nn.Dropout | nn.Dropout2d | nn.Identity):
                        sigma_in = 0.0
                    continue
                cb = stage.crossbar
                c = cb.config
                gsq = reads[stage.name]
                xn = cb.input_voltages(stage.matrix_input(h))                              # (nr, N, R)
                w_hat = cb._read_tensors()[0].reshape(cb.n_row_tiles, cb.tile_rows, -1)
                var = torch.zeros((*xn.shape[:2], w_hat.shape[2]), dtype=xn.dtype, device=xn.device)
                if gsq is not None and cb.spec.read_noise > 0:
                    scale = cb.spec.read_noise / (cb.k * c.w_max)
                    var = var + torch.bmm(xn * xn, gsq.reshape(w_hat.shape)) * scale ** 2
                if sigma_in > 0:
                    # Every driven row carries the neuron noise of the layer below, except the bias row.
                    driven = torch.ones(cb.padded_shape[0], device=xn.device, dtype=xn.dtype)
                    driven[cb.in_features - int(stage.has_bias):] = 0
                    w2 = (w_hat * w_hat) * driven.reshape(cb.n_row_tiles, cb.tile_rows, 1)
                    var = var + (sigma_in / c.input_max) ** 2 * w2.sum(1)[:, None, :]
                sigma = var[..., : cb.out_features].sqrt().reshape(-1).float()
                adc_noise = float(sigma.median()) if sigma.numel() else 0.0
                low = float(torch.quantile(sigma[:2 ** 24], 0.05)) if sigma.numel() else 0.0
                dac_noise = sigma_in / c.input_max
                adc, dac = _step(c.adc_bits, c.adc_range), _step(c.dac_bits, 1.0)
                out[stage.name] = _Converters(adc, adc_noise, dac_noise, adc is not None and low >= adc / 2,
                                              dac is not None and dac_noise >= dac / 2)
                h = stage(h)
                unit = stage.activation.config
                sigma_in = neuron[stage.name] if unit.output_range is None else 0.0
    return out


@contextmanager
def _expected_converters(network: AnalogNetwork, plan: dict[str, _Converters]) -> Iterator[None]:
    """Dithered converters replaced by fine ones of the same range (their expectation), the rest as they are."""
    saved = [(layer.crossbar, layer.crossbar.config) for layer in network.analog_layers]
    try:
        for cb, c in saved:
            p = plan[cb.name]
            cb.config = dataclasses.replace(c, adc_bits=_FINE_BITS if p.adc_dithered else c.adc_bits,
                                            dac_bits=_FINE_BITS if p.dac_dithered else c.dac_bits)
        yield
    finally:
        for cb, c in saved:
            cb.config = c


@contextmanager
def _without_dropout(network: AnalogNetwork) -> Iterator[None]:
    """Dropout off: a training regularizer both modes share (one mask per step), not part of the chip."""
    drop = [m for m in network.modules() if isinstance(m, nn.Dropout | nn.Dropout2d) and m.training]
    try:
        for m in drop:
            m.eval()
        yield
    finally:
        for m in drop:
            m.train()


def _has_noise(network: AnalogNetwork) -> bool:
    """Does a forward pass draw anything (read noise, neuron noise)?"""
    for layer in network.analog_layers:
        cb = layer.crossbar
        if cb.noise and cb.config.read_noise and cb.spec.read_noise > 0:
            return True
        if layer.activation.config.noise > 0:
            return True
    return False


def _generators(network: AnalogNetwork) -> list[torch.Generator]:
    gens: dict[int, torch.Generator] = {}
    for layer in network.analog_layers:
        cb = layer.crossbar
        for g in (cb.noise_generator, cb.read_stream, cb.rounding_stream, cb.pulse_stream,
                  *(a.noise_generator for a in cb._arrays()), *layer.activation._noise_gens.values()):
            gens[id(g)] = g
    return list(gens.values())


@contextmanager
def _private_streams(network: AnalogNetwork) -> Iterator[None]:
    """Everything drawn inside comes from the chip's streams and is given back: states restored, generators
    made inside (neuron noise streams are made on first use) forgotten, torch's global stream forked."""
    units = [layer.activation for layer in network.analog_layers]
    made = [dict(u._noise_gens) for u in units]
    states = [(g, g.get_state()) for g in _generators(network)]
    cuda = sorted({g.device.index or 0 for g, _ in states if g.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            for g, s in states:
                g.set_state(s)
            for u, m in zip(units, made, strict=True):
                u._noise_gens.clear()
                u._noise_gens.update(m)


def real_perturbations(network: AnalogNetwork, layer: AnalogLayer, cfg: DGCConfig) -> list[torch.Tensor]:
    """The real weight change (in, out) that perturbing each weight makes, per sign of the difference (one
    draw of the cycle-to-cycle noise, from the chip's stream, which is given back)."""
    cb = layer.crossbar
    signs = (1.0, -1.0) if cfg.difference == "central" else (1.0,)
    with _private_streams(network):
        return [perturbation_effect(layer, cfg, s)[0][: cb.in_features, : cb.out_features] * cb.config.w_max
                for s in signs]


def _seed_streams(network: AnalogNetwork, seed: int) -> None:
    """Every stream a forward pass draws from, seeded from ``seed`` (made first where made on first use)."""
    for layer in network.analog_layers:
        if layer.activation.config.noise > 0:
            layer.activation._generator("noise", layer.crossbar.device)
    for k, g in enumerate(_generators(network)):
        g.manual_seed((seed * 1_000_003 + k) % (1 << 63))
    torch.manual_seed(seed % (1 << 63))


def expected_differences(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                         weights: torch.Tensor, deltas: list[torch.Tensor], draws: int, seed: int = 0
                         ) -> torch.Tensor:
    """The chip's measured cost differences (perturbations, draws): C(w+Δ⁺) − C(w) (forward) or
    C(w+Δ⁺) − C(w+Δ⁻) (central, two ``deltas``) for the flat (in·out) indices ``weights`` of ``layer``, each
    over ``draws`` noise draws; their average over the draws estimates the expected exact measurement.

    The base and every perturbed chip see the same draws (common random numbers: the difference is averaged,
    not the noise), from streams seeded by ``seed`` and given back afterwards; surely dithered converters are
    replaced by their expectation (see the module's docstring). The perturbed layer is read with its
    weights given explicitly, as exact DGC reads it (wire resistance left out, as there)."""
    cb = layer.crossbar
    idx = list(network.stages).index(layer)
    plan = _converters(network, x)
    w0 = cb.weights().detach()
    reps = (draws,) + (1,) * (x.dim() - 1)
    yr = y.repeat(draws)
    below = None

    def costs(w: torch.Tensor) -> torch.Tensor:
        _seed_streams(network, 2 * seed + 1)
        out = network(below, start=idx, mode="linearized", weights={layer.name: w})
        return cost_per_sample(out, yr, cost).reshape(draws, -1).mean(1)

    out = torch.empty(len(weights), draws, dtype=torch.float64)
    with _private_streams(network), torch.no_grad(), _expected_converters(network, plan), \
            _without_dropout(network):
        _seed_streams(network, 2 * seed)
        below = network(x.repeat(reps), stop=idx)  # what the layers below deliver, once per draw: common to all
        c0 = costs(w0) if len(deltas) == 1 else None
        for p, k in enumerate(weights.tolist()):
            i, j = divmod(k, cb.out_features)
            measured = []
            for d in deltas:
                w = w0.clone()
                w[i, j] += d[i, j]
                measured.append(costs(w))
            out[p] = (measured[0] - (measured[1] if c0 is None else c0)).double().cpu()
    return out


def _cosine(diffs: torch.Tensor, predicted: torch.Tensor) -> float:
    """Cosine of the average measured differences (perturbations, draws) with the prediction, disattenuated:
    the average's leftover noise, which would pull the cosine down, is taken out of its squared norm (so the
    estimate may pass 1 by its own noise; the caller clips it)."""
    mean = diffs.mean(1)
    signal = float(mean.square().sum())
    if diffs.shape[1] > 1:
        signal -= float(diffs.var(1).sum()) / diffs.shape[1]
    if signal <= 0 and float(mean.norm()) > 0:
        return math.nan  # the average is still all noise: undecided
    norm = math.sqrt(max(signal, 0.0)) * float(predicted.norm())
    if norm > 0:
        return float(mean @ predicted) / norm
    # Nothing measured or nothing predicted: agreement only if both are nothing.
    return 1.0 if float(mean.norm()) == 0 and float(predicted.norm()) == 0 else 0.0


def _jackknife(diffs: torch.Tensor, predicted: torch.Tensor, groups: int = 8) -> float:
    """Standard error of ``_cosine`` over the noise draws (delete-a-group jackknife; 0 for one draw, NaN
    while undecided)."""
    m = diffs.shape[1]
    if m < 4:
        return 0.0
    groups = min(groups, m // 2)
    parts = torch.arange(m) % groups
    values = torch.tensor([_cosine(diffs[:, parts != g], predicted) for g in range(groups)], dtype=torch.float64)
    return float(((groups - 1) / groups * (values - values.mean()).square().sum()).sqrt())


def linearized_agreement(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor,
                         cost: str, cfg: DGCConfig, sample: int = SAMPLE, draws: int | None = None,
                         seed: int = 0, near: float = MIN_COSINE, max_draws: int = MAX_DRAWS) -> Agreement:
    """Cosine between the linearized prediction g_lin·Δ and the expected exact measurement E[ΔC] of the same
    real perturbations Δ, over ``sample`` weights of ``layer`` (all when fewer) whose row is driven, averaged
    over ``draws`` noise draws (default: 1 for a chip without per-evaluation noise, else ``DRAWS``). While the
    cosine is within 3 standard errors of ``near`` the draws are doubled, up to ``max_draws``; if it is still
    undecided then, the plain cosine is returned (conservative: leftover noise only lowers it).

    Acceptance (cosine above ``near``) needs at least ``ACCEPT_DRAWS`` draws on a noisy chip: with 16, the
    jackknife's error of a cosine over staircase measurements (many exact zeros) can be far too small, and a
    6-bit chip whose cosine is 0.6 on 256 draws read 1.0 on 16 at two of eight seeds (accepting a mode
    outside its validity; refusing early costs the user only a clear message)."""
    cb = layer.crossbar
    idx = list(network.stages).index(layer)
    if draws is None:
        draws = DRAWS if _has_noise(network) else 1
    deltas = real_perturbations(network, layer, cfg)
    with _without_dropout(network):
        (g_lin,) = linearized_gradients(network, [layer], x, y, cost)
        with torch.no_grad(), noise_free(network):
            xn = cb.input_voltages(layer.matrix_input(network(x, stop=idx)))           # (nr, N, R)
    xn = xn.transpose(0, 1).reshape(xn.shape[1], -1)[:, : cb.in_features]              # (N, in)
    # Weights whose row is never driven measure nothing either way; sample among the others.
    active = (xn != 0).any(0)
    candidates = active[:, None].expand(-1, cb.out_features).reshape(-1).nonzero().squeeze(1)
    pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:sample]
    flat = candidates[pick.to(candidates.device)]
    change = deltas[0] - deltas[1] if len(deltas) == 2 else deltas[0]
    predicted = (g_lin * change).reshape(-1)[flat].double().cpu()
    diffs = expected_differences(network, layer, x, y, cost, flat, deltas, draws, seed)
    noisy = draws > 1

    def decide(cosine: float) -> bool:
        if noisy and cosine > near and diffs.shape[1] < min(ACCEPT_DRAWS, max_draws):
            return False
        return abs(cosine - near) >= 3 * _jackknife(diffs, predicted)   # NaN: not decided either

    cosine = _cosine(diffs, predicted)
    decided = decide(cosine)
    while not decided and diffs.shape[1] < max_draws:
        more = expected_differences(network, layer, x, y, cost, flat, deltas, diffs.shape[1],
                                    seed + diffs.shape[1])
        diffs = torch.cat([diffs, more], 1)
        cosine = _cosine(diffs, predicted)
        decided = decide(cosine)
    if not decided:  # still too noisy to tell: the plain cosine, which the leftover noise can only lower
        mean = diffs.mean(1)
        cosine = float(mean @ predicted) / max(float(mean.norm() * predicted.norm()), 1e-300)
    nz = xn[xn != 0].abs()
    typical = (float(nz.median()) if nz.numel() else 0.0) * float(deltas[0].abs().median()) / cb.config.w_max
    conv = _converters(network, x)[layer.name]
    silent = float((diffs == 0).all(1).double().mean()) if len(flat) else 0.0
    return Agreement(layer.name, max(-1.0, min(1.0, cosine)), len(flat), diffs.shape[1], silent, conv.adc_step,
                     typical, conv.adc_noise)


def check_linearized_validity(network: AnalogNetwork, layers: list[AnalogLayer], x: torch.Tensor,
                              y: torch.Tensor, cost: str, cfg: DGCConfig, min_cosine: float = MIN_COSINE,
                              sample: int = SAMPLE, seed: int = 0) -> list[Agreement]:
    """Refuse linearized DGC (ConfigError on ``training.dgc.mode``) where it would not predict the chip's
    expected measurement of some layer in ``layers`` to ``min_cosine``; returns the agreements otherwise.
    Does nothing in exact mode. Call it once, on the first training batch."""
    if cfg.mode != "linearized":
        return []
    found = [linearized_agreement(network, layer, x, y, cost, cfg, sample, seed=seed, near=min_cosine)
             for layer in layers]
    bad = [a for a in found if a.cosine < min_cosine]
    if bad:
        raise ConfigError("training.dgc.mode", "linearized",
                          f"outside its validity on this chip: {'; '.join(a.describe() for a in bad)}; it needs "
                          f"a cosine >= {min_cosine}. Use mode = 'exact', or more ADC bits, a smaller adc_range, "
                          "more read noise to dither the converters, or a larger perturbation (docs/training.md, "
                          "'Linearized DGC: validity envelope')")
    return found
