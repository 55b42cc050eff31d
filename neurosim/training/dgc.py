"""Direct gradient calculation (Kim et al., Adv. Intell. Syst. 2021, doi 10.1002/aisy.202100064).

The chip perturbs one weight at a time, measures the cost through its whole output path (ADC, noise, the
layers above), restores the weight, and uses g = ΔC/Δw with the nominal Δw it believes it applied. It needs
no derivative circuit and no transposed read: it measures the real chip, whatever its variation.

How a weight is perturbed and restored is one physical story (``DGCConfig.perturbation``), simulated and
billed as it happens:

- ``temporary``: a small temporal change of the cell's read (Kim et al.'s "small temporal change", e.g. a
  change of its read bias): the stored conductance is untouched, no pulse is fired, nothing wears; the change
  may carry its own device-to-device spread. One bias change per cycle is billed.
- ``pulse``: programming pulses through the device model (nonlinear step, cycle-to-cycle noise), restored by
  the opposite pulses, which land elsewhere on an asymmetric or noisy device: the restore errors stay in the
  chip and accumulate, and every later measurement sees them.
- ``pulse_verify``: programming pulses, restored by write-and-verify to the value read before the
  perturbation (reads and pulses until within tolerance).

The chip is sequential; this simulator is not. ``dgc_exact`` evaluates the measurements of a layer in batches
(``dgc_batch``; through wire resistance, ``_measure_wires``), and every batch equals the sequence in
distribution: measurement c sees the restore errors of every cycle before it (a prefix sum), fresh read
noise in every layer and fresh neuron noise (``lower_reads = "fresh"``: the layers below the perturbed one
are re-read for every measurement, as on the chip), the step's one dropout mask, and the layer's read as the
chip does it. ``dgc_sequential`` is the chip's procedure literally, one
weight after another: the reference the tests compare the batch against.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from neurosim.backend import make_generator
from neurosim.config import ConfigError
from neurosim.crossbar import Crossbar
from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.config import DGCConfig
from neurosim.training.cost import cost_per_sample, noise_free
from neurosim.training.dgc_batch import CHUNK_ELEMENTS, costs_above, has_noise, measure_costs

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_WIRED_FRESH_CHUNK = 16  # wired reads with fresh lower reads: a batch of P costs P² reads


def _nominal_dw(layer: AnalogLayer, cfg: DGCConfig) -> float:
    """The weight change the controller believes one perturbation makes (what it divides by)."""
    if cfg.perturbation_dw is not None:
        return cfg.perturbation_dw
    return cfg.perturbation_pulses * layer.crossbar.dw_pulse


@dataclass
class PerturbationPlan:
    """What the perturbation cycles of one layer do, every cell at once (each cell's cycles depend on that cell
    alone). Per cycle e (0: +Δ; 1: −Δ for central differences), tensors of shape (cycles, rows, cols) of the
    layer's (in, out) weights: the change of the normalized weight ŵ and of Σ G² (read noise) while the cell is
    perturbed (relative to the cell before the cycle), and after its restore (the restore error). ``final``:
    the conductances each array holds afterwards (pulse modes), committed by ``commit``."""

    pert_w: torch.Tensor
    pert_q: torch.Tensor | None
    inc_w: torch.Tensor | None
    inc_q: torch.Tensor | None
    final: list[torch.Tensor] | None
    pulses: int = 0
    pulse_slots: int = 0
    cell_reads: int = 0
    bias_changes: int = 0

    @property
    def cycles(self) -> int:
        return self.pert_w.numel()


def _temporary_factor(cb: Crossbar, sigma: float) -> torch.Tensor | float:
    """Per-cell size of a temporary change relative to nominal: lognormal with median 1, sampled once per chip."""
    if sigma == 0:
        return 1.0
    cache = getattr(cb, "_temporary_factor", None)
    if cache is None or cache[0] != sigma:
        g = make_generator(cb.seed, cb.device, cb.name, "dgc_temporary")
        z = torch.randn((cb.in_features, cb.out_features), generator=g, device=cb.device, dtype=torch.float64)
        cache = cb._temporary_factor = (sigma, torch.exp(sigma * z).to(cb.dtype))
    return cache[1]


def _verify_restore(array, g: torch.Tensor, target: torch.Tensor, tol: float, iterations: int,
                    cells: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """Write-and-verify every cell of ``array`` from ``g`` back to ``target`` (each cell on its own, batched):
    read, pulse towards the target if further than ``tol``, repeat. Returns the conductances, the reads, the
    pulses, and the pulses per cell (for the slots)."""
    reads, pulses = 0, 0
    per_cell = torch.zeros_like(g)
    active = ~array.stuck.expand(g.shape) if cells is None else cells & ~array.stuck.expand(g.shape)
    spec = array.spec
    for _ in range(iterations):
        if not bool(active.any()):
            break
        reads += int(active.sum())
        seen = g
        if spec.read_noise > 0:
            z = torch.randn(g.shape, generator=array.noise_generator, device=g.device, dtype=g.dtype)
            seen = (g * (1.0 + spec.read_noise * z)).clamp(min=0.0)
        active &= (seen - target).abs() > tol
        if not bool(active.any()):
            break
        n = torch.round(array.pulses_for(target, g_now=g))
        n = torch.where(active, torch.where(n == 0, torch.sign(target - seen), n), torch.zeros_like(n))
        g = array.pulsed(g, n)
        pulses += int(n.abs().sum())
        per_cell += n.abs()
    return g, reads, pulses, per_cell


def _difference(gs: list[torch.Tensor]) -> torch.Tensor:
    return gs[0] - gs[1] if len(gs) == 2 else gs[0]


def _squares(gs: list[torch.Tensor]) -> torch.Tensor:
    return sum(g * g for g in gs)


def perturbation_plan(layer: AnalogLayer, cfg: DGCConfig) -> PerturbationPlan:
    """Simulate the perturbation cycles of every weight of ``layer`` through the device model (batched over
    cells): see ``PerturbationPlan``. Counts what the chip fires and reads, for the engine."""
    cb = layer.crossbar
    rows, cols = cb.in_features, cb.out_features
    arrays = cb._arrays()
    norm = cb.k * cb.config.w_max
    signs = (1.0, -1.0) if cfg.difference == "central" else (1.0,)
    E, cells = len(signs), rows * cols
    need_q = cb._read_tensors()[1] is not None
    now = [a.conductance()[:rows, :cols] for a in arrays]
    if cfg.perturbation == "temporary":
        # One device (G+, or the single device) changes its read by ±k·Δw (the pair's difference by Δw).
        dw = _nominal_dw(layer, cfg)
        delta = cb.k * dw * _temporary_factor(cb, cfg.temporary_dtod)
        pert_w, pert_q = [], []
        for s in signs:
            moved = (now[0] + s * delta).clamp(min=0.0)     # a conductance stays >= 0
            pert_w.append((moved - now[0]) / norm)
            if need_q:
                pert_q.append(moved * moved - now[0] * now[0])
        return PerturbationPlan(torch.stack(pert_w), torch.stack(pert_q) if need_q else None, None, None, None,
                                bias_changes=2 * E * cells)
    # Pulse modes: every device of the pair is pulsed (G+ up and G− down for +Δ), then restored.
    n = float(cfg.perturbation_pulses)
    before = [a.conductance().clone() for a in arrays]
    region = (slice(0, rows), slice(0, cols))
    weights = torch.zeros(cb.padded_shape, dtype=torch.bool, device=cb.device)   # the cells that hold weights
    weights[region] = True
    tol = cfg.verify_tolerance * cb.config.w_max * cb.k / len(arrays)
    pert_w, pert_q, inc_w, inc_q = [], [], [], []
    pulses = slots = reads = 0
    targets = []
    if cfg.perturbation == "pulse_verify":
        # The controller reads each device before perturbing it: the value write-and-verify restores.
        for a, g in zip(arrays, before, strict=True):
            t = g.clone()
            if a.spec.read_noise > 0:
                z = torch.randn(g.shape, generator=a.noise_generator, device=g.device, dtype=g.dtype)
                t[region] = (g * (1.0 + a.spec.read_noise * z)).clamp(min=0.0)[region]
            targets.append(t)
            reads += cells
    for s in signs:
        moved, restored = [], []
        verify_slots = torch.zeros((rows, cols), device=cb.device, dtype=cb.dtype)
        for a, pol, g in zip(arrays, (1.0, -1.0), before, strict=False):
            pulse = torch.zeros(cb.padded_shape, device=cb.device, dtype=cb.dtype)
            pulse[region] = s * pol * n
            g_pert = a.pulsed(g, pulse)
            if cfg.perturbation == "pulse":
                g_back = a.pulsed(g_pert, -pulse)
            else:
                g_back, r, p, per_cell = _verify_restore(a, g_pert, targets[len(moved)], tol, cfg.verify_iterations,
                                                         weights)
                g_back[rows:], g_back[:, cols:] = g[rows:], g[:, cols:]
                reads += r
                pulses += p
                verify_slots = torch.maximum(verify_slots, per_cell[region])
            moved.append(g_pert)
            restored.append(g_back)
        pulses += int(2 * n * cells * len(arrays)) if cfg.perturbation == "pulse" else int(n * cells * len(arrays))
        slots += int(2 * n * cells) if cfg.perturbation == "pulse" else int(n * cells + verify_slots.sum())
        pert_w.append((_difference(moved) - _difference(before))[region] / norm)
        inc_w.append((_difference(restored) - _difference(before))[region] / norm)
        if need_q:
            pert_q.append((_squares(moved) - _squares(before))[region])
            inc_q.append((_squares(restored) - _squares(before))[region])
        before = restored
    return PerturbationPlan(torch.stack(pert_w), torch.stack(pert_q) if need_q else None, torch.stack(inc_w),
                            torch.stack(inc_q) if need_q else None, before, pulses=pulses, pulse_slots=slots,
                            cell_reads=reads)


def commit(layer: AnalogLayer, plan: PerturbationPlan) -> None:
    """The perturbed and restored cells hold what their restore left (pulse modes), programmed now."""
    if plan.final is None:
        return
    cb = layer.crossbar
    rows, cols = cb.in_features, cb.out_features
    for a, g in zip(cb._arrays(), plan.final, strict=True):
        new = a.g.clone()
        new[:rows, :cols] = g[:rows, :cols]
        a.g = new
        a.t_programmed[:rows, :cols] = a.time_s
        a.version += 1


@contextlib.contextmanager
def measurement_precision(network: AnalogNetwork, dtype: torch.dtype) -> Iterator[None]:
    """Reads of every layer computed in ``dtype`` (the stored conductances are unchanged)."""
    layers = network.analog_layers
    saved = [layer.crossbar.read_dtype for layer in layers]
    try:
        for layer in layers:
            layer.crossbar.read_dtype = dtype
        yield
    finally:
        for layer, d in zip(layers, saved, strict=True):
            layer.crossbar.read_dtype = d


@dataclass
class Measurement:
    """DGC of one layer at one step: the gradient, the base cost, and what the chip did to measure them."""

    grad: torch.Tensor
    cost: float
    plan: PerturbationPlan


def dgc_measure(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                cfg: DGCConfig) -> Measurement:
    """Measured gradient of every weight of ``layer`` (in, out), the base cost C(w), and the perturbation plan
    (committed to the chip: the restore errors of pulse modes stay in the devices)."""
    plan = perturbation_plan(layer, cfg)
    with measurement_precision(network, _DTYPES[cfg.precision]):
        grad, c0 = _measure(network, layer, x, y, cost, cfg, plan)
    commit(layer, plan)
    return Measurement(grad.to(layer.crossbar.dtype), c0, plan)


def dgc_exact(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
              cfg: DGCConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """``dgc_measure``'s gradient and base cost."""
    m = dgc_measure(network, layer, x, y, cost, cfg)
    return m.grad, m.cost


def _measure(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
             cfg: DGCConfig, plan: PerturbationPlan) -> tuple[torch.Tensor, float]:
    """The measurements of every cycle of ``plan``, in batches equal in distribution to the chip's sequence
    (``dgc_batch.measure_costs``; through the wired read, ``_measure_wires``)."""
    if layer.crossbar.config.wire_resistance != "none":
        return _measure_wires(network, layer, x, y, cost, cfg, plan)
    costs, c0 = measure_costs(network, layer, x, y, cost, cfg, plan)
    dw_nom = _nominal_dw(layer, cfg)
    grad = (costs[..., 0] - costs[..., 1]) / (2 * dw_nom) if costs.shape[-1] == 2 else (costs[..., 0] - c0) / dw_nom
    return grad, float(c0)


def _measure_wires(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                   cfg: DGCConfig, plan: PerturbationPlan) -> tuple[torch.Tensor, float]:
    """The measurements of a temporary perturbation through the crossbar's wired read
    (``Crossbar.read_perturbed``: the exact rank-one update of the tile's network, or its approximation).
    With fresh reads of the layers below, a batch of P measurements reads P replicas of the inputs and keeps
    each measurement's own replica (P² reads of work per batch: batches of ``_WIRED_FRESH_CHUNK``)."""
    cb = layer.crossbar
    idx = list(network.stages).index(layer)
    fresh = cfg.lower_reads == "fresh" and any(has_noise(s) for s in list(network.stages)[:idx]
                                               if isinstance(s, AnalogLayer))
    rows, outs = cb.in_features, cb.out_features
    E = plan.pert_w.shape[0]
    dtype = cb.read_dtype
    with torch.no_grad():
        def inputs(replicas: int) -> tuple[torch.Tensor, tuple[int, ...]]:
            h = network(x.repeat((replicas,) + (1,) * (x.dim() - 1)), start=0, stop=idx)
            return layer.matrix_input(h), tuple(h.shape[1:])

        xin, in_shape = inputs(1)
        n_rows = xin.shape[0]
        c0 = costs_above(network, layer, cb.read(xin)[None].to(dtype), y, cost, in_shape)[0]
        dplus = (plan.pert_w * (cb.k * cb.config.w_max)).permute(1, 2, 0).reshape(-1)   # G+ change, siemens
        total = rows * outs * E
        chunk = cfg.chunk or (_WIRED_FRESH_CHUNK if fresh else max(1, CHUNK_ELEMENTS // (n_rows * outs * 4)))
        costs = torch.empty(total, device=cb.device, dtype=dtype)
        for start in range(0, total, chunk):
            k = torch.arange(start, min(total, start + chunk), device=cb.device)
            P = len(k)
            cell = k // E
            i, j = cell // outs, cell % outs
            if fresh:
                xs, _ = inputs(P)
                z = cb.read_perturbed(xs, i, j, dplus[k])                      # (P, P·rows, out)
                z = z.reshape(P, P, n_rows, outs)[torch.arange(P), torch.arange(P)]
            else:
                z = cb.read_perturbed(xin, i, j, dplus[k])                     # (P, rows, out)
            costs[start:start + P] = costs_above(network, layer, z.to(dtype), y, cost, in_shape)
        costs = costs.reshape(rows, outs, E)
        dw_nom = _nominal_dw(layer, cfg)
        grad = (costs[..., 0] - costs[..., 1]) / (2 * dw_nom) if E == 2 else (costs[..., 0] - c0) / dw_nom
    return grad, float(c0)


def check_dgc(network: AnalogNetwork, cfg: DGCConfig) -> None:
    """Refuse DGC settings the simulator cannot measure as the chip would (before a run starts)."""
    wired = [layer.name for layer in network.analog_layers if layer.crossbar.config.wire_resistance != "none"]
    if wired and cfg.perturbation != "temporary":
        raise ConfigError("training.dgc.perturbation", cfg.perturbation,
                          f"pulse perturbations with wire resistance (layers {', '.join(wired)}) are not modelled: "
                          "the restore errors of earlier cycles change the wired read of every later one; use "
                          "'temporary' or crossbar.wire_resistance = 'none'")


def _drift_factor(array) -> torch.Tensor:
    """conductance()/g of every cell (1 where g is 0 or nothing drifts)."""
    g, now = array.g, array.conductance()
    return torch.where(g > 0, now / torch.where(g > 0, g, torch.ones_like(g)), torch.ones_like(g))


def dgc_sequential(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                   cfg: DGCConfig, weights: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, float]:
    """The chip's own procedure, one weight after another (the reference the batched mode reproduces): perturb
    one cell as ``cfg.perturbation`` says, measure the cost through the whole chip, restore. ``weights`` limits
    it to a subset (in the chip's order, row-major); cells not in it are left as they are."""
    cb = layer.crossbar
    arrays = cb._arrays()
    grad = torch.full((cb.in_features, cb.out_features), float("nan"), device=cb.device, dtype=torch.float64)
    dw_nom = _nominal_dw(layer, cfg)
    dtype = _DTYPES[cfg.precision]

    def measure() -> torch.Tensor:
        with torch.no_grad(), measurement_precision(network, dtype):
            return cost_per_sample(network(x).to(dtype), y, cost).mean()

    c0 = measure()
    todo = weights if weights is not None else [(i, j) for i in range(cb.in_features)
                                                for j in range(cb.out_features)]
    signs = (1.0, -1.0) if cfg.difference == "central" else (1.0,)
    tol = cfg.verify_tolerance * cb.config.w_max * cb.k / len(arrays)
    factor = _temporary_factor(cb, cfg.temporary_dtod)
    for i, j in todo:
        measured = []
        targets = None
        for sign in signs:
            if cfg.perturbation == "temporary":
                a = arrays[0]
                saved = a.g
                f = factor if isinstance(factor, float) else float(factor[i, j])
                now = a.conductance()[i, j]
                moved = (now + sign * cb.k * _nominal_dw(layer, cfg) * f).clamp(min=0.0)
                g = saved.clone()
                g[i, j] = moved / _drift_factor(a)[i, j]
                a.g = g
                a.version += 1
                measured.append(measure())
                a.g = saved                                  # the stored state was never touched
                a.version += 1
                continue
            n = torch.zeros(cb.padded_shape, device=cb.device, dtype=cb.dtype)
            n[i, j] = sign * cfg.perturbation_pulses
            if cfg.perturbation == "pulse_verify" and targets is None:
                targets = []
                for a in arrays:  # the controller reads each device before perturbing it
                    t = a.conductance().clone()
                    if a.spec.read_noise > 0:
                        z = torch.randn((), generator=a.noise_generator, device=cb.device, dtype=cb.dtype)
                        t[i, j] = (t[i, j] * (1.0 + a.spec.read_noise * z)).clamp(min=0.0)
                    targets.append(t)
            for a, pol in zip(arrays, (1.0, -1.0), strict=False):
                a.program(pol * n)
            measured.append(measure())
            for k_a, (a, pol) in enumerate(zip(arrays, (1.0, -1.0), strict=False)):
                if cfg.perturbation == "pulse":
                    a.program(-pol * n)
                    continue
                only = torch.zeros(cb.padded_shape, device=cb.device, dtype=torch.bool)
                only[i, j] = True
                g, *_ = _verify_restore(a, a.conductance(), targets[k_a], tol, cfg.verify_iterations, only)
                a.g = torch.where(only, g, a.g)
                a.t_programmed[i, j] = a.time_s
                a.version += 1
        grad[i, j] = (measured[0] - measured[1]) / (2 * dw_nom) if len(signs) == 2 else (measured[0] - c0) / dw_nom
    return grad.to(cb.dtype), float(c0)


def perturbation_effect(layer: AnalogLayer, cfg: DGCConfig, sign: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The change of the normalized weight (in, out) and of Σ G² that a +Δ (sign > 0) or −Δ perturbation of
    every weight would make, from a fresh plan (the chip is not changed)."""
    plan = perturbation_plan(layer, dataclasses.replace(cfg, difference="central" if sign < 0 else "forward"))
    e = 1 if sign < 0 else 0
    return plan.pert_w[e], plan.pert_q[e] if plan.pert_q is not None else None


def linearized_gradients(network: AnalogNetwork, layers: list[AnalogLayer], x: torch.Tensor, y: torch.Tensor,
                         cost: str) -> list[torch.Tensor]:
    """∂C/∂w of every layer in ``layers`` through the noise-free non-ideal model, converters straight through:
    one autograd pass (what linearized DGC multiplies by the real perturbation)."""
    leaves = {layer.name: layer.crossbar.weights().detach().clone().requires_grad_(True) for layer in layers}
    with noise_free(network), torch.enable_grad():
        c_lin = cost_per_sample(network(x, mode="linearized", weights=leaves), y, cost).mean()
        return list(torch.autograd.grad(c_lin, list(leaves.values())))


def dgc_linearized_layers(network: AnalogNetwork, layers: list[AnalogLayer], x: torch.Tensor, y: torch.Tensor,
                          cost: str, cfg: DGCConfig, generator: torch.Generator | None = None,
                          plans: dict[str, PerturbationPlan] | None = None
                          ) -> tuple[dict[str, torch.Tensor], float]:
    """Linearized DGC of several layers of one step: one autograd pass through the noise-free non-ideal model
    and one estimate of the measurement noise serve them all (the chip would measure them all on one state).
    ``plans``: each layer's perturbation cycles, whose real perturbations scale the gradients (the trainer
    passes the ones it bills and commits; made here otherwise). Valid only where the chip's converters pass a
    perturbation's effect (resolved or dithered): the trainer checks that once with
    ``dgc_envelope.check_linearized_validity``."""
    plans = plans or {layer.name: perturbation_plan(layer, cfg) for layer in layers}
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
            out[layer.name] = g_lin * _ratio(layer, cfg, plans[layer.name]) + \
                _measurement_noise(layer, cfg, sigma, generator)
        return out, float(samples[0])


def _ratio(layer: AnalogLayer, cfg: DGCConfig, plan: PerturbationPlan) -> torch.Tensor:
    """Real over nominal perturbation of every weight (the device model's step, not the controller's), from the
    plan's cycles: the +Δ cycle, and for central differences minus the −Δ cycle (which starts where the +Δ
    cycle's restore left the cell, as the chip's does)."""
    real = plan.pert_w[0] - plan.pert_w[1] if cfg.difference == "central" else plan.pert_w[0]
    return real * layer.crossbar.config.w_max / (plan.pert_w.shape[0] * _nominal_dw(layer, cfg))


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
