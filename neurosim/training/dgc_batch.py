"""Exact DGC's measurements in batches: the chip's sequence of perturb-measure-restore cycles of one layer,
evaluated P cycles at a time, each cycle equal in distribution to the chip's (``dgc.dgc_sequential`` is the
reference the tests compare against).

What the batch shares and what each measurement redoes, and why that is exact:

- The layers below the perturbed one are re-read for every measurement (``lower_reads = "fresh"``): fresh
  read noise, converters and neuron noise in each. The first analog layer's inputs are the step's digital
  inputs, the same for every measurement, so its matrix products (signal Σ x̂ŵ and read-noise variance
  Σ x̂²G²) are computed once and only its noise, ADCs and neurons are evaluated per measurement; the layers
  between it and the perturbed one see fresh inputs and are read in full.
- The perturbed layer: with shared inputs its state's partial sums are shared, and a perturbation of w_ij
  changes only column j (one row's input times the change). The restore errors of pulse modes (every cycle
  leaves one in its own cell, and every later measurement sees it) are carried as *row states*: cycles go row
  by row, so at cycle (i, j) the columns left of j already hold row i's restore errors and the columns right
  of it do not: the partial sums are the row state after row i in columns < j and the one before row i in
  columns > j (an exclusive prefix sum over the cycles, one per row instead of one per cycle). Without read
  noise in the layer only column j passes its ADCs again; the other columns convert as in their row state,
  and (fully connected layers) their neuron circuits are evaluated once per row state: each measurement adds
  only its own neuron noise. With read noise the row states are scaled to ADC steps and square-rooted once,
  and each measurement's partial sums are written into its noise draws.
- Every layer above is evaluated in full, with fresh noise, for every measurement.
"""

from __future__ import annotations

import torch

from neurosim.crossbar import quantize, quantize_codes
from neurosim.layers import AnalogLayer, AnalogLinear, AnalogNetwork, StepDropout
from neurosim.training.config import DGCConfig
from neurosim.training.cost import cost_per_sample

CHUNK_ELEMENTS = 4_000_000  # tensor elements a batch of measurements holds per large temporary (bounds memory)


def has_noise(layer: AnalogLayer) -> bool:
    """Whether two reads of this layer (crossbar and neuron circuits) can differ."""
    cb = layer.crossbar
    return bool((cb.noise and cb.config.read_noise and cb.spec.read_noise > 0) or layer.activation.config.noise)


def costs_above(network: AnalogNetwork, layer: AnalogLayer, z: torch.Tensor, y: torch.Tensor, cost: str,
                in_shape: tuple[int, ...]) -> torch.Tensor:
    """Costs of P chip states from the layer's digital outputs z (P, crossbar rows per state, out): the layer's
    neuron circuits (fresh noise), every layer above, the cost of each state's batch."""
    P = z.shape[0]
    batch = y.shape[0]
    idx = list(network.stages).index(layer)
    z = layer.shape_output(z.reshape(-1, z.shape[-1]), (P * batch, *in_shape))
    out = network(layer.activate(z), start=idx + 1)
    return cost_per_sample(out.to(z.dtype), y.repeat(P), cost).reshape(P, batch).mean(1)


def costs_from_outputs(network: AnalogNetwork, layer: AnalogLayer, h: torch.Tensor, y: torch.Tensor,
                       cost: str) -> torch.Tensor:
    """Costs of P chip states from the layer's neuron outputs h (P·batch, out): every layer above, the cost of
    each state's batch."""
    batch = y.shape[0]
    P = h.shape[0] // batch
    out = network(h, start=list(network.stages).index(layer) + 1)
    return cost_per_sample(out.to(h.dtype), y.repeat(P), cost).reshape(P, batch).mean(1)


def _elements_per_measurement(network: AnalogNetwork, layer: AnalogLayer, batch: int, fresh: bool) -> int:
    """A generous bound of the elements one measurement holds in its largest temporaries: per layer it
    evaluates, its inputs where they differ per measurement, its partial sums per row tile (and their
    variance), its outputs."""
    layers = network.analog_layers
    k = layers.index(layer)
    per = 1
    for n, lay in enumerate(layers):
        cb = lay.crossbar
        rows = batch * lay.reads_per_sample
        tiles = rows * cb.n_row_tiles * cb.padded_shape[1]
        if n < k and not fresh:
            continue
        if n == k and not fresh and not (cb.noise and cb.config.read_noise and cb.spec.read_noise > 0):
            # without read noise only the outputs (and their neuron outputs) are per measurement
            per = max(per, 3 * rows * cb.padded_shape[1])
            continue
        inputs = rows * cb.padded_shape[0] if n > 0 else 0
        per = max(per, 2 * inputs + 2 * tiles + rows * cb.padded_shape[1])
    return per


class _LowerReads:
    """The perturbed layer's DAC outputs per row tile for P measurements: (P or 1, nr, rows, R)."""

    def __init__(self, network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, fresh: bool):
        self.network, self.layer, self.x, self.fresh = network, layer, x, fresh
        stages = list(network.stages)
        self.idx = stages.index(layer)
        self.in_shape: tuple[int, ...] = ()
        self.first = None
        if not fresh:
            return
        self.first = next(k for k, s in enumerate(stages[:self.idx]) if isinstance(s, AnalogLayer))
        # Digital stages before the first analog layer are evaluated once, unless they draw per call (dropout
        # outside a step's one mask): then every measurement runs everything below afresh.
        if any(isinstance(s, StepDropout) and s.training and s.p > 0 and not s.hold for s in stages[:self.first]):
            self.first = None
            return
        first = stages[self.first]
        cb = first.crossbar
        pre = network(x, start=0, stop=self.first)
        self.pre_shape = tuple(pre.shape[1:])
        xn = cb.dac(first.matrix_input(pre))
        self.part0 = cb._clean_partials(xn)                          # (nr, rows, cols), shared
        gsq = cb._read_tensors()[1]
        # √(Σ x̂²G²) of the shared read, once: every measurement's fresh read has these variances
        self.std0 = cb._tile_products(xn * xn, gsq).sqrt_() if gsq is not None else None

    @staticmethod
    def _replicate(t: torch.Tensor, P: int) -> torch.Tensor:
        return t.repeat(1, P, 1)          # always a copy: the read works in place on its temporaries

    def __call__(self, P: int) -> torch.Tensor:
        network, layer, x = self.network, self.layer, self.x
        if not self.fresh or self.first is None:
            reps = P if self.fresh else 1
            h = network(x.repeat((reps,) + (1,) * (x.dim() - 1)), start=0, stop=self.idx)
        else:
            first = network.stages[self.first]
            cb = first.crossbar
            part = self._replicate(self.part0, P)
            if self.std0 is not None:   # measurement p's rows are p·B .. p·B + B − 1 (repeat's order)
                nr, B, C = self.std0.shape
                cb.add_read_noise_std(part.view(nr, P, B, C), self.std0.unsqueeze(1))
            z = first.shape_output(_convert_own(cb, part), (P * x.shape[0], *self.pre_shape))
            h = network(first.activate(z), start=self.first + 1, stop=self.idx)
        self.in_shape = tuple(h.shape[1:])
        cb = layer.crossbar
        xt = cb.input_voltages(layer.matrix_input(h))                   # (nr, P·rows, R)
        reps = P if self.fresh else 1
        return xt.reshape(cb.n_row_tiles, reps, -1, cb.tile_rows).transpose(0, 1)


def measure_costs(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
                  cfg: DGCConfig, plan, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cost of every cycle of ``plan`` (rows, outs, cycles per weight) and the base cost C(w), measured on
    the layer's unwired read in batches equal in distribution to the chip's sequence. ``limit``: measure only
    the first ``limit`` cycles (benchmarks time part of a layer; the other costs are NaN)."""
    cb = layer.crossbar
    c = cb.config
    stages = list(network.stages)
    idx = stages.index(layer)
    fresh = cfg.lower_reads == "fresh" and any(has_noise(s) for s in stages[:idx] if isinstance(s, AnalogLayer))
    dtype = cb.read_dtype
    rows, outs = cb.in_features, cb.out_features
    nr, R, cols = cb.n_row_tiles, cb.tile_rows, cb.padded_shape[1]
    residues = plan.inc_w is not None
    E = plan.pert_w.shape[0]
    scale = c.input_max * c.w_max
    dev = cb.device
    with torch.no_grad():
        w_hat, gsq = (t.to(dtype) if t is not None else None for t in cb._read_tensors())
        w_state = w_hat.clone()
        q_state = gsq.clone() if gsq is not None else None
        lower = _LowerReads(network, layer, x, fresh)

        def above(z: torch.Tensor, unit: float = 1.0) -> torch.Tensor:
            """Costs from the converted outputs z, in units of ``unit`` (an ADC step where z holds codes)."""
            return costs_above(network, layer, z[..., :outs] * (scale * unit), y, cost, lower.in_shape)

        def convert(part: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
            """Noise, ADC of every tile column and the digital sum over tiles: (P, rows, cols)."""
            if var is not None:
                part = cb.add_read_noise(part, var)
            return _tile_sum(quantize(part, c.adc_bits, c.adc_range, inplace=True))

        def state_sums(xt: torch.Tensor, w: torch.Tensor, q: torch.Tensor | None):
            part = torch.matmul(xt, w.reshape(nr, R, cols))
            var = torch.matmul(xt * xt, q.reshape(nr, R, cols)) if q is not None else None
            return part, var

        # The base measurement: the chip as it is, one fresh read of everything.
        xt0 = lower(1)
        c0 = above(convert(*state_sums(xt0, w_state, q_state)))[0]
        shared = None if fresh else xt0[0]                                        # (nr, rows, R)
        start_sums = state_sums(shared, w_state, q_state) if shared is not None else None

        rank_one = None
        if shared is not None and not residues:
            rank_one = _RankOneAbove.make(network, layer, start_sums[0], scale, y, cost)
        # A fully connected layer's neuron circuits, where shared inputs and no read noise leave every column but
        # the perturbed one as in its row state: the states' neuron outputs are computed once (see
        # _shared_input_batch). Other layers (convolutions: neurons are channels of many positions) read in full.
        neurons = layer.activation if isinstance(layer, AnalogLinear) and layer.reads_per_sample == 1 else None
        total = rows * outs * E
        chunk = cfg.chunk or max(1, CHUNK_ELEMENTS // _elements_per_measurement(network, layer, y.shape[0], fresh))
        costs = torch.full((total,), float("nan"), device=dev, dtype=dtype)
        flat = [t.to(dtype).permute(1, 2, 0).reshape(-1) if t is not None else None           # cycle order
                for t in (plan.pert_w, plan.pert_q, plan.inc_w, plan.inc_q)]
        flat_pw, flat_pq, flat_iw, flat_iq = flat
        # Σ of the restore errors up to each cycle, once (a cell's own earlier cycles in a chunk are a difference)
        csum_iw, csum_iq = (torch.cat([t.new_zeros(1), t.cumsum(0)]) if t is not None and residues else None
                            for t in (flat_iw, flat_iq))
        col_index = torch.arange(cols, device=dev)
        last = total if limit is None else min(total, limit)
        for start in range(0, last, chunk):
            k = torch.arange(start, min(last, start + chunk), device=dev)
            P = len(k)
            cell = k // E
            i, j = cell // outs, cell % outs
            r, ii = i // R, i % R
            ar = torch.arange(P, device=dev)
            dw = flat_pw[k]
            dq = flat_pq[k] if flat_pq is not None else None
            if residues and shared is not None:
                # With shared inputs the measured cell also holds the restore errors of its own earlier cycles
                # in this chunk (the earlier chunks' are in the state already; with fresh inputs the prefix
                # over the chunk's cycles carries them).
                first_of_cell = torch.clamp(cell * E, min=start)
                dw = dw + (csum_iw[k] - csum_iw[first_of_cell])
                if dq is not None:
                    dq = dq + (csum_iq[k] - csum_iq[first_of_cell])
            if rank_one is not None:
                column = start_sums[0][:, :, j].permute(2, 0, 1).clone()                # (P, nr, rows)
                column[ar, r] += shared[r, :, ii] * dw[:, None]
                column = quantize(column, c.adc_bits, c.adc_range, inplace=True).sum(1)
                costs[start:start + P] = rank_one(column * scale, i, j, k % E)
                continue
            if shared is not None:
                z, unit, end = _shared_input_batch(cb, shared, start_sums, i, j, r, ii, dw, dq, k, flat_iw, flat_iq,
                                                   residues, col_index, quantize_args=(c.adc_bits, c.adc_range),
                                                   neurons=neurons, e=k % E, scale=scale)
                if residues:
                    start_sums = end
                if unit is None:   # z holds the layer's neuron outputs
                    costs[start:start + P] = costs_from_outputs(network, layer, z, y, cost)
                    continue
            else:
                z, unit = _fresh_input_batch(cb, lower(P), w_state, q_state, i, j, r, ii, dw, dq, k, flat_iw,
                                             flat_iq, residues, state_sums, convert, ar), 1.0
            costs[start:start + P] = above(z, unit)
            del z
    return costs.reshape(rows, outs, E), c0


class _RankOneAbove:
    """Costs of measurements whose layer changed in one output column only, and nothing else (inputs shared,
    no read noise, no neuron noise, no restore errors): the neuron circuit of that column is evaluated alone,
    and the next layer's partial sums change by a rank-one term, its input's change times the column's row
    of weights. From there on every measurement is evaluated in full, with fresh noise."""

    @classmethod
    def make(cls, network: AnalogNetwork, layer: AnalogLayer, part0: torch.Tensor, scale: float, y: torch.Tensor,
             cost: str):
        stages = list(network.stages)
        idx = stages.index(layer)
        above = stages[idx + 1] if idx + 1 < len(stages) else None
        if has_noise(layer) or not isinstance(layer, AnalogLinear) or not isinstance(above, AnalogLinear) or \
                above.crossbar.config.wire_resistance != "none":
            return None
        return cls(network, layer, above, part0, scale, y, cost)

    def __init__(self, network, layer, above, part0, scale, y, cost):
        self.network, self.layer, self.above, self.y, self.cost = network, layer, above, y, cost
        self.idx = list(network.stages).index(above)
        cb, cb2 = layer.crossbar, above.crossbar
        c = cb.config
        outs = cb.out_features
        self.z0 = quantize(part0.clone(), c.adc_bits, c.adc_range, inplace=True).sum(0)[:, :outs] * scale
        self.h0 = layer.activate(self.z0)                                             # (rows, outs)
        self.d0 = cb2.dac(above.matrix_input(self.h0))                               # (rows, rows of above)
        self.w2, self.q2 = (t.to(cb2.read_dtype) if t is not None else None for t in cb2._read_tensors())
        self.part2 = cb2._clean_partials(self.d0)                                    # (nr, rows, cols)
        self.var2 = cb2._tile_products(self.d0 * self.d0, self.q2) if self.q2 is not None else None

    def __call__(self, column: torch.Tensor, i: torch.Tensor, j: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Costs of P measurements from the new value of each one's column j (P, rows), scaled."""
        layer, above, cb2 = self.layer, self.above, self.above.crossbar
        P, rows = column.shape
        E = int(e.max()) + 1
        # The neuron circuits of the changed columns, packed: each (row, cycle) group of the chunk perturbs
        # every column at most once, so one (rows, outs) evaluation serves a group's measurements.
        group = (i - i[0]) * E + e
        packed = self.z0.expand(int(group.max()) + 1, *self.z0.shape).clone()
        packed[group, :, j] = column
        h = layer.activate(packed.reshape(-1, packed.shape[-1])).reshape(packed.shape)[group, :, j]   # (P, rows)
        d = cb2.dac(h)
        d_base = self.d0[:, j].T                                                     # (P, rows)
        tile = j // cb2.tile_rows
        ar = torch.arange(P, device=column.device)
        nr, _, cols = self.part2.shape
        part = self.part2[:, None].expand(nr, P, rows, cols).clone()
        part[tile, ar] += (d - d_base)[:, :, None] * self.w2[j][:, None, :]
        part = part.reshape(nr, P * rows, cols)
        if self.var2 is not None:
            var = self.var2[:, None].expand(nr, P, rows, cols).clone()
            var[tile, ar] += (d * d - d_base * d_base)[:, :, None] * self.q2[j][:, None, :]
            part = cb2.add_read_noise(part, var.reshape(nr, P * rows, cols))
        z = above.shape_output(_convert_own(cb2, part), (P * rows, cb2.in_features - int(above.has_bias)))
        out = self.network(above.activate(z), start=self.idx + 1)
        batch = self.y.shape[0]
        return cost_per_sample(out.to(column.dtype), self.y.repeat(P), self.cost).reshape(P, batch).mean(1)


def _row_states(cb, xs: torch.Tensor, start: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor,
                inc: torch.Tensor, square: bool) -> tuple[torch.Tensor, int]:
    """Partial sums (or variances) of the layer's state before each row the chunk spans and after its last:
    (span + 1, nr, rows, cols). Row t's restore errors are those of the chunk's cycles in row i0 + t."""
    R = cb.tile_rows
    i0 = int(i[0])
    span = int(i[-1]) - i0 + 1
    cols = start.shape[-1]
    per_row = torch.zeros(span * cols, device=start.device, dtype=start.dtype)
    per_row.index_add_(0, (i - i0) * cols + j, inc[k])
    per_row = per_row.reshape(span, cols)
    rr = torch.arange(i0, i0 + span, device=start.device)
    inputs = xs[rr // R, :, rr % R]                                                  # (span, rows)
    if square:
        inputs = inputs * inputs
    steps = torch.zeros((span, *start.shape), device=start.device, dtype=start.dtype)
    steps[torch.arange(span, device=start.device), rr // R] = inputs[:, :, None] * per_row[:, None, :]
    return torch.cat([start[None], start[None] + steps.cumsum(0)]), i0


def _convert_own(cb, part: torch.Tensor) -> torch.Tensor:
    """``cb.convert`` of partial sums in normalized units (weight × input over input_max·w_max, as this engine
    builds them from cached products) that are its own temporary: scaled to ADC steps in place."""
    bits = cb.config.adc_bits
    step = cb.adc_step(bits)
    return cb.convert(part.mul_(1.0 / step) if step != 1.0 else part, step, bits)


def _tile_sum(part: torch.Tensor) -> torch.Tensor:
    """The digital sum over the row tiles (dim 1) of (P, tiles, rows, cols) converter outputs, tile by tile into
    one buffer: 2.5x faster than ``sum(1)`` here (which fills its output and strides across the tiles). Exact
    for converter codes (whole numbers); an ideal converter's sums agree with ``sum(1)`` to rounding."""
    if part.shape[1] == 1:
        return part[:, 0]
    z = torch.add(part[:, 0], part[:, 1])
    for q in range(2, part.shape[1]):
        z.add_(part[:, q])
    return z


def _segments(t: torch.Tensor) -> list[tuple[int, int, int]]:
    """The chunk's measurements grouped by the row of the chunk they perturb (cycle order: rows ascend, so each
    row's measurements are consecutive): (row t, first, end)."""
    values, counts = torch.unique_consecutive(t, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return list(zip(values.tolist(), [0, *ends[:-1]], ends, strict=True))


def _shared_input_batch(cb, xs, start_sums, i, j, r, ii, dw, dq, k, flat_iw, flat_iq, residues, col_index,
                        quantize_args, neurons=None, e=None, scale=1.0):
    """The converted outputs (P, rows, cols) of P measurements whose inputs are the same (``xs``: (nr, rows, R)),
    in units of ``unit`` (returned with them), and the partial sums at the chunk's end (pulse modes). Without
    read noise and with ``neurons`` (the layer's neuron circuits; ``e``: each measurement's cycle of its cell,
    ``scale``: the outputs' unit) it returns the neuron outputs (P·rows, out) instead, and None as the unit.

    Measurement p (row t of the chunk, column j) holds the row state after row t in the columns left of j of its
    own tile and the one before row t everywhere else (the two are the same outside that tile). Each row's
    measurements are consecutive, so every state is broadcast into its row's slice of the output (one pass)
    instead of being gathered per measurement and selected column by column."""
    part0, var0 = start_sums
    P = len(k)
    ar = torch.arange(P, device=xs.device)
    xi = xs[r, :, ii]                                                                # (P, rows)
    if residues:
        parts, i0 = _row_states(cb, xs, part0, i, j, k, flat_iw, square=False)
        var_states = _row_states(cb, xs, var0, i, j, k, flat_iq, square=True)[0] if var0 is not None else None
        t = i - i0
        end = (parts[-1], var_states[-1] if var_states is not None else None)
    else:
        parts, var_states = part0[None], (var0[None] if var0 is not None else None)
        t = torch.zeros_like(i)
        end = start_sums
    segments = _segments(t)
    if var_states is None:
        # Only column j converts anew: the other columns convert as in the row state they hold.
        z_states = quantize(parts.clone(), *quantize_args, inplace=True).sum(1)       # (span + 1, rows, cols)
        if neurons is not None:
            return _shared_neurons(neurons, parts, z_states, t, i, j, r, xi, dw, e, segments, residues, col_index,
                                   quantize_args, scale), None, end
        if residues:
            z = z_states.new_empty((P, *z_states.shape[1:]))
            for s, a, b in segments:
                left = (col_index < j[a:b, None])[:, None, :]
                torch.where(left, z_states[s + 1], z_states[s], out=z[a:b])
        else:
            z = z_states[0].expand(P, *z_states.shape[1:]).clone()
        column = parts[t, :, :, j]                                                   # (P, nr, rows)
        column[ar, r] += xi * dw[:, None]
        z[ar, :, j] = quantize(column, *quantize_args, inplace=True).sum(1)
        return z, 1.0, end
    # With read noise every tile column converts anew. The ADC works in its own steps: the few states are
    # scaled once, so the converters only clip and round (no division and multiplication per measurement).
    # The noise is σ·√var·n with √var taken once per state; the perturbed column's own variance (Σ G² with
    # the perturbation) enters as a correction of its term. The same draws as the former add_read_noise on a
    # (P, ...) copy of the states: the same up to rounding.
    bits = quantize_args[0]   # the ADC range is the crossbar's (adc_step)
    step = cb.adc_step(bits)
    inv = 1.0 / step
    noise_scale = cb._noise_scale() * inv
    codes = parts * inv                                                              # (states, nr, rows, cols)
    std = var_states.clamp(min=0).sqrt_()
    noise = cb.read_stream.normal((P, *parts.shape[1:]), dtype=parts.dtype)
    column_noise = noise[ar, r, :, j]                                                # (P, rows), before it is used
    out = noise                                   # each slice becomes its partial sums in place (one pass)
    nr = parts.shape[1]
    for s, a, b in segments:
        if not residues:
            torch.addcmul(codes[s], std[s], noise[a:b], value=noise_scale, out=out[a:b])
            continue
        rs = int(r[a])                                                               # the row's tile
        for lo, hi in ((0, rs), (rs + 1, nr)):
            if hi > lo:
                torch.addcmul(codes[s, lo:hi], std[s, lo:hi], noise[a:b, lo:hi], value=noise_scale,
                              out=out[a:b, lo:hi])
        left = (col_index < j[a:b, None])[:, None, :]
        mean = torch.where(left, codes[s + 1, rs], codes[s, rs])
        sd = torch.where(left, std[s + 1, rs], std[s, rs])
        torch.addcmul(mean, sd, noise[a:b, rs], value=noise_scale, out=out[a:b, rs])
    column_std = (var_states[t, r, :, j] + xi * xi * dq[:, None]).clamp_(min=0).sqrt_()     # (P, rows)
    out[ar, r, :, j] += (xi * (dw * inv)[:, None]).addcmul_(column_std - std[t, r, :, j], column_noise,
                                                           value=noise_scale)
    if bits is not None:
        quantize_codes(out, 2 ** (bits - 1) - 1)
    return _tile_sum(out), step, end


def _shared_neurons(neurons, parts, z_states, t, i, j, r, xi, dw, e, segments, residues, col_index, quantize_args,
                    scale) -> torch.Tensor:
    """Neuron outputs (P·rows, out) of P measurements that differ from their row states in column j only (no read
    noise): gain·f(z) + offset of every state once, of each measurement's column j in a packed evaluation, and
    each measurement's own neuron noise (the unit's ``finish``: the draws ``forward`` makes). The same numbers as
    ``forward`` on each measurement's outputs: f, gain and offset act on each element alone."""
    P = len(t)
    ar = torch.arange(P, device=t.device)
    outs = neurons.num_neurons
    n_states, rows = z_states.shape[:2]
    y_states = neurons.noiseless((z_states[..., :outs] * scale).reshape(-1, outs)).reshape(n_states, rows, outs)
    column = parts[t, :, :, j]                                                       # (P, nr, rows)
    column[ar, r] += xi * dw[:, None]
    column = quantize(column, *quantize_args, inplace=True).sum(1) * scale           # (P, rows)
    # Column j of each measurement through its own neuron: packed so that each (row, cycle) group of the chunk,
    # which perturbs every column at most once, is one (rows, out) evaluation.
    E = int(e.max()) + 1
    group = (i - i[0]) * E + e
    packed = y_states.new_zeros((int(group.max()) + 1, rows, outs))
    packed[group, :, j] = column
    y_column = neurons.noiseless(packed.reshape(-1, outs)).reshape(packed.shape)[group, :, j]   # (P, rows)
    # Each measurement's noise is drawn into its own buffer with state 0's outputs added (one pass); a row's
    # measurements then move to their state (states after 0) and take the state after the row in the columns
    # left of j (in place), and column j its own outputs. The same as forward on each measurement's outputs
    # up to the rounding of these differences.
    h = neurons.finish(y_states[0], copies=P, clip=False)                             # (P·rows, out)
    hv = h.view(P, rows, outs)
    if residues:
        for s, a, b in segments:
            if s:
                hv[a:b] += y_states[s] - y_states[0]
            left = (col_index[:outs] < j[a:b, None]).to(h.dtype)[:, None, :]
            hv[a:b].addcmul_(left, y_states[s + 1] - y_states[s])
    hv[ar, :, j] += y_column - y_states[t, :, j]
    return neurons.clip_output(h)


def _fresh_input_batch(cb, xt, w_state, q_state, i, j, r, ii, dw, dq, k, flat_iw, flat_iq, residues, state_sums,
                       convert, ar):
    """The converted outputs (P, rows, cols) of P measurements that each read the layers below afresh
    (``xt``: (P, nr, rows, R)): every state's partial sums in full; the restore errors of the chunk's earlier
    cycles as an exclusive prefix sum over the few rows the chunk spans, read with each measurement's inputs."""
    R = cb.tile_rows
    P = len(k)
    cols = w_state.shape[1]
    part, var = state_sums(xt, w_state, q_state)
    xi = xt[ar, r, :, ii]                                                            # (P, rows)
    if residues:
        i0 = int(i[0])
        span = int(i[-1]) - i0 + 1
        rows_span = torch.arange(i0, i0 + span, device=xt.device)
        cell = (i - i0) * cols + j
        xs = xt[:, rows_span // R, :, rows_span % R].permute(1, 2, 0)                # (P, rows, span)
        for inc, target, state in ((flat_iw, part, w_state), (flat_iq if var is not None else None, var, q_state)):
            if inc is None:
                continue
            prefix = torch.zeros((P, span * cols), device=xt.device, dtype=part.dtype)
            prefix[ar, cell] = inc[k]
            prefix = prefix.cumsum(0).roll(1, 0)
            prefix[0] = 0
            prefix = prefix.reshape(P, span, cols)
            inputs = xs if target is part else xs * xs
            for t in torch.unique(rows_span // R).tolist():
                sel = (rows_span // R) == t
                target[:, t] += torch.matmul(inputs[..., sel], prefix[:, sel])
            state.view(-1).index_add_(0, i * cols + j, inc[k])                      # the chunk's errors stay
    part[ar, r, :, j] += xi * dw[:, None]
    if var is not None:
        var[ar, r, :, j] += xi * xi * dq[:, None]
    return convert(part, var)
