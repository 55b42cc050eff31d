"""Direct gradient calculation (Kim et al., Adv. Intell. Syst. 2021, doi 10.1002/aisy.202100064).

The chip perturbs one weight at a time by a small programmed change, measures the cost through its output
path (ADC, noise), restores the weight, and uses g = ΔC/Δw. It needs no derivative circuit and no transposed
read: it measures the real chip, whatever its variation.

The chip is sequential; this simulator is not. ``dgc_exact`` evaluates every perturbation of a layer as one
batch: a perturbation of weight (i, j) changes only column j of the layer's pre-activation, by x_i·Δw_ij, so
the noise-free partial sums are computed once and each perturbation adds its own change, fresh read noise
(drawn at the output, exactly distributed), the ADC, fresh neuron-circuit noise and everything above the layer.
What it shares across perturbations: the layers *below* the perturbed one are read once per step (one noise
draw), where the chip would re-read them for each measurement; with noise off the results are identical to
the sequential loop (``dgc_sequential``), which is kept as the reference.

The perturbation is a real programming pulse through the device model (nonlinear step, cycle-to-cycle
noise), while the controller divides by the nominal Δw it believes it applied. The restore puts the
conductance back exactly (the stored value is rewritten).

``dgc_linearized`` replaces the measurements by autograd through the non-ideal model (converters straight
through) times the ratio of real to nominal perturbation, plus Gaussian measurement noise of the cost's
measured spread: a fast approximation, valid for small perturbations.
"""

from __future__ import annotations

import torch

from neurosim.crossbar import quantize
from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.base import Trainer, cost_per_sample, noise_free
from neurosim.training.config import DGCConfig

_CHUNK_ELEMENTS = 4_000_000  # partial sums held at once (floats), bounds memory of the batched evaluation


def _nominal_dw(layer: AnalogLayer, cfg: DGCConfig) -> float:
    if cfg.perturbation_dw is not None:
        return cfg.perturbation_dw
    return cfg.perturbation_pulses * layer.crossbar.dw_pulse


def perturbation_effect(layer: AnalogLayer, cfg: DGCConfig, sign: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What perturbing every weight would really do, each cell on its own: the change of the normalized
    weight (padded shape) and of Σ G² (for read noise). Pulses go through the device model."""
    cb = layer.crossbar
    arrays = cb._arrays()
    if cfg.perturbation_dw is not None:
        dw_hat = torch.full(cb.padded_shape, sign * cfg.perturbation_dw / cb.config.w_max, device=cb.device,
                            dtype=cb.dtype)
        new = [a.g + s * sign * cfg.perturbation_dw * cb.k / len(arrays) for a, s in zip(arrays, (1, -1),
                                                                                         strict=False)]
    else:
        n = torch.full(cb.padded_shape, sign * float(cfg.perturbation_pulses), device=cb.device, dtype=cb.dtype)
        new = [a.after_pulses(s * n) for a, s in zip(arrays, (1.0, -1.0), strict=False)]
        if len(arrays) == 2:
            dw_hat = ((new[0] - arrays[0].g) - (new[1] - arrays[1].g)) / (cb.k * cb.config.w_max)
        else:
            dw_hat = (new[0] - arrays[0].g) / (cb.k * cb.config.w_max)
    dgsq = None
    if cb._read_tensors()[1] is not None:
        dgsq = sum(g_new ** 2 - a.g ** 2 for g_new, a in zip(new, arrays, strict=True))
    return dw_hat, dgsq


def dgc_exact(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
              cfg: DGCConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Measured gradient of every weight of ``layer`` (in, out) and the base cost C(w), batched."""
    cb = layer.crossbar
    idx = list(network.stages).index(layer)
    with torch.no_grad():
        h = network(x, start=0, stop=idx)
        xt = cb.input_voltages(layer.matrix_input(h))                     # (nr, N, R)
        w_hat, gsq = cb._read_tensors()
        nr, n_rows, R = xt.shape
        cols = cb.padded_shape[1]
        part0 = torch.bmm(xt, w_hat.reshape(nr, R, cols))                 # noise-free partial sums
        var0 = torch.bmm(xt * xt, gsq.reshape(nr, R, cols)) if gsq is not None else None
        batch = x.shape[0]
        out_shape = (batch, *h.shape[1:])

        c = cb.config

        def measure_sums(z: torch.Tensor) -> torch.Tensor:
            """Costs of P chip states from the layer's digital column sums (P, N, padded cols)."""
            P = z.shape[0]
            z = z[..., : cb.out_features] * (c.input_max * c.w_max)
            z = layer.shape_output(z.reshape(P * n_rows, cb.out_features), (P * batch, *out_shape[1:]))
            out = network(layer.activate(z), start=idx + 1)
            return cost_per_sample(out, y.repeat(P), cost).reshape(P, batch).mean(1)

        def measure(part: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
            """Costs of P chip states from their partial sums (P, nr, N, cols): noise, ADC, neurons, above."""
            if var is not None:
                part = cb.add_read_noise(part, var)
            return measure_sums(quantize(part, c.adc_bits, c.adc_range).sum(1))

        # Without read noise every other column converts as in the base state: only the perturbed column's
        # ADC output changes, so a perturbation costs (N, cols) instead of (row tiles, N, cols).
        q0 = quantize(part0, c.adc_bits, c.adc_range) if var0 is None else None
        z0 = q0.sum(0) if q0 is not None else None

        c0 = measure(part0[None].clone(), var0[None].clone() if var0 is not None else None)[0]
        rows, outs = cb.in_features, cb.out_features
        total = rows * outs
        chunk = cfg.chunk or max(1, _CHUNK_ELEMENTS // max(1, (nr if var0 is not None else 1) * n_rows * cols))
        dw_nom = _nominal_dw(layer, cfg)
        signs = (1.0, -1.0) if cfg.difference == "central" else (1.0,)
        effects = [perturbation_effect(layer, cfg, s) for s in signs]
        costs = [torch.empty(total, device=xt.device, dtype=xt.dtype) for _ in signs]
        for start in range(0, total, chunk):
            k = torch.arange(start, min(total, start + chunk), device=xt.device)
            i, j = k // outs, k % outs
            r, ii = i // R, i % R
            P = len(k)
            ar = torch.arange(P, device=xt.device)
            xi = xt[r, :, ii]                                              # (P, N) input of the perturbed row
            for (dw_hat, dgsq), store in zip(effects, costs, strict=True):
                if z0 is not None:
                    column = part0[r, :, j] + xi * dw_hat[i, j][:, None]           # (P, N)
                    z = z0.expand(P, n_rows, cols).clone()
                    z[ar, :, j] += quantize(column, c.adc_bits, c.adc_range) - q0[r, :, j]
                    store[start:start + P] = measure_sums(z)
                    continue
                part = part0.expand(P, nr, n_rows, cols).clone()
                part[ar, r, :, j] += xi * dw_hat[i, j][:, None]
                var = None
                if var0 is not None:
                    var = var0.expand(P, nr, n_rows, cols).clone()
                    var[ar, r, :, j] += xi * xi * dgsq[i, j][:, None]
                store[start:start + P] = measure(part, var)
        if cfg.difference == "central":
            grad = (costs[0] - costs[1]) / (2 * dw_nom)
        else:
            grad = (costs[0] - c0) / dw_nom
    return grad.reshape(rows, outs), float(c0)


def dgc_sequential(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                   cfg: DGCConfig, weights: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, float]:
    """The chip's own procedure, one weight after another (the reference the batched mode reproduces):
    program a perturbation into one cell, measure the cost, restore. ``weights`` limits it to a subset."""
    cb = layer.crossbar
    arrays = cb._arrays()
    grad = torch.full((cb.in_features, cb.out_features), float("nan"), device=cb.device, dtype=cb.dtype)
    dw_nom = _nominal_dw(layer, cfg)

    def measure() -> torch.Tensor:
        with torch.no_grad():
            return cost_per_sample(network(x), y, cost).mean()

    c0 = measure()
    todo = weights if weights is not None else [(i, j) for i in range(cb.in_features)
                                                for j in range(cb.out_features)]
    signs = (1.0, -1.0) if cfg.difference == "central" else (1.0,)
    for i, j in todo:
        measured = []
        for sign in signs:
            saved = [(a.g.clone(), a.t_programmed.clone()) for a in arrays]
            if cfg.perturbation_dw is not None:
                for a, s in zip(arrays, (1.0, -1.0), strict=False):
                    g = a.g.clone()
                    g[i, j] += s * sign * cfg.perturbation_dw * cb.k / len(arrays)
                    a.g = g
                    a.version += 1
            else:
                n = torch.zeros(cb.padded_shape, device=cb.device, dtype=cb.dtype)
                n[i, j] = sign * cfg.perturbation_pulses
                for a, s in zip(arrays, (1.0, -1.0), strict=False):
                    a.program(s * n)
            measured.append(measure())
            for a, (g, t) in zip(arrays, saved, strict=True):  # restore: the stored value is rewritten
                a.g, a.t_programmed = g, t
                a.version += 1
        grad[i, j] = (measured[0] - measured[1]) / (2 * dw_nom) if len(signs) == 2 else (measured[0] - c0) / dw_nom
    return grad, float(c0)


def linearized_gradients(network: AnalogNetwork, layers: list[AnalogLayer], x: torch.Tensor, y: torch.Tensor,
                         cost: str) -> list[torch.Tensor]:
    """∂C/∂w of every layer in ``layers`` through the noise-free non-ideal model, converters straight through:
    one autograd pass (what linearized DGC multiplies by the real perturbation)."""
    leaves = {layer.name: layer.crossbar.weights().detach().clone().requires_grad_(True) for layer in layers}
    with noise_free(network), torch.enable_grad():
        c_lin = cost_per_sample(network(x, mode="linearized", weights=leaves), y, cost).mean()
        return list(torch.autograd.grad(c_lin, list(leaves.values())))


def dgc_linearized_layers(network: AnalogNetwork, layers: list[AnalogLayer], x: torch.Tensor, y: torch.Tensor,
                          cost: str, cfg: DGCConfig, generator: torch.Generator | None = None
                          ) -> tuple[dict[str, torch.Tensor], float]:
    """Linearized DGC of several layers of one step: one autograd pass through the noise-free non-ideal model
    and one estimate of the measurement noise serve them all (the chip would measure them all on one state).
    Valid only where the chip's converters pass a perturbation's effect (resolved or dithered): the trainer
    checks that once with ``dgc_envelope.check_linearized_validity``."""
    grads = linearized_gradients(network, layers, x, y, cost)
    with torch.no_grad():
        # The spread of one cost measurement on this chip, from a few noisy measurements, read as one batch
        # (every replica of the batch draws its own noise).
        k = cfg.noise_samples
        reps = (k,) + (1,) * (x.dim() - 1)
        samples = cost_per_sample(network(x.repeat(reps)), y.repeat(k), cost).reshape(k, -1).mean(1)
        sigma = float(samples.std())
        out = {}
        for layer, g_lin in zip(layers, grads, strict=True):
            out[layer.name] = g_lin * _ratio(layer, cfg) + _measurement_noise(layer, cfg, sigma, generator)
        return out, float(samples[0])


def _ratio(layer: AnalogLayer, cfg: DGCConfig) -> torch.Tensor:
    """Real over nominal perturbation of every weight (the device model's step, not the controller's)."""
    cb = layer.crossbar
    shape = (cb.in_features, cb.out_features)
    dw_nom = _nominal_dw(layer, cfg)
    if cfg.difference == "central":
        up, down = (perturbation_effect(layer, cfg, s)[0][: shape[0], : shape[1]] * cb.config.w_max
                    for s in (1.0, -1.0))
        return (up - down) / (2 * dw_nom)
    return perturbation_effect(layer, cfg, 1.0)[0][: shape[0], : shape[1]] * cb.config.w_max / dw_nom


def _measurement_noise(layer: AnalogLayer, cfg: DGCConfig, sigma: float, generator: torch.Generator | None):
    """(ε_p − ε_0)/Δw for forward differences (ε_0: the one shared base measurement), (ε_+ − ε_−)/2Δw central."""
    cb = layer.crossbar
    shape = (cb.in_features, cb.out_features)
    g = generator or cb.noise_generator
    dw_nom = _nominal_dw(layer, cfg)
    draw = torch.randn(shape, generator=g, device=cb.device, dtype=cb.dtype)
    if cfg.difference == "central":
        return sigma * (draw - torch.randn(shape, generator=g, device=cb.device, dtype=cb.dtype)) / (2 * dw_nom)
    base = torch.randn((), generator=g, device=cb.device, dtype=cb.dtype)
    return sigma * (draw - base) / dw_nom


def dgc_linearized(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                   cfg: DGCConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Autograd through the non-ideal model, scaled by the real/nominal perturbation, plus measurement noise."""
    grads, c0 = dgc_linearized_layers(network, [layer], x, y, cost, cfg, generator)
    return grads[layer.name], c0


class DGCTrainer(Trainer):
    """Every layer trained by direct gradient calculation."""

    scheme = "dgc"

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: "dgc" for layer in self.network.analog_layers}
