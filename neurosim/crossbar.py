"""Crossbar arrays: a weight matrix stored as conductances in tiles, read by Ohm's and Kirchhoff's laws.

Orientation: inputs drive rows, outputs are column currents, so a layer's weight matrix W has shape
(in_features, out_features) = (rows, cols) and the ideal read is y = x·W. Tiles of at most
tile_rows × tile_cols cells hold the matrix; each tile's column currents pass their own ADC and the partial
sums are added digitally, as on real chips. A weight is a differential pair w ∝ G⁺ − G⁻ centred in the
conductance window, or one device against a reference column at mid-window.

Units inside a read: inputs are normalized by ``input_max`` and become voltages ``x/input_max·read_voltage``;
currents are normalized by the current of one full-scale weight at full-scale input, so the ADC range
(``adc_range``) is in units of "sum of normalized input × normalized weight" and does not depend on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neurosim.backend import make_generator
from neurosim.config import ConfigError, setting
from neurosim.device import DeviceArray, DeviceSpec, pair_arrays, program_pairs
from neurosim.sampling import stochastic_round_sparse


@dataclass(frozen=True)
class CrossbarConfig:
    """Array organisation and periphery of one crossbar (one layer)."""

    tile_rows: int = setting(256, "rows per tile (inputs summed in one analog partial sum)", ge=1)
    tile_cols: int = setting(256, "columns per tile", ge=1)
    mapping: str = setting("differential", "weight mapping: 'differential' pair G+ − G−, or 'reference' "
                           "(one device against a mid-window reference column)",
                           choices=("differential", "reference"))
    w_max: float = setting(1.0, "weight magnitude mapped onto the full conductance window", gt=0.0)
    input_max: float = setting(1.0, "input magnitude mapped onto the full read voltage (inputs are clipped)",
                               gt=0.0)
    read_voltage: float = setting(0.2, "read voltage at full-scale input (V)", gt=0.0)
    dac_bits: int | None = setting(None, "input DAC resolution in bits (none: ideal)", ge=1, le=24)
    adc_bits: int | None = setting(None, "output ADC resolution in bits (none: ideal, no saturation)", ge=1, le=24)
    adc_range: float = setting(12.0, "ADC full scale, in normalized units of Σ x̂·ŵ per tile column "
                               "(cf. aihwkit's out_bound = 12)", gt=0.0)
    read_noise: bool = setting(True, "apply the device card's read noise on every read")
    wire_resistance: str = setting("none", "'none'; 'nodal': exact solve of the resistive network per tile "
                                   "(small arrays: factorization cached until a write); 'approximate': batched "
                                   "conjugate-gradient solve in torch for large tiles (see docs/wires.md)",
                                   choices=("none", "nodal", "approximate"))
    r_wire: float = setting(1.0, "resistance of one wire segment between neighbouring cells (ohm)", ge=0.0)
    rounding: str = setting("stochastic", "pulse count of an update: 'stochastic' (floor + Bernoulli of the "
                            "remainder: an unbiased pulse train) or 'deterministic' (nearest count: an update "
                            "below half a pulse fires none)", choices=("deterministic", "stochastic"))
    backward_dac_bits: int | None = setting(None, "DAC bits of the transposed read (none: as dac_bits)",
                                            ge=1, le=24)
    backward_adc_bits: int | None = setting(None, "ADC bits of the transposed read (none: as adc_bits)",
                                            ge=1, le=24)
    noise_management: bool = setting(True, "transposed read scales each error vector by its max |value| "
                                     "to use the DAC range, and scales back digitally")


def quantize(x: torch.Tensor, bits: int | None, limit: float, inplace: bool = False) -> torch.Tensor:
    """Clip to ±limit and round to a signed mid-tread grid of 2^(bits−1) − 1 positive levels.

    The rounding passes gradients straight through (autograd sees the clipped identity), which is what a
    linearized model of a converter can use. ``inplace``: x is the caller's temporary and may be overwritten
    (outside autograd)."""
    if bits is None:
        return x
    step = limit / (2 ** (bits - 1) - 1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # One temporary at most: this runs on every read of every perturbation DGC evaluates.
        x = x.clamp_(-limit, limit) if inplace else x.clamp(-limit, limit)
        return x.div_(step).round_().mul_(step)
    x = x.clamp(-limit, limit)
    return x + ((x / step).round() * step - x).detach()


class Crossbar:
    """The conductances of one layer's weight matrix, in tiles, with read, transposed read and programming."""

    def __init__(self, spec: DeviceSpec, in_features: int, out_features: int,
                 config: CrossbarConfig | None = None, seed: int = 0, name: str = "layer",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.config = config or CrossbarConfig()
        self.in_features, self.out_features = in_features, out_features
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        c = self.config
        self.n_row_tiles = math.ceil(in_features / c.tile_rows)
        self.n_col_tiles = math.ceil(out_features / c.tile_cols)
        self.tiles = self.n_row_tiles * self.n_col_tiles
        self.tile_rows = min(c.tile_rows, in_features)
        self.tile_cols = min(c.tile_cols, out_features)
        shape = (self.n_row_tiles * self.tile_rows, self.n_col_tiles * self.tile_cols)
        self.padded_shape = shape
        noise = make_generator(seed, self.device, name, "noise")
        self.plus = DeviceArray(spec, shape, make_generator(seed, self.device, name, "plus"), self.device,
                                dtype, noise)
        self.minus = None
        if c.mapping == "differential":
            self.minus = DeviceArray(spec, shape, make_generator(seed, self.device, name, "minus"), self.device,
                                     dtype, noise)
            pair_arrays(self.plus, self.minus)
        self.noise_generator = noise
        span = spec.g_max - spec.g_min
        self.g_mid = 0.5 * (spec.g_max + spec.g_min)
        # Conductance per unit weight: a pair spans ±span, a single device ±span/2 around the reference.
        self.k = span / c.w_max if c.mapping == "differential" else span / (2 * c.w_max)
        # Nominal weight change of one update pulse (a pair moves both devices, oppositely).
        self.dw_pulse = 2 * c.w_max / spec.pulses_ltp
        self.believed = torch.zeros(in_features, out_features, device=self.device, dtype=dtype)
        self.noise = True  # False: noise-free reads (linearized models, references); the card is unchanged
        self._cache_key = None
        self._cache: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._solvers = None
        self.set_weights(self.believed)

    # -- mapping ------------------------------------------------------------------------------------------
    def _pad(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = self.padded_shape
        if (rows, cols) == (self.in_features, self.out_features):
            return w.to(self.dtype)
        return torch.nn.functional.pad(w.to(self.dtype), (0, cols - self.out_features, 0, rows - self.in_features))

    def _arrays(self) -> list[DeviceArray]:
        return [self.plus] if self.minus is None else [self.plus, self.minus]

    def target_conductances(self, w: torch.Tensor) -> list[torch.Tensor]:
        """Conductances that store ``w``: a pair centred at mid-window, or one device around the reference."""
        w = self._pad(w.clamp(-self.config.w_max, self.config.w_max))
        if self.minus is None:
            return [self.g_mid + self.k * w]
        return [self.g_mid + 0.5 * self.k * w, self.g_mid - 0.5 * self.k * w]

    def set_weights(self, w: torch.Tensor) -> None:
        """Place the weights directly (an idealized write; see ``write_verify`` for the physical one)."""
        w = torch.as_tensor(w, device=self.device, dtype=self.dtype)
        self._check_shape(w)
        for array, g in zip(self._arrays(), self.target_conductances(w), strict=True):
            array.set_conductance(g)
        self.believed.copy_(w.clamp(-self.config.w_max, self.config.w_max))  # in place: layers alias it

    def _check_shape(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != (self.in_features, self.out_features):
            raise ValueError(f"{self.name}: weights of shape {tuple(w.shape)}, expected "
                             f"({self.in_features}, {self.out_features})")

    def conductance_difference(self) -> torch.Tensor:
        """G⁺ − G⁻ (or G − G_ref) of every padded cell, drift included, noise-free."""
        g = self.plus.conductance()
        return g - (self.minus.conductance() if self.minus is not None else self.g_mid)

    def weights(self) -> torch.Tensor:
        """The weights the conductances really hold now (noise-free): what the chip computes with."""
        return (self.conductance_difference() / self.k)[: self.in_features, : self.out_features]

    def _state_key(self) -> tuple:
        return (self.noise, *(a.read_key() for a in self._arrays()))

    def _read_values(self, g: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        diff = g[0] - (g[1] if len(g) == 2 else self.g_mid)
        w_hat = diff / (self.k * self.config.w_max)
        gsq = None
        if self.noise and self.config.read_noise and self.spec.read_noise > 0:
            gsq = g[0] * g[0] if len(g) == 1 else torch.addcmul(g[0] * g[0], g[1], g[1])
        return w_hat, gsq

    def _read_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalized weights ŵ = (G⁺ − G⁻)/(k·w_max) and, for read noise, Σ G², both padded; cached until a
        write or drift changes the conductances (a sparse write updates the cache in place)."""
        key = self._state_key()
        if key != self._cache_key:
            self._cache = self._read_values([a.conductance() for a in self._arrays()])
            self._cache_key, self._solvers = key, None
        return self._cache

    def _refresh_cells(self, cells: torch.Tensor, new: torch.Tensor | None = None) -> None:
        """After a write of a few cells of a non-drifting array: recompute the cached read tensors there only
        (the same arithmetic as a full rebuild, so the same bits). ``new``: the pair's new conductances of
        those cells, as ``program_pair`` returns them."""
        g = new.split(cells.numel()) if new is not None else [a.g.view(-1).index_select(0, cells)
                                                               for a in self._arrays()]
        values = self._read_values(list(g))
        for cached, fresh in zip(self._cache, values, strict=True):
            if cached is not None:
                cached.view(-1).index_copy_(0, cells, fresh)
        self._cache_key, self._solvers = self._state_key(), None

    def dac(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs after the DAC, normalized (x̂ in [−1, 1]): (B, in)."""
        c = self.config
        xn = x.to(self.dtype)
        if c.input_max != 1.0:
            xn = xn / c.input_max
        return quantize(xn, c.dac_bits, 1.0, inplace=xn is not x)

    def _row_tiles(self, xn: torch.Tensor) -> torch.Tensor:
        pad = self.padded_shape[0] - self.in_features
        if pad:
            xn = torch.nn.functional.pad(xn, (0, pad))
        return xn.reshape(xn.shape[0], self.n_row_tiles, self.tile_rows).transpose(0, 1)

    def input_voltages(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs after the DAC, normalized (x̂ in [−1, 1]), padded and split per row tile: (nr, B, R)."""
        return self._row_tiles(self.dac(x))

    def _tile_products(self, xn: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """Per row tile, xn·mat over that tile's rows: (nr, B, C). The rows of a ragged last tile past the
        last input are not computed (a 785-row layer in 256-row tiles would otherwise do 30% more work)."""
        R, nr = self.tile_rows, self.n_row_tiles
        full = self.in_features // R
        B, C = xn.shape[0], mat.shape[1]
        if full == nr:
            return torch.bmm(xn.reshape(B, nr, R).transpose(0, 1), mat[: nr * R].reshape(nr, R, C))
        head_x = xn[:, : full * R].reshape(B, full, R).transpose(0, 1)
        head_m = mat[: full * R].reshape(full, R, C)
        tail_x, tail_m = xn[:, full * R:], mat[full * R: self.in_features]
        if torch.is_grad_enabled() and (xn.requires_grad or mat.requires_grad):  # out= has no autograd
            tail = torch.mm(tail_x, tail_m)[None]
            return torch.cat([torch.bmm(head_x, head_m), tail]) if full else tail
        out = torch.empty((nr, B, C), device=xn.device, dtype=torch.result_type(xn, mat))
        if full:
            torch.bmm(head_x, head_m, out=out[:full])
        torch.mm(tail_x, tail_m, out=out[full])
        return out

    def partial_sums(self, xn: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Analog column sums of every row tile before the ADCs, read noise included: (nr, B, padded cols),
        in normalized units, from the DAC outputs xn (B, in). ``w`` (in, out) replaces the stored weights, for
        autograd (linearized DGC)."""
        c = self.config
        w_hat, gsq = self._read_tensors()
        if w is not None:
            w_hat = self._pad(w / c.w_max) if w.shape != w_hat.shape else w / c.w_max
        if c.wire_resistance != "none" and w is None:
            part = self._nodal_partials(self._row_tiles(xn) * c.read_voltage) / (c.read_voltage * self.k * c.w_max)
        else:
            part = self._tile_products(xn, w_hat)
        if gsq is not None:
            part = self.add_read_noise(part, self._tile_products(xn * xn, gsq), nonnegative=True)
        return part

    def add_read_noise(self, part: torch.Tensor, var: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
        """Read noise of every cell summed per column: Gaussian of variance Σ V̂²·(σ·G)² (``var`` = Σ V̂²·G²),
        drawn at the output -- the same distribution as one draw per cell, for one matmul instead of B·R·C
        draws. Normalized units, as the partial sums. Works in place on both buffers, which must be the
        caller's own temporaries; ``nonnegative``: var is a plain sum of squares (no clamp needed)."""
        if not nonnegative:
            var = var.clamp_(min=0)
        noise = torch.randn(part.shape, generator=self.noise_generator, device=part.device, dtype=part.dtype)
        return part.addcmul_(var.sqrt_(), noise, value=self.spec.read_noise / (self.k * self.config.w_max))

    def convert(self, part: torch.Tensor) -> torch.Tensor:
        """ADC of every tile column, digital sum over row tiles, back to weight × input units: (B, out). Consumes
        ``part`` (the partial sums are a temporary of the read)."""
        c = self.config
        part = quantize(part, c.adc_bits, c.adc_range, inplace=True)
        y = part[0] if self.n_row_tiles == 1 else part.sum(0)
        scale = c.input_max * c.w_max
        if y.shape[1] == self.out_features and scale == 1.0:
            return y  # nothing to cut off or scale (the default ranges): the digital sum itself
        return y[:, : self.out_features] * scale

    def read(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Forward read y ≈ x·W of a batch (B, in) → (B, out), through DAC, tiles, read noise and ADCs."""
        return self.convert(self.partial_sums(self.dac(x), w))

    def read_transposed(self, d: torch.Tensor) -> torch.Tensor:
        """Transposed read d·Wᵀ of a batch (B, out) → (B, in): columns driven, rows sensed (BP's backward path).

        With noise management each error vector is divided by its largest magnitude before the DAC and
        multiplied back after the ADC, as chips do to keep small errors above the converters' resolution."""
        c = self.config
        w_hat, gsq = self._read_tensors()
        dac_bits = c.backward_dac_bits or c.dac_bits
        adc_bits = c.backward_adc_bits or c.adc_bits
        d = d.to(self.dtype)
        scale = d.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) if c.noise_management else \
            torch.full((d.shape[0], 1), c.input_max, device=d.device, dtype=d.dtype)
        dn = quantize(d / scale, dac_bits, 1.0)
        pad = self.padded_shape[1] - self.out_features
        if pad:
            dn = torch.nn.functional.pad(dn, (0, pad))
        dt = dn.reshape(dn.shape[0], self.n_col_tiles, self.tile_cols).transpose(0, 1)   # (nc, B, C)
        unit = c.read_voltage * self.k * c.w_max
        rows = self.in_features  # padded rows carry no current: no converter or noise draw is spent on them
        if c.wire_resistance != "none":
            part = self._nodal_partials(dt * c.read_voltage, transposed=True)[:, :, :rows] / unit
        else:
            w = w_hat[:rows].reshape(rows, self.n_col_tiles, self.tile_cols).permute(1, 2, 0)
            part = torch.bmm(dt, w)                                                 # (nc, B, rows)
        if gsq is not None:
            g2 = gsq[:rows].reshape(rows, self.n_col_tiles, self.tile_cols).permute(1, 2, 0)
            part = self.add_read_noise(part, torch.bmm(dt * dt, g2), nonnegative=True)
        # Row partial sums of one column tile pass one ADC, then add digitally across column tiles.
        part = quantize(part, adc_bits, c.adc_range, inplace=True)
        y = part[0] if self.n_col_tiles == 1 else part.sum(0)
        return y * (scale * c.w_max)

    def _nodal_partials(self, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Per-tile currents with wire resistance (exact nodal solve or its approximation), as (tiles along the
        summed axis, B, ·)."""
        from neurosim.wires import NodalSolver, approximate_read, approximate_read_transposed

        exact = self.config.wire_resistance == "nodal"
        r = self.config.r_wire

        if self._solvers is None:
            self._solvers = {}
        R, C = self.tile_rows, self.tile_cols
        outs = []
        n_sum, n_other = (self.n_col_tiles, self.n_row_tiles) if transposed else (self.n_row_tiles,
                                                                                 self.n_col_tiles)
        for s in range(n_sum):
            pieces = []
            for o in range(n_other):
                rr, cc = (o, s) if transposed else (s, o)
                current = 0
                for sign, array in zip((1.0, -1.0), self._arrays(), strict=False):
                    g = array.conductance()[rr * R:(rr + 1) * R, cc * C:(cc + 1) * C]
                    if not exact:
                        fn = approximate_read_transposed if transposed else approximate_read
                        current = current + sign * fn(g, v[s], r, r)
                        continue
                    key = (rr, cc, id(array))
                    if key not in self._solvers:
                        self._solvers[key] = NodalSolver(g, r, r)
                    solver = self._solvers[key]
                    current = current + sign * (solver.read_transposed(v[s]) if transposed else solver.read(v[s]))
                if self.minus is None:  # reference column: ideal, no wire resistance
                    ref = v[s].sum(1, keepdim=True) * self.g_mid
                    current = current - ref
                pieces.append(current)
            outs.append(torch.cat(pieces, dim=1))
        return torch.stack(outs)

    # -- programming --------------------------------------------------------------------------------------
    def pulse_counts(self, dw: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pulses the controller issues for a requested weight change scale·dw, sparsely: (flat indices
        into the (in, out) matrix, signed counts), only cells with a non-zero count. Stochastic rounding fires
        floor(m + u) pulses for m = |Δw|/Δw_pulse: unbiased, drawn by ``stochastic_round_sparse``."""
        factor = scale / self.dw_pulse
        if self.config.rounding == "stochastic":
            return stochastic_round_sparse(dw.to(self.dtype), generator or self.noise_generator, factor)
        n = dw.to(self.dtype).mul(factor).round_().view(-1)
        idx = n.nonzero().squeeze(1)
        return idx, n.index_select(0, idx)

    def pulses_for_delta(self, dw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Signed pulse counts (in, out) that the controller issues for a requested weight change (dense)."""
        idx, counts = self.pulse_counts(dw, generator)
        n = torch.zeros(dw.numel(), device=dw.device, dtype=self.dtype)
        return n.index_copy_(0, idx, counts).reshape(dw.shape)

    def apply_pulses(self, n: torch.Tensor) -> dict[str, int]:
        """Fire signed pulse counts (in, out) at the weights: a pair moves both devices oppositely. Returns the
        pulse count and the sequential pulse slots (rows one after another, a row's cells in parallel, tiles
        in parallel), which the engine turns into time and energy. Works on the pulsed cells only."""
        flat = n.reshape(-1).to(self.dtype)
        idx = flat.nonzero().squeeze(1)
        return self.fire(idx, flat.index_select(0, idx))

    def fire(self, idx: torch.Tensor, counts: torch.Tensor) -> dict[str, int]:
        """``apply_pulses`` for sparse counts: flat indices into the (in, out) matrix and their signed counts."""
        return _fire([(self, idx, counts)])[0]

    def _cells(self, idx: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Flat (in, out) indices → flat cells of the padded arrays, and whether the write may patch the
        cached read tensors (a write of a few percent of the cells) instead of having them rebuilt."""
        if self.padded_shape[1] != self.out_features:
            cells = idx // self.out_features * self.padded_shape[1] + idx % self.out_features
        else:
            cells = idx
        patch = (self._cache_key == self._state_key() and 16 * cells.numel() < self.plus.g.numel()
                 and not any(a.drifting for a in self._arrays()))
        return cells, patch

    def _written(self, idx: torch.Tensor, counts: torch.Tensor, cells: torch.Tensor, new: torch.Tensor | None,
                 patch: bool) -> torch.Tensor:
        """After the devices took the pulses: the read cache, the controller's belief, and (as a tensor, so that
        a whole network's numbers come back in one synchronisation) the pulse count and the pulse slots."""
        if patch:
            self._refresh_cells(cells, new)
        believed = self.believed.view(-1)
        believed.index_copy_(0, idx, believed.index_select(0, idx).add_(counts, alpha=self.dw_pulse)
                             .clamp_(-self.config.w_max, self.config.w_max))
        # Slots: per tile, the sum over its rows of the largest pulse count in the row; tiles in parallel.
        mag = counts.abs()
        per_row = torch.zeros(self.padded_shape[0] * self.n_col_tiles, device=mag.device, dtype=mag.dtype)
        rows = idx // self.out_features
        where = rows if self.n_col_tiles == 1 else rows * self.n_col_tiles + idx % self.out_features // self.tile_cols
        per_row.scatter_reduce_(0, where, mag, "amax")
        slots = per_row.reshape(self.n_row_tiles, self.tile_rows, self.n_col_tiles).sum(1).amax()
        return torch.stack([mag.sum() * len(self._arrays()), slots])

    def program_delta(self, dw: torch.Tensor, scale: float = 1.0) -> dict[str, int]:
        """Update by a requested weight change scale·dw: pulses through the device model (not an exact write).
        (``scale`` saves the caller a pass over the matrix, e.g. −learning rate times a gradient.)"""
        return program_deltas([self], [dw], scale)[0]

    def write_verify(self, w: torch.Tensor, tolerance: float = 0.01, max_iterations: int = 20) -> dict:
        """Program a weight matrix by write-and-verify: read every device (with read noise), pulse the ones
        further than ``tolerance``·w_max from their target towards it, repeat. All cells in parallel.
        With cycle-to-cycle noise a few devices may still be outside after ``max_iterations``: the count of
        devices outside at the last verify is reported as ``unconverged``."""
        w = torch.as_tensor(w, device=self.device, dtype=self.dtype)
        self._check_shape(w)
        if tolerance <= 0:
            raise ConfigError("tolerance", tolerance, "must be > 0")
        targets = self.target_conductances(w)
        tol_g = tolerance * self.config.w_max * self.k / len(targets)
        total, slots, iterations, pending = 0, 0, 0, 0
        for iterations in range(1, max_iterations + 1):  # noqa: B007 - the count is reported
            pending = 0
            for array, target in zip(self._arrays(), targets, strict=True):
                seen = array.read() if self.config.read_noise else array.conductance()
                off = ((seen - target).abs() > tol_g) & ~array.stuck
                n = torch.where(off, torch.round(array.pulses_for(target)), torch.zeros_like(target))
                # A cell that needs less than one pulse still gets one in the needed direction.
                n = torch.where(off & (n == 0), torch.sign(target - seen), n)
                array.program(n)
                mag = n.abs().reshape(self.n_row_tiles, self.tile_rows, self.n_col_tiles, self.tile_cols)
                total += int(mag.sum().item())
                slots += int(mag.amax(dim=3).sum(dim=1).amax().item())
                pending += int(off.sum().item())
            if pending == 0:
                break
        self.believed.copy_(w.clamp(-self.config.w_max, self.config.w_max))
        error = (self.weights() - self.believed).abs()
        return {"iterations": iterations, "pulses": total, "pulse_slots": slots,
                "unconverged": pending, "max_error": float(error.max()), "mean_error": float(error.mean())}

    # -- bookkeeping --------------------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        for a in self._arrays():
            a.advance(seconds)

    def set_time(self, t: float) -> None:
        """Follow the chip's clock (the engine's simulated time): conductances drift from when written."""
        for a in self._arrays():
            if t > a.time_s:
                a.advance(t - a.time_s)

    def footprint(self) -> dict[str, int]:
        """Plain numbers the engine needs to time this layer."""
        return {"tiles": self.tiles, "tile_rows": self.tile_rows, "tile_cols": self.tile_cols}


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
