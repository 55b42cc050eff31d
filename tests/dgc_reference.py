"""The batched exact DGC measurement as it was before the row-state engine (``dgc_batch``): kept only as the
oracle the tests compare the engine against (the same random stream where both draw alike)."""

from __future__ import annotations

import torch

from neurosim.crossbar import quantize
from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import PerturbationPlan, _nominal_dw
from neurosim.training.dgc_batch import costs_above as _costs_above
from neurosim.training.dgc_batch import has_noise as _has_noise

_CHUNK_ELEMENTS = 4_000_000


def measure_reference(network: AnalogNetwork, layer: AnalogLayer, x: torch.Tensor, y: torch.Tensor, cost: str,
             cfg: DGCConfig, plan: PerturbationPlan) -> tuple[torch.Tensor, float]:
    """The measurements of every cycle of ``plan``, in batches equal in distribution to the chip's sequence."""
    cb = layer.crossbar
    c = cb.config
    stages = list(network.stages)
    idx = stages.index(layer)
    fresh = cfg.lower_reads == "fresh" and any(_has_noise(s) for s in stages[:idx] if isinstance(s, AnalogLayer))
    dtype = cb.read_dtype
    rows, outs = cb.in_features, cb.out_features
    nr, R, cols = cb.n_row_tiles, cb.tile_rows, cb.padded_shape[1]
    residues = plan.inc_w is not None
    E = plan.pert_w.shape[0]
    with torch.no_grad():
        w_hat, gsq = (t.to(dtype) if t is not None else None for t in cb._read_tensors())
        w_state = w_hat.clone()
        q_state = gsq.clone() if gsq is not None else None

        in_shape: list = []

        def inputs(replicas: int) -> torch.Tensor:
            """The layer's DAC outputs per row tile for ``replicas`` fresh reads of the layers below."""
            h = network(x.repeat((replicas,) + (1,) * (x.dim() - 1)), start=0, stop=idx)
            in_shape[:] = h.shape[1:]
            xt = cb.input_voltages(layer.matrix_input(h))                       # (nr, replicas·N, R)
            return xt.reshape(nr, replicas, -1, R).transpose(0, 1)              # (replicas, nr, N, R)

        xt0 = inputs(1)                                                         # the base measurement's read
        xt_shared = None if fresh else xt0[0]
        n_rows = xt0.shape[2]

        def measure(part: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
            """Costs of P chip states from their partial sums (P, nr, N, cols): noise, ADC, neurons, above."""
            if var is not None:
                part = cb.add_read_noise(part, var)
            z = quantize(part, c.adc_bits, c.adc_range, inplace=True).sum(1)
            return _costs_above(network, layer, z[..., :outs] * (c.input_max * c.w_max), y, cost, in_shape)

        def state_sums(xt: torch.Tensor, w: torch.Tensor, q: torch.Tensor | None):
            part = torch.matmul(xt, w.reshape(-1, nr, R, cols) if w.dim() == 3 else w.reshape(nr, R, cols))
            var = None
            if q is not None:
                var = torch.matmul(xt * xt, q.reshape(-1, nr, R, cols) if q.dim() == 3 else q.reshape(nr, R, cols))
            return part, var

        # The base measurement: the chip as it is, one fresh read of everything.
        c0 = measure(*state_sums(xt0, w_state, q_state))[0]
        base = None if fresh else state_sums(xt0, w_state, q_state)
        # Shortcut: with the same inputs for every measurement, no restore errors and no read noise, every
        # column but the perturbed one converts as in the base state: a measurement costs (N, cols), not
        # (row tiles, N, cols), and only the perturbed column passes its ADC again.
        column_only = base is not None and not residues and base[1] is None
        if column_only:
            q0 = quantize(base[0][0].clone(), c.adc_bits, c.adc_range, inplace=True)     # (nr, N, cols)
            z0 = q0.sum(0)

        total = rows * outs * E
        per = (n_rows * cols if column_only else nr * n_rows * cols * (2 if q_state is not None else 1)) + \
            (nr * n_rows * R if fresh else 0)
        chunk = cfg.chunk or max(1, _CHUNK_ELEMENTS // max(1, per))
        costs = torch.empty(total, device=cb.device, dtype=dtype)
        flat_pw = plan.pert_w.to(dtype).permute(1, 2, 0).reshape(-1)          # cycle order: cell-major
        flat_pq = plan.pert_q.to(dtype).permute(1, 2, 0).reshape(-1) if plan.pert_q is not None else None
        if residues:
            flat_iw = plan.inc_w.to(dtype).permute(1, 2, 0).reshape(-1)
            flat_iq = plan.inc_q.to(dtype).permute(1, 2, 0).reshape(-1) if plan.inc_q is not None else None
        for start in range(0, total, chunk):
            k = torch.arange(start, min(total, start + chunk), device=cb.device)
            P = len(k)
            cell = k // E
            i, j = cell // outs, cell % outs
            r, ii = i // R, i % R
            ar = torch.arange(P, device=cb.device)
            xt = inputs(P) if fresh else xt_shared[None]                        # (P or 1, nr, N, R)
            xi = xt[ar if fresh else 0, r, :, ii]                               # (P, N) input of the perturbed row
            if column_only:
                column = base[0][0][r, :, j] + xi * flat_pw[k][:, None]         # (P, N)
                z = z0.expand(P, n_rows, cols).clone()
                z[ar, :, j] += quantize(column, c.adc_bits, c.adc_range, inplace=True) - q0[r, :, j]
                costs[start:start + P] = _costs_above(network, layer, z[..., :outs] * (c.input_max * c.w_max),
                                                      y, cost, in_shape)
                continue
            if base is None or residues:
                part, var = state_sums(xt, w_state, q_state)
                part = part.expand(P, *part.shape[1:]).clone() if part.shape[0] != P else part
                var = var.expand(P, *var.shape[1:]).clone() if var is not None and var.shape[0] != P else var
            else:
                part = base[0].expand(P, *base[0].shape[1:]).clone()
                var = base[1].expand(P, *base[1].shape[1:]).clone() if base[1] is not None else None
            if residues:
                # Each measurement sees the restore errors of every earlier cycle: the state at the chunk's start
                # (w_state) plus an exclusive prefix sum of this chunk's restore errors, which lie in the few
                # rows the chunk spans (cycles go row by row): (P, span rows, cols), read with each
                # measurement's own inputs of those rows, tile by tile.
                i0 = int(i[0])
                span = int(i[-1]) - i0 + 1
                rows_span = torch.arange(i0, i0 + span, device=cb.device)
                flat = (i - i0) * cols + j
                xs = xt[:, rows_span // R, :, rows_span % R].permute(1, 2, 0)   # (P or 1, N, span)
                for kind, inc, target in (("w", flat_iw, part), ("q", flat_iq if var is not None else None, var)):
                    if inc is None:
                        continue
                    prefix = torch.zeros((P, span * cols), device=cb.device, dtype=dtype)
                    prefix[ar, flat] = inc[k]
                    prefix = prefix.cumsum(0).roll(1, 0)
                    prefix[0] = 0
                    prefix = prefix.reshape(P, span, cols)
                    inputs_span = xs if kind == "w" else xs * xs
                    for t in torch.unique(rows_span // R).tolist():
                        sel = (rows_span // R) == t
                        target[:, t] += torch.matmul(inputs_span[..., sel], prefix[:, sel])
                    state = w_state if kind == "w" else q_state
                    state.view(-1).index_add_(0, i * cols + j, inc[k])          # the chunk's errors stay
            part[ar, r, :, j] += xi * flat_pw[k][:, None]
            if var is not None:
                var[ar, r, :, j] += xi * xi * flat_pq[k][:, None]
            costs[start:start + P] = measure(part, var)
        dw_nom = _nominal_dw(layer, cfg)
        costs = costs.reshape(rows, outs, E)
        if E == 2:
            grad = (costs[..., 0] - costs[..., 1]) / (2 * dw_nom)
        else:
            grad = (costs[..., 0] - c0) / dw_nom
    return grad, float(c0)
