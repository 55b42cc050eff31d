"""The hardware-BP step as it was before the operation-count work (issue 14, commit 2b688fd), kept only as the
oracle ``tests/test_bp_ops.py`` compares whole training epochs against, in the same process: the functions that
work changed, verbatim, patched in by ``frozen()``. Everything else (the read path, the pulse response, the
engine) is shared, so the comparison holds on any machine and whatever the shared code computes."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

import neurosim.crossbar as crossbar_module
import neurosim.device as device_module
import neurosim.training.base as base_module
from neurosim.activation import ActivationUnit
from neurosim.crossbar import Crossbar
from neurosim.device import DeviceArray
from neurosim.layers import AnalogLayer, AnalogLinear
from neurosim.random_streams import PhiloxStream
from neurosim.sampling import rounding_uniforms
from neurosim.training.base import Trainer


def stochastic_round_sparse(x: torch.Tensor, generator: torch.Generator | None = None, factor: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(m + u) with u ~ U[0, 1) independent per element, for m = |factor·x| (x any shape and sign),
    returned sparsely with the sign of factor·x: (flat indices of the non-zero results, in no particular
    order, and their signed values). Same distribution as the dense rounding; a few dozen operations whatever
    the size, since this runs for every layer at every step. ``factor`` spares the caller a scaled copy of x
    (a training update passes the gradient and −learning rate / pulse size): one pass over x finds its
    mean and largest magnitude, and only the gathered elements are scaled. A matrix is searched for its few
    large elements row by row (a row maximum, then only the rows that have one), which is much cheaper than
    a full comparison and index search."""
    n = x.numel()
    flat = x.reshape(-1)
    size = abs(factor)
    if isinstance(generator, PhiloxStream) and generator.device.type == "cpu":
        # (the draw mechanism of the fused rounding kernel, after 2b688fd: uniform u_i of the stream for flat cell
        # i -- since the split into high bytes and low halves, sampling.rounding_uniforms --, floor(|x|·size + u)
        # in x's dtype, the non-zero results ascending with the sign of factor·x)
        counts = flat.abs().mul(size).add(rounding_uniforms(generator, n, x.dtype)).floor()
        idx = (counts >= 1).nonzero().squeeze(1)
        signed = counts.index_select(0, idx).copysign(flat.index_select(0, idx))
        return idx, (signed.neg() if factor < 0 else signed)
    a = flat.abs()
    total, largest = torch.stack([a.sum(), a.amax()]).tolist() if n and size else (0.0, 0.0)
    if largest == 0.0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    tau = min(0.5, max(16.0 * total / n * size, 1.0 / n))
    limit = tau / size  # |x| above it: m > τ

    def uniform(k: int) -> torch.Tensor:
        if isinstance(generator, PhiloxStream):   # (the rounding's move to a Philox stream, after 2b688fd)
            return generator.uniform(k, dtype=x.dtype)
        return torch.rand(k, generator=generator, device=x.device, dtype=x.dtype)

    big = big_counts = None
    if largest > limit:
        big = _above(a.view(x.shape), limit)
        big_counts = a.index_select(0, big).mul_(size).add_(uniform(big.numel())).floor_()
        keep = (big_counts > 0).nonzero().squeeze(1)
        big = big.index_select(0, keep)
        big_counts = big_counts.index_select(0, keep).copysign_(flat.index_select(0, big))

    # Candidates: an independent Bernoulli(τ) per cell, as geometric gaps G ≥ 1 with P(G = g) = (1 − τ)^(g−1) τ.
    log_q = math.log1p(-tau)
    expected = n * tau
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces, last = [], -1
    while last < n - 1:
        gaps = torch.log1p(uniform(chunk).neg_()).div_(log_q).floor_().long().add_(1)
        positions = gaps.cumsum_(0).add_(last)
        last = int(positions[-1])
        pieces.append(positions[: int(torch.searchsorted(positions, n))])
    candidates = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    a_c = a.index_select(0, candidates)
    fire = uniform(candidates.numel()).mul_(limit) < a_c  # u·τ < m: probability m/τ
    if big is not None:
        fire &= a_c <= limit  # those above τ were drawn on their own
    chosen = fire.nonzero().squeeze(1)
    small = candidates.index_select(0, chosen)
    signs = flat.index_select(0, small).sign_()
    idx, counts = (small, signs) if big is None else (torch.cat([big, small]), torch.cat([big_counts, signs]))
    return idx, (counts.neg_() if factor < 0 else counts)


def _above(m: torch.Tensor, tau: float) -> torch.Tensor:
    """Flat indices of the elements of m above tau, ascending."""
    if m.dim() != 2 or m.shape[1] < 8:
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    rows = (m.amax(1) > tau).nonzero().squeeze(1)
    if rows.numel() * 2 > m.shape[0]:  # most rows have one: the plain search is as cheap
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    hit = (m.index_select(0, rows) > tau).nonzero()
    return rows.index_select(0, hit[:, 0]).mul_(m.shape[1]).add_(hit[:, 1])


def _state_key(self) -> tuple:
    """What the read cache depends on. A drifting array's clock counts as the time of the cache's last
    drift recomputation while no cell's drift factor can have moved by more than ``drift_tolerance``
    since: between training steps the clock moves by microseconds to milliseconds, and recomputing every
    cell's drift after every step's write (a drifting array could not be patched) cost a quarter of a
    BP step."""
    keys = tuple(a.read_key() for a in self._arrays())
    anchor = self._drift_anchor
    if anchor is not None and self._drift_change(anchor) <= self.config.drift_tolerance:
        keys = tuple((k[0], anchor if k[1] is not None else None) for k in keys)
    return (self.noise, *keys)

def _drift_change(self, since: float) -> float:
    """Bound on the relative move of any cell's drift factor (age/t0)^−ν since the clock read ``since``:
    a factor differs from 1 only at an age ≥ t0, so the age grew by at most the factor 1 + Δt/t0. A cell
    written since is at most Δt old: the same bound holds for its factor, patched in as 1."""
    worst = 0.0
    for a in self._arrays():
        if a.drifting and a.time_s > since:
            worst = max(worst, a.max_drift_nu() * math.log1p((a.time_s - since) / a.spec.drift_t0))
    return worst


def _refresh_cells(self, cells: torch.Tensor, new: torch.Tensor | None = None) -> None:
    """After a write of a few cells: recompute the cached read tensors there only
    (the same arithmetic as a full rebuild, so the same bits). ``new``: the pair's new conductances of
    those cells, as ``program_pair`` returns them."""
    g = new.split(cells.numel()) if new is not None else [a.g.view(-1).index_select(0, cells)
                                                           for a in self._arrays()]
    values = self._read_values(list(g))
    for cached, fresh in zip(self._cache, values, strict=True):
        if cached is not None:
            cached.view(-1).index_copy_(0, cells, fresh)
    if self._cache_low is not None:   # added at the merge with the bfloat16 variance cache (not in 2b688fd)
        self._cache_low.view(-1).index_copy_(0, cells, values[1].to(self._cache_low.dtype))
    self._cache_key, self._solvers = self._state_key(), None


def pulse_counts(self, dw: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pulses the controller issues for a requested weight change scale·dw, sparsely: (flat indices
    into the (in, out) matrix, signed counts), only cells with a non-zero count. Stochastic rounding fires
    floor(m + u) pulses for m = |Δw|/Δw_pulse: unbiased, drawn by ``stochastic_round_sparse``. A request
    beyond the weight range (|scale·Δw| > 2·w_max, e.g. a diverging run's) is capped at the pulses that
    cross it: the controller knows no weight can move further, and more pulses would only bill time at a
    saturated device. (Capped on the few counts, not on the whole request: no pass over the matrix.)"""
    dw = dw.to(self.dtype)
    factor = scale / self.dw_up
    if self.dw_up != self.dw_down:  # a single device whose two curves have different pulse counts
        dw = torch.where(dw * scale > 0, dw, dw * (self.dw_up / self.dw_down))
    if self.config.rounding == "stochastic":
        # (the stream follows the rounding's move to a Philox stream, made after 2b688fd)
        idx, counts = stochastic_round_sparse(dw, generator or self.rounding_stream, factor)
    else:
        n = dw.mul(factor).round_().view(-1)
        idx = n.nonzero().squeeze(1)
        counts = n.index_select(0, idx)
    span = 2.0 * self.config.w_max
    return idx, counts.clamp_(-math.ceil(span / self.dw_down), math.ceil(span / self.dw_up))


def _cells(self, idx: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Flat (in, out) indices → flat cells of the padded arrays, and whether the write may patch the
    cached read tensors (a write of a few percent of the cells) instead of having them rebuilt."""
    if self.padded_shape[1] != self.out_features:
        cells = idx // self.out_features * self.padded_shape[1] + idx % self.out_features
    else:
        cells = idx
    # A drifting array is patched too while the cache's drift is within drift_tolerance: the cells just
    # written are at age 0, where the drift factor is exactly 1.
    patch = (self._cache_key == self._state_key() and 16 * cells.numel() < self.plus.g.numel()
             and (self.config.drift_tolerance > 0 or not any(a.drifting for a in self._arrays())))
    return cells, patch

def _written(self, idx: torch.Tensor, counts: torch.Tensor, cells: torch.Tensor, new: torch.Tensor | None,
             patch: bool) -> torch.Tensor:
    """After the devices took the pulses: the read cache, the controller's belief, and (as a tensor, so that
    a whole network's numbers come back in one synchronisation) the pulse count and the pulse slots."""
    if patch:
        self._refresh_cells(cells, new)
    believed = self.believed.view(-1)
    if self.dw_up == self.dw_down:
        step = counts * self.dw_up
    else:
        step = torch.where(counts > 0, counts * self.dw_up, counts * self.dw_down)
    believed.index_copy_(0, idx, believed.index_select(0, idx).add_(step)
                         .clamp_(-self.config.w_max, self.config.w_max))
    # Slots: per tile, the sum over its rows of the largest pulse count in the row; tiles in parallel.
    mag = counts.abs()
    per_row = torch.zeros(self.padded_shape[0] * self.n_col_tiles, device=mag.device, dtype=mag.dtype)
    rows = idx // self.out_features
    where = rows if self.n_col_tiles == 1 else rows * self.n_col_tiles + idx % self.out_features // self.tile_cols
    per_row.scatter_reduce_(0, where, mag, "amax")
    slots = per_row.reshape(self.n_row_tiles, self.tile_rows, self.n_col_tiles).sum(1).amax()
    return torch.stack([mag.sum() * len(self._arrays()), slots])


def _stats(numbers: list[torch.Tensor]) -> list[dict[str, int]]:
    """(pulses, slots) tensors of several writes → plain numbers, in one synchronisation."""
    values = torch.stack(numbers).tolist()
    return [{"pulses": int(p), "pulse_slots": int(q)} for p, q in values]


def _fire(writes: list[tuple[Crossbar, torch.Tensor, torch.Tensor]]) -> list[dict[str, int]]:
    """Sparse pulse counts (crossbar, flat indices, signed counts) into the devices: the differential pairs of
    all crossbars in one pass of the device model (``program_pairs``, which splits different cards), single
    devices on their own; then each crossbar's bookkeeping, and all the numbers in one synchronisation."""
    parts = [(cb, idx, counts, *cb._cells(idx)) for cb, idx, counts in writes]
    paired = program_pairs([(cb.plus, cb.minus, cells, n) for cb, _, n, cells, _ in parts if cb.minus is not None])
    news = iter(paired)
    return _stats([cb._written(idx, n, cells, next(news) if cb.minus is not None else
                               cb.plus.program_cells(cells, n), patch)
                   for cb, idx, n, cells, patch in parts])


def program_deltas(crossbars: list[Crossbar], dws: list[torch.Tensor], scale: float = 1.0
                   ) -> list[dict[str, int]]:
    """``program_delta`` of several crossbars at once (a network's layers at one training step).

    Each layer rounds its own requests (its own stream and threshold, see ``stochastic_round_sparse``); then
    the pulsed devices of all layers go through one pass of the device model, and the pulse counts and slots
    of all layers come back in one synchronisation. The distributions are those of separate calls (each pulse
    takes its own cycle-to-cycle draw, from the first layer's stream), for fewer operations, which is what a
    training step on a CPU is made of. Layers on different cards get one pass per card; single-device
    layers are programmed one by one."""
    for cb, dw in zip(crossbars, dws, strict=True):
        cb._check_shape(dw)
    return _fire([(cb, *cb.pulse_counts(dw, scale=scale)) for cb, dw in zip(crossbars, dws, strict=True)])


def _now(self, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Conductances of flat cells ``idx`` (None: all) now, drift included: the same arithmetic as
    ``conductance()``, so the same bits. A pulse starts from here."""
    g = self.g.reshape(-1) if idx is None else self.g.view(-1).index_select(0, idx)
    if not self.drifting:
        return g
    t = self.t_programmed.reshape(-1) if idx is None else self.t_programmed.view(-1).index_select(0, idx)
    neg_nu = self._neg_nu()
    if neg_nu.dim():
        neg_nu = neg_nu.reshape(-1) if idx is None else neg_nu.reshape(-1).index_select(0, idx)
    return self._drifted(g, t, neg_nu)


def _store(self, idx: torch.Tensor, g: torch.Tensor) -> None:
    """Write new conductances of cells ``idx`` (flat), their programming time and the version."""
    self.g.view(-1).index_copy_(0, idx, g)
    if self.spec.drift_nu > 0:  # the age of a cell matters only where it drifts
        self.t_programmed.view(-1).index_fill_(0, idx, self.time_s)
    self.version += 1


def program_pairs(writes: list[tuple[DeviceArray, DeviceArray, torch.Tensor, torch.Tensor]]
                  ) -> list[torch.Tensor | None]:
    """``program_pair`` for several pairs of arrays (the layers of a network) in one pass of the device model.
    The pairs must share the card (the first pair's cycle-to-cycle stream draws for all); a pair that
    cannot join (not paired, or every cell pulsed) is programmed on its own. Returns, per pair, the new
    conductances of its cells (first's, then second's) or None where it fell back."""
    out: list[torch.Tensor | None] = [None] * len(writes)
    joined, others = [], []
    for i, (first, second, idx, counts) in enumerate(writes):
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
        shared = paired[1]
        m = first._table[0].shape[0]
        down = (counts < 0).long()
        if m == 2:                                   # every cell alike: rows are (first, second) × polarity
            rows = torch.cat([down, 3 - down])
        else:
            base = idx * 2
            rows = torch.cat([base + down, base.add_(m + 1).sub_(down)])
        joined.append((i, first, second, idx, shared.index_select(0, rows),
                       torch.cat([first._now(idx), second._now(idx)]),
                       torch.cat([counts, counts.neg()])))
    if others:
        for i, part in zip(others, program_pairs([writes[i] for i in others]), strict=True):
            out[i] = part
    if not joined:
        return out
    lead = joined[0][1]
    if len(joined) == 1:
        constants, g, ns = joined[0][4:]
    else:
        constants, g, ns = (torch.cat([j[k] for j in joined]) for k in (4, 5, 6))
    # (the cycle-to-cycle draws follow the move to the pair's Philox stream, Crossbar.pulse_stream)
    new = lead._pulse(constants, g, ns, None, True, lead.pulse_stream)
    for (i, first, second, idx, *_), part in zip(joined, new.split([2 * j[3].numel() for j in joined]),
                                                  strict=True):
        for array, half in zip((first, second), part.split(idx.numel()), strict=True):
            array._store(idx, half)
        out[i] = part
    return out


def _circuit(self, y: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor, gain_sigma: float,
             offset_sigma: float, noise: float, stream: str, clip: tuple[float, float] | None,
             fresh: bool = False) -> torch.Tensor:
    """Apply per-neuron gain and offset, per-evaluation noise and output clipping (skipped where zero, so a
    circuit without variation returns its ideal output bit for bit). ``fresh``: y is this evaluation's own
    temporary, so outside autograd every step works in its buffer (one pass each, no new tensor)."""
    shape = (1, self.num_neurons) + (1,) * (y.dim() - 2)
    inplace = fresh and not (torch.is_grad_enabled() and y.requires_grad)
    if gain_sigma:
        g = gain.to(device=y.device, dtype=y.dtype).view(shape)
        if offset_sigma:
            off = offset.to(device=y.device, dtype=y.dtype).view(shape)
            y = torch.addcmul(off, y, g, out=y) if inplace else torch.addcmul(off, y, g)
        else:
            y = y.mul_(g) if inplace else y * g
    elif offset_sigma:
        off = offset.to(device=y.device, dtype=y.dtype).view(shape)
        y = y.add_(off) if inplace else y + off
    if noise:
        # (the draw follows the neuron noise's move to a Philox stream, made after 2b688fd)
        z = self._generator(stream, y.device).normal(y.shape, dtype=y.dtype)
        y = y + noise * z if torch.is_grad_enabled() and y.requires_grad else torch.add(y, z, alpha=noise, out=z)
    if clip is not None:
        y = y.clamp_(clip[0], clip[1]) if (inplace or noise) and not y.requires_grad else \
            torch.clamp(y, clip[0], clip[1])
    return y


def derivative_backward(unit: ActivationUnit, z: torch.Tensor, grad_out: torch.Tensor,
                        input_grad: bool = True) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """The error behind a neuron circuit: the derivative circuit's output times the incoming error, and the
    gradients of the unit's trainable coefficients (from the circuit's own function), keyed by id."""
    grad_z = unit.derivative(z).mul_(grad_out) if input_grad else None  # the circuit's output is a temporary
    params = [p for p in unit.trainable_parameters() if p.requires_grad]
    if not params:
        return grad_z, {}
    with torch.enable_grad():
        out = unit.ideal(z.detach())
        grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    return grad_z, {id(p): g for p, g in zip(params, grads, strict=True)}


def _with_bias(self, rows: torch.Tensor) -> torch.Tensor:
    if not self.has_bias:
        return rows
    return torch.cat([rows, torch.full((rows.shape[0], 1), self.crossbar.config.input_max, device=rows.device,
                                       dtype=rows.dtype)], dim=1)


def backward_bp(self, saved: tuple, grad_out: torch.Tensor, weight_grad: bool, input_grad: bool
                ) -> torch.Tensor | None:
    """Errors back through the derivative circuit and the chip's backward path. ``weight_grad``: the
    controller's outer product lands in ``weight.grad``; trainable coefficients of the neuron circuit get
    theirs in ``p.grad``. Returns the error at the layer's input when ``input_grad``."""
    xrows, z, x_shape = saved   # (the read's inputs without the bias column, since the read takes that itself)
    with torch.no_grad():
        grad_z, by_id = derivative_backward(self.activation, z, grad_out)
        for p in self.activation.trainable_parameters():
            g = by_id.get(id(p))
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        rows = self.output_rows(grad_z)
        grad_x = self.error_rows(rows) if input_grad else None
        if weight_grad:
            g = self.weight_gradient(xrows, rows)   # shared since the bias row's input stopped being a copied column
            self.weight.grad = g if self.weight.grad is None else self.weight.grad + g
        if grad_x is None:
            return None
        return self.input_from_rows(grad_x[:, : grad_x.shape[1] - int(self.has_bias)], x_shape)


def rows_of(self, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def input_from_rows(self, grad_rows: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    return grad_rows.reshape(x_shape)


def update_layers(self, layers: list[AnalogLayer], grads: list[torch.Tensor]) -> list[dict[str, int]]:
    """Momentum in the controller, then the weight changes become pulses through the device model, all
    layers in one pass (``program_deltas``). Returns each layer's pulses and pulse slots."""
    m = self.config.momentum
    if m > 0:
        grads = [self._momentum(layer.name, grad, m) for layer, grad in zip(layers, grads, strict=True)]
    stats = program_deltas([layer.crossbar for layer in layers], [g.detach() for g in grads],
                           scale=-self.config.learning_rate)
    self._programmed[0] += sum(s["pulses"] for s in stats)
    self._programmed[1] += sum(layer.crossbar.in_features * layer.crossbar.out_features for layer in layers)
    for layer, s in zip(layers, stats, strict=True):
        self.layer_pulses[layer.name] += s["pulses"]
    for layer in layers:
        layer.sync_believed()
        layer.weight.grad = None
    return stats


_PATCHES = [
    (Crossbar, "_state_key", _state_key), (Crossbar, "_drift_change", _drift_change),
    (Crossbar, "_refresh_cells", _refresh_cells), (Crossbar, "pulse_counts", pulse_counts),
    (Crossbar, "_cells", _cells), (Crossbar, "_written", _written),
    (crossbar_module, "_stats", _stats), (crossbar_module, "_fire", _fire),
    (crossbar_module, "program_deltas", program_deltas), (base_module, "program_deltas", program_deltas),
    (DeviceArray, "_now", _now), (DeviceArray, "_store", _store), (device_module, "program_pairs", program_pairs),
    (ActivationUnit, "_circuit", _circuit),
    (AnalogLayer, "_with_bias", _with_bias), (AnalogLayer, "backward_bp", backward_bp),
    (AnalogLinear, "rows_of", rows_of), (AnalogLinear, "input_from_rows", input_from_rows),
    (Trainer, "update_layers", update_layers),
]


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """The old functions in place of the new ones while the context lasts."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in _PATCHES]
    try:
        for owner, name, fn in _PATCHES:
            setattr(owner, name, fn)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
