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
import sys
from dataclasses import dataclass

import numpy as np
import torch

from neurosim.backend import fast_bfloat16, make_generator
from neurosim.config import ConfigError, setting
from neurosim.device import (
    DeviceArray,
    DeviceSpec,
    _program_pairs,
    flat_view,
    pair_arrays,
    pair_conductances,
)
from neurosim.random_streams import (
    NUMBA,
    PhiloxStream,
    _noisy_adc_sum_kernel,
    _numba_kernels,
    _run,
    flat_numpy,
    noisy_adc_sum,
    noisy_adc_sum_arrays,
)
from neurosim.random_streams import _factor as _epilogue_factor
from neurosim.read_scratch import EMPTY as _EMPTY
from neurosim.read_scratch import (
    MAX_BYTES,
    SCRATCH_LOCK,
    ForwardScratch,
    TransposedScratch,
    forward_bytes,
    transposed_bytes,
)
from neurosim.sampling import stochastic_round_sparse, stochastic_round_sparse_many


@dataclass(frozen=True)
class CrossbarConfig:
    """Array organisation and periphery of one crossbar (one layer)."""

    tile_rows: int = setting(256, "rows per tile (inputs summed in one analog partial sum)", ge=1)
    tile_cols: int = setting(256, "columns per tile", ge=1)
    mapping: str = setting("differential", "weight mapping: 'differential' pair G+ − G−, or 'reference' "
                           "(one device against a mid-window reference column)",
                           choices=("differential", "reference"))
    w_max: float = setting(1.0, "weight magnitude mapped onto the full conductance window", gt=0.0)
    input_max: float = setting(1.0, "input magnitude mapped onto the full read voltage (inputs are clipped to "
                               "±input_max, or [0, input_max] when unipolar, with or without dac_bits)", gt=0.0)
    input_range: str = setting("bipolar", "forward DAC range: 'bipolar' (±input_max, 2^(b−1) − 1 levels a sign) "
                               "or 'unipolar' ([0, input_max], 2^b − 1 levels above 0: for non-negative "
                               "activations; a negative input reads as 0). The transposed read stays bipolar",
                               choices=("bipolar", "unipolar"))
    read_voltage: float = setting(0.2, "read voltage at full-scale input (V)", gt=0.0)
    dac_bits: int | None = setting(None, "input DAC resolution in bits (none: no rounding, clipping still applies)",
                                   ge=1, le=24)
    adc_bits: int | None = setting(None, "output ADC resolution in bits (none: ideal, no saturation)", ge=1, le=24)
    adc_range: float = setting(12.0, "ADC full scale, in normalized units of Σ x̂·ŵ per tile column "
                               "(cf. aihwkit's out_bound = 12)", gt=0.0)
    read_noise: bool = setting(True, "apply the device card's read noise on every read")
    wire_resistance: str = setting("none", "'none'; 'nodal': exact solve of the resistive network per tile "
                                   "(small arrays: factorization cached until a write); 'approximate': batched "
                                   "conjugate-gradient solve in torch for large tiles (see docs/wires.md)",
                                   choices=("none", "nodal", "approximate"))
    r_wire: float = setting(1.0, "resistance of one wire segment between neighbouring cells (ohm)", ge=0.0)
    drift_tolerance: float = setting(1e-3, "largest relative error of a cell's drift factor the read cache may "
                                     "carry: drift is recomputed for every cell once ν_max·ln(1 + |Δt|/t0) from the "
                                     "clock its factors were computed for exceeds it (while the clock steps, for "
                                     "the middle of the next window), and a write of a few cells patches the cache "
                                     "meanwhile (0: exact, every move of the clock recomputes every cell)",
                                     ge=0.0, le=0.01)
    rounding: str = setting("stochastic", "pulse count of an update: 'stochastic' (floor + Bernoulli of the "
                            "remainder: an unbiased pulse train) or 'deterministic' (nearest count: an update "
                            "below half a pulse fires none)", choices=("deterministic", "stochastic"))
    backward_dac_bits: int | None = setting(None, "DAC bits of the transposed read (none: as dac_bits)",
                                            ge=1, le=24)
    backward_adc_bits: int | None = setting(None, "ADC bits of the transposed read (none: as adc_bits)",
                                            ge=1, le=24)
    noise_management: bool = setting(True, "transposed read scales each error vector by its max |value| "
                                     "to use the DAC range, and scales back digitally")
    noise_variance_precision: str = setting(
        "auto", "arithmetic of the read noise's variance product Σ x̂²·G² (float32 reads only; it sets the noise's "
        "standard deviation, not the signal): 'float32'; 'bfloat16' (operands and result rounded to bfloat16, "
        "the noise's standard deviation within 0.6 % of float32's, see docs/crossbar.md); 'auto': bfloat16 "
        "where the hardware multiplies it fast (CUDA; on CPUs with AVX512-BF16 or AMX for products of at least "
        "2^22 multiply-adds, batch × rows × columns), else float32",
        choices=("auto", "float32", "bfloat16"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """A signed converter of b bits has 2^(b−1) − 1 levels a sign: one bit leaves none (a step of 1/0), so
        signed converters need two bits; a unipolar DAC works from one (0 and full scale)."""
        signed = [("adc_bits", self.adc_bits), ("backward_dac_bits", self.backward_dac_bits),
                  ("backward_adc_bits", self.backward_adc_bits)]
        # The forward DAC is signed unless unipolar; the transposed read's is always signed, dac_bits by default.
        if self.input_range == "bipolar" or self.backward_dac_bits is None:
            signed.append(("dac_bits", self.dac_bits))
        for name, bits in signed:
            if bits == 1 and not isinstance(bits, bool):   # a wrong type is check()'s to report
                raise ConfigError(name, bits, "a signed (bipolar) converter needs at least 2 bits: "
                                  "2^(b−1) − 1 levels a sign")


# 'auto' on a CPU with fast bfloat16: bfloat16 for variance products of at least this many multiply-adds
# (batch × rows × padded columns), float32 below, where the bfloat16 product's fixed cost (~15 µs a product
# here) exceeds what it saves (docs/crossbar.md, "Read noise in bfloat16": the crossover measured here).
BFLOAT16_MIN_PRODUCT = 1 << 22
MIXED = f"mixed: bfloat16 from {BFLOAT16_MIN_PRODUCT} multiply-adds a product, else float32"   # as run files record it


def noise_variance_precision(config: CrossbarConfig, device: torch.device | str) -> str:
    """What ``config.noise_variance_precision`` resolves to on ``device``: 'float32', 'bfloat16', or ``MIXED``
    ('auto' on a CPU with fast bfloat16: each read takes bfloat16 when its variance product has at least
    ``BFLOAT16_MIN_PRODUCT`` multiply-adds, else float32; the string says so, as the run file records it).
    'auto' is bfloat16 on CUDA and float32 where the hardware has no fast bfloat16: a fixed property of the
    machine (and the rule one of the read's shape), so runs stay reproducible on it."""
    if config.noise_variance_precision != "auto":
        return config.noise_variance_precision
    if not fast_bfloat16(device):
        return "float32"
    return "bfloat16" if torch.device(device).type == "cuda" else MIXED


def _levels(bits: int | None) -> float | None:
    """The fused epilogue's clamp ±(2^(b−1) − 1) codes of a b-bit converter (None: an ideal one)."""
    return None if bits is None else float(2 ** (bits - 1) - 1)


def quantize(x: torch.Tensor, bits: int | None, limit: float, inplace: bool = False,
             unipolar: bool = False) -> torch.Tensor:
    """Clip to ±limit and round to a signed mid-tread grid of 2^(bits−1) − 1 positive levels; ``unipolar``:
    clip to [0, limit] and round to 2^bits − 1 levels above 0 (a b-bit code from 0 to full scale). With
    ``bits`` None, x is returned as it is (an ideal converter, no saturation: the DAC clips separately).

    The rounding passes gradients straight through (autograd sees the clipped identity), which is what a
    linearized model of a converter can use. ``inplace``: x is the caller's temporary and may be overwritten
    (outside autograd)."""
    if bits is None:
        return x
    if bits < (1 if unipolar else 2):
        raise ConfigError("bits", bits, "a signed converter needs at least 2 bits, a unipolar one 1")
    lower = 0.0 if unipolar else -limit
    step = limit / (2 ** bits - 1 if unipolar else 2 ** (bits - 1) - 1)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # One temporary at most: this runs on every read of every perturbation DGC evaluates.
        x = x.clamp_(lower, limit) if inplace else x.clamp(lower, limit)
        return x.div_(step).round_().mul_(step)
    x = x.clamp(lower, limit)
    return x + ((x / step).round() * step - x).detach()



def quantize_codes(x: torch.Tensor, levels: int) -> torch.Tensor:
    """A signed converter on values in units of its step: clip to ±levels and round to whole codes (half to
    even, as ``quantize``). In place outside autograd; under autograd the rounding passes gradients straight
    through. ``quantize(x, b, r)`` equals ``quantize_codes(x/step, 2^(b−1) − 1)·step`` up to the rounding of
    the scaled values (step = r/(2^(b−1) − 1))."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.clamp_(-levels, levels).round_()
    x = x.clamp(-levels, levels)
    return x + (x.round() - x).detach()

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
        # Read noise: the most numbers a step draws (one per tile column and sample of every read), from a
        # counter-based stream that fills them on every core and fuses them into the ADC (docs/random.md).
        self.read_stream = PhiloxStream(seed, self.device, name, "read_noise")
        # Stochastic rounding of updates: candidates and Bernoulli draws, every layer at every step.
        self.rounding_stream = PhiloxStream(seed, self.device, name, "rounding")
        # Cycle-to-cycle noise of training writes to the pair (program_deltas / fire): one stream for both
        # arrays, so that the fused CPU pass and the torch pass draw the same numbers (docs/random.md).
        self.pulse_stream = PhiloxStream(seed, self.device, name, "pulses")
        if self.minus is not None:
            self.plus.pulse_stream = self.minus.pulse_stream = self.pulse_stream
        span = spec.g_max - spec.g_min
        self.g_mid = 0.5 * (spec.g_max + spec.g_min)
        # Conductance per unit weight: a pair spans ±span, a single device ±span/2 around the reference.
        self.k = span / c.w_max if c.mapping == "differential" else span / (2 * c.w_max)
        # Nominal weight change of one update pulse, as the controller computes it from the card. A pair
        # moves both devices oppositely, one along its potentiation and one along its depression curve, in
        # either direction: w_max·(1/P_ltp + 1/P_ltd). A single device moves up by 2·w_max/P_ltp or down by
        # 2·w_max/P_ltd.
        if c.mapping == "differential":
            self.dw_up = self.dw_down = c.w_max * (1.0 / spec.pulses_ltp + 1.0 / spec.pulses_ltd)
        else:
            self.dw_up, self.dw_down = 2 * c.w_max / spec.pulses_ltp, 2 * c.w_max / spec.pulses_ltd
        self.dw_pulse = 0.5 * (self.dw_up + self.dw_down)
        self.seed = seed
        self.believed = torch.zeros(in_features, out_features, device=self.device, dtype=dtype)
        self.noise = True  # False: noise-free reads (linearized models, references); the card is unchanged
        # Arithmetic of forward reads; DGC measures in float64 so that small cost differences survive.
        self.read_dtype = dtype
        self._cache_key = None
        self._drift_anchor: float | None = None   # the clock the read cache's drift factors were computed for
        self._drift_rebuilt: float | None = None  # the clock at that recomputation (≤ the anchor)
        self._cache: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._cache_low: torch.Tensor | None = None   # ΣG² in bfloat16 for the variance product, when used
        self._precision = noise_variance_precision(self.config, self.device)
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

    def set_weights(self, w: torch.Tensor, snap: bool = True) -> None:
        """Place the weights directly: an idealized write (``write_verify`` is the physical one). Every device
        lands on the level nearest its target conductance that it can reach by pulses from g_min
        (``DeviceArray.nearest_level``), so a device of few states holds few values from the start; the
        controller believes it wrote the weights of those levels on a nominal device (its digital model knows the
        card, not each cell). ``snap=False`` places the analog targets themselves (clipped to ±w_max), values
        the devices may not be able to hold: for references and tests of the read path."""
        w = torch.as_tensor(w, device=self.device, dtype=self.dtype)
        self._check_shape(w)
        nominal = []
        for array, g in zip(self._arrays(), self.target_conductances(w), strict=True):
            if not snap:
                array.set_conductance(g, snap=False)
                continue
            levels = array.nearest_level(g)
            array.set_conductance(levels, snap=False)           # already levels: placed as they are
            nominal.append(self.spec.nearest_level(g) if array.varies else levels)
        w = w.clamp(-self.config.w_max, self.config.w_max)
        if snap:
            diff = nominal[0] - (nominal[1] if len(nominal) == 2 else self.g_mid)
            w = (diff / self.k)[: self.in_features, : self.out_features].clamp(-self.config.w_max, self.config.w_max)
        self.believed.copy_(w)  # in place: layers alias it

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

    _key_memo: tuple | None = None   # (what _state_key was computed from, the key)
    _slot_buffer: torch.Tensor | None = None   # _written's per-row pulse maxima

    def _state_key(self) -> tuple:
        """What the read cache depends on. A drifting array's clock counts as the clock the cache's drift factors
        were computed for (``_drift_shift``) while no cell's factor can differ by more than ``drift_tolerance``
        from its value now (``_drift_change``): between training steps the clock moves by microseconds to
        milliseconds, and recomputing every cell's drift after every step's write (a drifting array could not
        be patched) cost a quarter of a BP step.

        The key is a function of the noise switch, the anchor and each array's version and clock (the cards and
        the drift exponents are fixed): it is remembered for those, since every read and every write asks
        for it (fifteen times a BP step) and computing it took longer than a small tensor operation."""
        plus, minus = self.plus, self.minus
        raw = (self.noise, self._drift_anchor, self._drift_rebuilt, plus.version, plus.time_s,
               None if minus is None else minus.version, None if minus is None else minus.time_s)
        memo = self._key_memo
        if memo is not None and memo[0] == raw:
            return memo[1]
        keys = (plus.read_key(),) if minus is None else (plus.read_key(), minus.read_key())
        anchor = self._drift_anchor
        if anchor is not None and self._drift_change(anchor) <= self.config.drift_tolerance:
            keys = tuple([(k[0], anchor if k[1] is not None else None) for k in keys])
        key = (self.noise, *keys)
        self._key_memo = (raw, key)
        return key

    def _drift_change(self, anchor: float) -> float:
        """Bound on the relative error of any cell's drift factor (age/t0)^−ν in the read cache at the arrays'
        clock, for factors computed for the clock ``anchor`` at the clock ``_drift_rebuilt``: a factor differs
        from 1 only at an age ≥ t0, so between two clocks Δt apart, either way, a cell's age changes by at most
        the factor 1 + |Δt|/t0 and its factor by ν_max·ln(1 + |Δt|/t0). A cell written since the recomputation
        was patched in at factor 1 and is at most now − rebuilt old: off by at most ν_max·ln((now − rebuilt)/t0)
        once that exceeds t0 (never more than the first bound when the anchor is the recomputation's clock)."""
        worst = 0.0
        rebuilt = self._drift_rebuilt
        for a in (self.plus, self.minus):
            if a is None or not a.drifting:
                continue
            now, t0, nu = a.time_s, a.spec.drift_t0, a.max_drift_nu()
            if now != anchor:
                worst = max(worst, nu * math.log1p(abs(now - anchor) / t0))
            if rebuilt is not None and now - rebuilt > t0:
                worst = max(worst, nu * math.log((now - rebuilt) / t0))
        return worst

    def _drift_shift(self) -> float:
        """How many seconds past the clock a recomputation of the read cache computes its drift factors for.

        A factor moves by at most ν_max·ln(1 + |Δt|/t0) either side of the clock it was computed for
        (``_drift_change``), so factors computed for the middle of the next window of ``drift_tolerance``
        serve a window twice as long as factors computed at its start, with the same bound on every cell:
        while the clock advances in small steps (training: the previous window has just been passed), the
        recomputation takes the middle, and a drifting chip recomputes half as often. After a jump of the
        clock (inference a day later), on a first read, for another cause than the clock (a write too large
        to patch), at tolerance 0 or without drift: at the clock, exact.
        The shift is at most t0 (so a cell written meanwhile, at factor 1, stays within the bound)."""
        prev, tol = self._drift_anchor, self.config.drift_tolerance
        if prev is None or tol <= 0:
            return 0.0
        arrays = [a for a in self._arrays() if a.drifting]
        nu = max([a.max_drift_nu() for a in arrays], default=0.0)
        if nu <= 0:
            return 0.0
        t0 = min([a.spec.drift_t0 for a in arrays])
        width = t0 * math.expm1(tol / nu) if tol / nu < 700 else math.inf   # ν·ln(1 + width/t0) = tol
        if self._drift_change(prev) <= tol or not self.plus.time_s - prev <= 2 * width:
            return 0.0   # recomputed for another cause (a large write), or the clock jumped: at the clock
        return min(width, t0) * (1 - 1e-9)   # (a margin for rounding: the recomputation's clock passes the check)

    def _noisy_reads(self) -> bool:
        return bool(self.noise and self.config.read_noise and self.spec.read_noise > 0)

    def _read_values(self, g: list[torch.Tensor], out: tuple[torch.Tensor, torch.Tensor | None] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ŵ and ΣG² of the conductances ``g`` (one tensor per array), into ``out`` when given: the same
        arithmetic for a full rebuild and for a patch of a few cells, so the same bits."""
        w_hat = torch.sub(g[0], g[1] if len(g) == 2 else self.g_mid, out=None if out is None else out[0])
        w_hat.div_(self.k * self.config.w_max)
        gsq = None
        if self._noisy_reads():
            gsq = torch.mul(g[0], g[0], out=None if out is None else out[1])
            if len(g) == 2:
                gsq.addcmul_(g[1], g[1])
        return w_hat, gsq

    def _read_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalized weights ŵ = (G⁺ − G⁻)/(k·w_max) and, for read noise, Σ G², both padded; cached until a
        write or drift changes the conductances (a sparse write updates the cache in place). The padded rows
        of a ragged last row tile hold zeros: they carry no current (their inputs are 0) and no read uses
        them, so their conductances (and drift) are not computed. On the CPU in float32 the rebuild is one
        numba pass into the previous buffers (``_rebuild_fused``); the torch composition here is its oracle."""
        key = self._state_key()
        if key != self._cache_key:
            shift = self._drift_shift()
            if not (self._cache_kernel() and self._rebuild_fused(shift)):
                rows = self.in_features
                kw = {"device": self.device, "dtype": self.dtype}
                bufs = [torch.empty(self.padded_shape, **kw), torch.empty(self.padded_shape, **kw)
                        if self._noisy_reads() else None]
                for b in bufs:
                    if b is not None:
                        b[rows:].zero_()
                sl = slice(0, rows)
                g = [self.plus.conductance(sl, shift)] if self.minus is None else \
                    list(pair_conductances(self.plus, self.minus, sl, shift))
                self._read_values(g, tuple(b[sl] if b is not None else None for b in bufs))
                self._cache, self._cache_low, self._cache_np = tuple(bufs), None, None
            drifting = any([a.drifting for a in self._arrays()])
            self._drift_anchor = self.plus.time_s + shift if drifting else None
            self._drift_rebuilt = self.plus.time_s if drifting else None
            self._cache_key, self._solvers = self._state_key(), None
        if self.read_dtype != self.dtype:
            return tuple(t.to(self.read_dtype) if t is not None else None for t in self._cache)
        return self._cache

    _cache_np: tuple | None = None   # (data pointers, flat numpy views) of the cache, see _cache_views

    def _cache_views(self) -> tuple:
        """Flat numpy views (ŵ, ΣG² or None, ΣG² in bfloat16 as int16 bits or None) of the cache's tensors,
        remembered for their data pointers (a patch every step; a copied crossbar's memo fails the check)."""
        w, q = self._cache
        ql = self._cache_low
        ptrs = (w.data_ptr(), 0 if q is None else q.data_ptr(), 0 if ql is None else ql.data_ptr())
        memo = self._cache_np
        if memo is None or memo[0] != ptrs:
            memo = self._cache_np = (ptrs, (w.view(-1).numpy(), None if q is None else q.view(-1).numpy(),
                                            None if ql is None else ql.view(torch.int16).view(-1).numpy()))
        return memo[1]

    _cache_numba_ok: bool | None = None   # _cache_kernel's answer (device, dtype and numba do not change)

    def _cache_kernel(self) -> bool:
        """Whether the read cache is rebuilt and patched by the numba passes (neurosim._cache_numba): float32
        on the CPU with numba. Else (float64, CUDA, no numba) the torch composition."""
        ok = self._cache_numba_ok
        if ok is None:
            ok = self._cache_numba_ok = (self.device.type == "cpu" and self.dtype == torch.float32
                                         and _numba_kernels() is not None)
        return ok

    def _unshared(self, t: torch.Tensor | None) -> bool:
        """Whether the cache's tensor ``t`` is referenced only by the crossbar: no other Python reference (the
        cache's own, this call's argument and getrefcount's) and no view of its storage but the crossbar's own
        numpy view (``_cache_views``). A rebuild overwrites such a buffer in place; one that a caller still
        holds (DGC keeps read tensors for a measurement) is left to the caller, and the rebuild takes a fresh
        buffer, as before."""
        if t is None or sys.getrefcount(t) > 3:
            return False
        own = 1 if self._cache_np is not None and t.data_ptr() in self._cache_np[0] else 0
        try:
            return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2 + own
        except (AttributeError, RuntimeError):   # no such private API: never reuse
            return False

    def _rebuild_fused(self, shift: float = 0.0) -> bool:
        """``_read_tensors``' rebuild as one numba pass (parallel for large arrays): each cell's drifted
        conductances, ŵ, ΣG² and, where the variance product runs in bfloat16, its bfloat16 copy (made here
        once a read used it), into the previous buffers when nobody else holds them (padded rows zeroed at allocation
        only). Equal to the torch rebuild bit for bit without drift, within a few ulps with drift (ln and exp
        rounded otherwise; docs/crossbar.md). ``shift``: drift computed that many seconds past the arrays'
        clocks (``_drift_shift``). False (nothing done) where an array is not contiguous."""
        self._tile_memo = self._transposed_memo = ()   # their views would count as other holders of the buffers
        arrays = self._arrays()
        if not all([a.g.is_contiguous() and a.t_programmed.is_contiguous() for a in arrays]):
            return False
        noisy = self._noisy_reads()
        # the bfloat16 copy is kept up to date where reads use it: always under 'bfloat16'; under MIXED once a
        # read made it (a small layer read at small batches never does), else it is made lazily when needed
        low = noisy and (self._precision == "bfloat16" or (self._precision == MIXED and self._cache_low is not None))
        old = self._cache if self._cache is not None else (None, None)
        reuse_w = self._unshared(old[0])
        reuse_q = noisy and self._unshared(old[1])
        reuse_low = low and self._unshared(self._cache_low)
        old = None
        rows = self.in_features

        def fresh(dtype: torch.dtype) -> torch.Tensor:
            b = torch.empty(self.padded_shape, device=self.device, dtype=dtype)
            b[rows:].zero_()
            return b

        w = self._cache[0] if reuse_w else fresh(torch.float32)
        q = (self._cache[1] if reuse_q else fresh(torch.float32)) if noisy else None
        ql = (self._cache_low if reuse_low else fresh(torch.bfloat16)) if low else None
        self._cache, self._cache_low = (w, q), ql
        views = self._cache_views()
        state = [(a.numpy_views(), a.drifting) for a in arrays]
        g = tuple([v[0] for v, _ in state])
        t = tuple([v[1] if drifting else None for v, drifting in state])
        nu = tuple([v[2] if drifting else None for v, drifting in state])
        if len(arrays) == 1:
            g, t, nu = (g[0], None), (t[0], None), (nu[0], None)
        now = (arrays[0].time_s + shift, arrays[-1].time_s + shift)
        n = rows * self.padded_shape[1]
        _run(NUMBA.cache.rebuild, n, n, g, t, now, nu, self.spec.drift_t0, self.g_mid,
             self.k * self.config.w_max, views)
        return True

    def _patch_request(self) -> list | None:
        """For a write that patches the read cache (``_cells``): the request the CPU pulse pass of a pair takes
        to patch it in the same pass, [(ŵ, ΣG², bfloat16 bits, k·w_max), done] (neurosim.device._program_pairs);
        None where ``_refresh_cells`` does it (torch path, single devices)."""
        if self.minus is None or not self._cache_kernel() or self._cache[0].dtype != torch.float32:
            return None
        return [(*self._cache_views(), self.k * self.config.w_max), False]

    def _refresh_cells(self, cells: torch.Tensor, new: torch.Tensor | None = None) -> None:
        """After a write of a few cells: recompute the cached read tensors there only
        (the same arithmetic as a full rebuild, so the same bits). ``new``: the pair's new conductances of
        those cells, as ``program_pair`` returns them (or already split in two). One numba pass where
        ``_cache_kernel`` allows (bit for bit the torch operations below, tested)."""
        if self._cache_kernel() and cells.dtype == torch.long and cells.is_contiguous():
            if new is None:
                g = [a.g.reshape(-1).numpy() for a in self._arrays()]
            else:
                g = [t.contiguous().numpy() for t in (new if isinstance(new, tuple) else new.split(cells.numel()))]
            NUMBA.cache.patch(cells.numpy(), g[0], g[1] if len(g) == 2 else None, new is None, self.g_mid,
                               self.k * self.config.w_max, self._cache_views())
            self._cache_key, self._solvers = self._state_key(), None
            return
        if new is None:
            g = [a.g.view(-1).index_select(0, cells) for a in self._arrays()]
        else:
            g = new if isinstance(new, tuple) else new.split(cells.numel())
        values = self._read_values(list(g))
        for cached, fresh in zip(self._cache, values, strict=True):
            if cached is not None:
                flat_view(self, cached).index_copy_(0, cells, fresh)
        if self._cache_low is not None:
            self._cache_low.view(-1).index_copy_(0, cells, values[1].to(self._cache_low.dtype))
        self._cache_key, self._solvers = self._state_key(), None

    def dac(self, x: torch.Tensor, own: bool = False) -> torch.Tensor:
        """Inputs after the DAC, normalized: x̂ = x/input_max clipped to [−1, 1] ([0, 1] when unipolar) and
        rounded to ``dac_bits``: (B, in). The clipping is the driver's saturation, with or without rounding.
        ``own``: x is the caller's temporary, which the DAC may overwrite (one buffer fewer a read)."""
        c = self.config
        xn = x.to(self.read_dtype)
        if c.input_max != 1.0:
            xn = xn / c.input_max
        unipolar = c.input_range == "unipolar"
        temporary = (xn is not x or own) and not (torch.is_grad_enabled() and xn.requires_grad)
        if c.dac_bits is None:
            lower = 0.0 if unipolar else -1.0
            return xn.clamp_(lower, 1.0) if temporary else xn.clamp(lower, 1.0)
        return quantize(xn, c.dac_bits, 1.0, inplace=temporary, unipolar=unipolar)

    def _row_tiles(self, xn: torch.Tensor) -> torch.Tensor:
        pad = self.padded_shape[0] - self.in_features
        if pad:
            xn = torch.nn.functional.pad(xn, (0, pad))
        return xn.reshape(xn.shape[0], self.n_row_tiles, self.tile_rows).transpose(0, 1)

    def input_voltages(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs after the DAC, normalized (x̂ in [−1, 1], or [0, 1] unipolar), padded and split per row tile:
        (nr, B, R)."""
        return self._row_tiles(self.dac(x))

    def _tile_products(self, xn: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """Per row tile, xn·mat over that tile's rows: (nr, B, C). The rows of a ragged last tile past the
        last input are not computed (a 785-row layer in 256-row tiles would otherwise do 30% more work).
        ``xn`` (B, in), or already per row tile (nr, B, R) (the fused prologue's bfloat16 squares: the same
        products, which torch's bfloat16 bmm would otherwise copy the strided view into)."""
        R, nr = self.tile_rows, self.n_row_tiles
        full = self.in_features // R
        tiled = xn.dim() == 3
        B, C = xn.shape[1 if tiled else 0], mat.shape[1]
        head_m, tail_m = self._tile_views(mat, full)
        rows, ragged = self.in_features, self.in_features - full * R
        if not tiled and xn.shape[1] == rows and xn.is_contiguous():   # one strided view each, not three ops
            at = xn.storage_offset()
            head_x = xn.as_strided((full, B, R), (R, rows, 1), at)
            tail_x = xn.as_strided((B, ragged), (rows, 1), at + full * R) if ragged else None
        else:
            head_x = xn[:full] if tiled else xn[:, : full * R].reshape(B, full, R).transpose(0, 1)
            tail_x = (xn[full, :, :ragged] if tiled else xn[:, full * R:]) if ragged else None
        if full == nr:
            return torch.bmm(head_x, head_m)
        if torch.is_grad_enabled() and (xn.requires_grad or mat.requires_grad):  # out= has no autograd
            tail = torch.mm(tail_x, tail_m)[None]
            return torch.cat([torch.bmm(head_x, head_m), tail]) if full else tail
        dtype = xn.dtype if xn.dtype == mat.dtype else torch.result_type(xn, mat)
        out = torch.empty((nr, B, C), device=xn.device, dtype=dtype)
        if full:
            torch.bmm(head_x, head_m, out=out[:full])
        torch.mm(tail_x, tail_m, out=out[full])
        return out

    _tile_memo: tuple = ()   # (matrix, its per-tile views) of each read-cache tensor read: see _tile_views

    def _tile_views(self, mat: torch.Tensor, full: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``mat`` (padded rows, C) as (full, R, C) for the full row tiles (all nr of them when none is
        ragged) and its ragged tile's real rows (None without one). Remembered for the read cache's tensors
        (ŵ, ΣG², its bfloat16 copy), which every read multiplies; a rebuild forgets them before it asks
        whether it may reuse its buffers."""
        for entry in self._tile_memo:
            if entry[0] is mat:
                return entry[1], entry[2]
        R, C = self.tile_rows, mat.shape[1]
        views = (mat[: full * R].reshape(full, R, C), None if full == self.n_row_tiles else
                 mat[full * R: self.in_features])
        self._tile_memo = self._remembered(self._tile_memo, (mat, *views))
        return views

    def _remembered(self, memo: tuple, entry: tuple) -> tuple:
        """``memo`` (entries: a tensor, then views of it) with ``entry`` added where its tensor is one of the
        read cache's (outside autograd), the entries of tensors no longer in the cache dropped; else as it was
        (a view of any other matrix is not worth keeping)."""
        mat = entry[0]
        cache = [t for t in (*(self._cache or ()), self._cache_low) if t is not None]
        if (torch.is_grad_enabled() and mat.requires_grad) or not any([mat is t for t in cache]):
            return memo
        return (*[e for e in memo if any([e[0] is t for t in cache])], entry)

    def _clean_partials(self, xn: torch.Tensor, w: torch.Tensor | None = None, w_hat: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """``partial_sums`` without read noise: a fresh tensor (nr, B, padded cols). ``w_hat``: the read
        cache's ŵ when the caller has it (a read asks for the cache once)."""
        c = self.config
        if w_hat is None:
            w_hat = self._read_tensors()[0]
        if w is not None:
            w_hat = self._pad(w / c.w_max) if w.shape != w_hat.shape else w / c.w_max
        if c.wire_resistance != "none" and w is None:
            return self._nodal_partials(self._row_tiles(xn) * c.read_voltage) / (c.read_voltage * self.k * c.w_max)
        return self._tile_products(xn, w_hat)

    def partial_sums(self, xn: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Analog column sums of every row tile before the ADCs, read noise included: (nr, B, padded cols),
        in normalized units, from the DAC outputs xn (B, in). ``w`` (in, out) replaces the stored weights, for
        autograd (linearized DGC). With wire resistance, the read noise's variance is that of the ideal cell
        voltages (Σ x̂²·σ²·G²), as without wires."""
        part = self._clean_partials(xn, w)
        var = self._variances(xn, w)
        return part if var is None else self.add_read_noise(part, var, nonnegative=True)

    def _variances(self, xn: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor | None:
        """Σ x̂²·G² per row tile and column (the read noise's variance in units of σ²), or None without noise."""
        gsq = self._variance_operand(xn.shape[0])
        return None if gsq is None else self._tile_products(self._squares(xn, gsq.dtype), gsq)

    def _low_precision(self, batch: int | None) -> bool:
        """Whether a read of ``batch`` samples computes its variance product in bfloat16 (None: a large batch)."""
        if self._precision != MIXED:
            return self._precision == "bfloat16"
        return batch is None or batch * self.in_features * self.padded_shape[1] >= BFLOAT16_MIN_PRODUCT

    def _variance_operand(self, batch: int | None = None, gsq: torch.Tensor | None = None) -> torch.Tensor | None:
        """ΣG² for the read noise's variance product of a read of ``batch`` samples, in the precision
        ``noise_variance_precision`` chose for it (None without read noise). bfloat16 only for float32 reads:
        DGC's float64 measurements keep theirs. ``gsq``: the read cache's ΣG² when the caller has it."""
        if gsq is None:
            gsq = self._read_tensors()[1]
        if gsq is None or gsq.dtype != torch.float32 or not self._low_precision(batch):
            return gsq
        if self._cache_low is None:
            self._cache_low = gsq.to(torch.bfloat16)
        return self._cache_low

    @staticmethod
    def _squares(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x² in ``dtype``: squared in x's precision, rounded once (one pass)."""
        if dtype == x.dtype:
            return x * x
        return torch.mul(x, x, out=torch.empty(x.shape, dtype=dtype, device=x.device))

    def add_read_noise(self, part: torch.Tensor, var: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
        """Read noise of every cell summed per column: Gaussian of variance Σ V̂²·(σ·G)² (``var`` = Σ V̂²·G²),
        drawn at the output -- the same distribution as one draw per cell, for one matmul instead of B·R·C
        draws. Normalized units, as the partial sums. Works in place on both buffers, which must be the
        caller's own temporaries; ``nonnegative``: var is a plain sum of squares (no clamp needed)."""
        if var.dtype != part.dtype:   # a bfloat16 variance product: the square root in the read's precision
            var = var.to(part.dtype)
        if not nonnegative:
            var = var.clamp_(min=0)
        return self.add_read_noise_std(part, var.sqrt_())

    def add_read_noise_std(self, part: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``add_read_noise`` given √var (broadcastable to ``part``: reads that share their variances, such as
        DGC's replicated lower reads, take one square root for all). In place on ``part``."""
        noise = self.read_stream.normal(part.shape, dtype=part.dtype)
        return part.addcmul_(std, noise, value=self._noise_scale())

    def _noise_scale(self) -> float:
        """σ of the card in the partial sums' normalized units."""
        return self.spec.read_noise / (self.k * self.config.w_max)

    def _noisy_convert(self, part: torch.Tensor, var: torch.Tensor | None, step: float, bits: int | None,
                       scale: torch.Tensor | float | None = None, keep: int | None = None) -> torch.Tensor:
        """Read noise (when ``var`` is given), ADC and the sum over tiles: ``add_read_noise`` then ``convert``,
        in one fused pass where it applies (float32 partial sums outside autograd, on the CPU kernel of the
        read stream; docs/random.md). Both draw the same numbers from the stream, so they give the same
        result up to the rounding of a square root (one ulp of the noise)."""
        if var is None:
            return self.convert(part, step, bits, scale, keep)
        keep = self.out_features if keep is None else keep
        fused = (self.read_stream.kernel == "numba" and part.dtype == torch.float32 and part.is_contiguous()
                 and not (torch.is_grad_enabled() and part.requires_grad))
        if not fused:
            return self.convert(self.add_read_noise(part, var, nonnegative=True), step, bits, scale, keep)
        levels = _levels(bits)
        if not (var.dtype in (torch.float32, torch.bfloat16) and var.shape == part.shape):   # (else its errors)
            factor = self._factor(step, scale)
            return noisy_adc_sum(part, var, self._noise_scale(), levels, keep, self.read_stream,
                                 None if isinstance(factor, float) and factor == 1.0 else factor)
        return _noisy_adc_sum_kernel(part, var, self._noise_scale(), levels, keep, self.read_stream,
                                     self._kernel_scale(step, scale, part.shape[1]))

    def _kernel_scale(self, step: float, scale: torch.Tensor | float | None, batch: int) -> np.ndarray | None:
        """The fused epilogue's factor step·scale (the scaling in the same pass: one operation less) as the
        kernel takes it, None where it is 1."""
        factor = self._factor(step, scale)
        return None if isinstance(factor, float) and factor == 1.0 else _epilogue_factor(factor, batch, self.device)

    def adc_step(self, bits: int | None) -> float:
        """One ADC step in normalized units (1.0 for an ideal converter): reads compute their partial sums in
        these units, by scaling their few inputs instead of the many partial sums."""
        if bits is None:
            return 1.0
        return self.config.adc_range / (2 ** (bits - 1) - 1)

    def convert(self, part: torch.Tensor, step: float, bits: int | None, scale: torch.Tensor | float | None = None,
                keep: int | None = None) -> torch.Tensor:
        """ADC of every tile column, digital sum over tiles, back to weight × input units: (B, keep). ``part``:
        partial sums (tiles, B, ·) in units of ``step``, the ADC step of ``bits`` (None: an ideal converter,
        step 1): each converter rounds to a whole code and saturates at ±(2^(b−1) − 1) codes, the codes add
        up digitally, and one multiplication by step·``scale`` (default input_max·w_max) gives the result.
        Consumes ``part`` (the partial sums are a temporary of the read)."""
        if bits is not None:
            part = quantize_codes(part, 2 ** (bits - 1) - 1)
        y = part[0] if part.shape[0] == 1 else part.sum(0)
        keep = self.out_features if keep is None else keep
        if y.shape[1] != keep:
            y = y[:, :keep]
        return self._scaled(y, step, scale)

    def _scaled(self, y: torch.Tensor, step: float, scale: torch.Tensor | float | None) -> torch.Tensor:
        """Summed codes → weight × input units: one multiplication by step·scale (default input_max·w_max)."""
        factor = self._factor(step, scale)
        if isinstance(factor, float) and factor == 1.0:
            return y  # nothing to scale: the digital sum itself
        return y * factor

    def _factor(self, step: float, scale: torch.Tensor | float | None) -> torch.Tensor | float:
        """step·scale (default input_max·w_max): a float, or a float32 tensor (B, 1) of one per sample."""
        if isinstance(scale, torch.Tensor) and step == 1.0:
            return scale   # 1.0·scale is scale: the multiplication is skipped, not the value changed
        c = self.config
        return step * (c.input_max * c.w_max if scale is None else scale)

    def read(self, x: torch.Tensor, w: torch.Tensor | None = None, own: bool = False,
             extra: float | None = None) -> torch.Tensor:
        """Forward read y ≈ x·W of a batch (B, in) → (B, out), through DAC, tiles, read noise and ADCs.

        The partial sums are computed in ADC steps (the DAC outputs divided by the step: B·in numbers instead
        of tiles·B·out), so the converters only clip and round. ``own``: x is the caller's temporary (see
        ``dac``). ``extra``: x holds the first in − 1 rows' inputs and the last row reads this value for every
        sample (a layer's bias row): the same read as of x with that column appended, without building it. On
        the CPU the DAC, the division by the step and the squares of the variance product are one fused pass
        (``_read_kernel``), equal bit for bit to the torch operations it replaces."""
        c = self.config
        w_hat, gsq = self._read_tensors()
        gsq = self._variance_operand(x.shape[0], gsq)
        step = self.adc_step(c.adc_bits)
        if gsq is not None and w is None and self._scratch_applies(x) and \
                (extra is None or x.shape[1] == self.in_features - 1):
            y = self._scratch_read(x, w_hat, gsq, step, extra)
            if y is not None:
                return y
        xn, sq = self._read_operands(x, gsq, own, extra, step)
        var = None if gsq is None else self._tile_products(sq, gsq)
        return self._noisy_convert(self._clean_partials(xn, w, w_hat), var, step, c.adc_bits)

    def _read_operands(self, x: torch.Tensor, gsq: torch.Tensor | None, own: bool = False,
                       extra: float | None = None, step: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The forward read's product operands: x̂ in ADC steps (B, in) and x̂² in gsq's dtype (None without
        gsq), by the fused kernel where it applies, else by the torch operations (its oracle). ``extra``: see
        ``read``; ``step``: the ADC step, when the caller has it."""
        c = self.config
        if step is None:
            step = self.adc_step(c.adc_bits)
        kernel = self._read_kernel(x)
        if kernel is None or (extra is not None and x.shape[1] != self.in_features - 1):
            if extra is not None:   # (a wrong width fails in the products, as it would without ``extra``)
                x, own = torch.cat([x, torch.full((x.shape[0], 1), extra, dtype=x.dtype, device=x.device)], 1), True
            xn = self.dac(x, own)
            if step != 1.0:
                xn = xn * (1.0 / step) if torch.is_grad_enabled() and xn.requires_grad else xn.mul_(1.0 / step)
            return xn, None if gsq is None else self._squares(xn, gsq.dtype)
        xc = x.contiguous()
        B = xc.shape[0]
        if extra is not None:
            xn = torch.empty((B, self.in_features), dtype=xc.dtype)
        else:
            xn = xc if own or xc is not x else torch.empty_like(xc)   # the caller's temporary, or our copy
        tiled = gsq is not None and gsq.dtype == torch.bfloat16   # bfloat16 squares come per row tile
        shape = (self.n_row_tiles, B, self.tile_rows) if tiled else tuple(xn.shape)
        sq, mode, sq32, sq16 = self._squares_buffer(shape, gsq, flat=True)
        kernel.forward(flat_numpy(xc), flat_numpy(xn), sq32, sq16, mode, *self._prologue_settings()[0], B,
                       self.tile_rows, np.float32(0.0 if extra is None else extra), extra is not None)
        return xn, sq

    _scratch: dict | None = None   # the fused CPU reads' temporaries by shape (neurosim.read_scratch)

    def _scratch_applies(self, x: torch.Tensor) -> bool:
        """Whether a read of ``x`` runs fused on the CPU with reused temporaries: the prologue kernel applies
        (``_read_kernel``), the epilogue is the read stream's numba kernel, no wires and at least one sample.
        (The read itself still declines where another thread's read holds the temporaries' lock.)"""
        return (self._read_kernel(x) is not None and x.shape[0] > 0 and self.config.wire_resistance == "none"
                and self.read_stream.kernel == "numba")

    def _scratch_for(self, key: tuple, make, nbytes: int):
        """The temporaries of ``key`` (made by ``make`` the first time, and again for a copied crossbar, whose
        copied numpy views would no longer alias its copied buffers); None where they would take more than
        ``read_scratch.MAX_BYTES`` (``nbytes``)."""
        if nbytes > MAX_BYTES:
            return None
        table = self._scratch
        if table is None:
            table = self._scratch = {}
        scratch = table.get(key)
        if scratch is None or scratch.owner != id(self):
            if len(table) >= 8:   # (a few batch sizes at a time: training, evaluation, a last short batch)
                table.clear()
            scratch = table[key] = make()
        return scratch

    def _scratch_read(self, x: torch.Tensor, w_hat: torch.Tensor, gsq: torch.Tensor, step: float,
                      extra: float | None) -> torch.Tensor | None:
        """``read``'s fused CPU path with reused temporaries (neurosim.read_scratch): the prologue, the variance
        and signal products per row tile, the noisy ADC epilogue into a fresh output; the same operations on
        the same layouts as with fresh temporaries, so the same bits. None (nothing done) while another
        thread's read holds the temporaries."""
        if not SCRATCH_LOCK.acquire(blocking=False):
            return None
        try:
            low = gsq.dtype == torch.bfloat16
            B, R, rows = x.shape[0], self.tile_rows, self.in_features
            nr, cols = self.n_row_tiles, self.padded_shape[1]
            s = self._scratch_for(("read", B, low), lambda: ForwardScratch(id(self), B, rows, R, nr, cols, low),
                                  forward_bytes(B, rows, R, nr, cols, low))
            if s is None:
                return None
            NUMBA.read.forward(flat_numpy(x.contiguous()), s.xn, s.sq32, s.sq16, s.mode, *self._prologue_settings()[0],
                               B, R, np.float32(0.0 if extra is None else extra), extra is not None)
            full = rows // R
            head, tail = self._tile_views(gsq, full)
            if s.var_head is not None:
                torch.bmm(s.sq_head, head, out=s.var_head)
            if s.var_tail is not None:
                torch.mm(s.sq_tail, tail, out=s.var_tail)
            head, tail = self._tile_views(w_hat, full)
            if s.part_head is not None:
                torch.bmm(s.x_head, head, out=s.part_head)
            if s.part_tail is not None:
                torch.mm(s.x_tail, tail, out=s.part_tail)
            return self._scratch_epilogue(s.part, s.var, step, self.config.adc_bits, None, self.out_features)
        finally:
            SCRATCH_LOCK.release()

    def _scratch_epilogue(self, part: np.ndarray, var: np.ndarray, step: float, bits: int | None,
                          scale: np.ndarray | None, keep: int) -> torch.Tensor:
        """``_noisy_convert``'s fused epilogue on the temporaries' numpy views; ``scale``: a per-sample factor
        (the transposed read's, step included) or None (step·input_max·w_max)."""
        if scale is None:
            scale = self._kernel_scale(step, None, part.shape[1])
        return noisy_adc_sum_arrays(part, var, self._noise_scale(), _levels(bits), keep, self.read_stream, scale)

    _transposed_memo: tuple = ()   # (matrix, its column-tile view, that view's tiles) of the read cache's tensors

    def _transposed_views(self, mat: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The read cache's ``mat`` (padded rows, cols) as the transposed read multiplies it: its real rows in
        column tiles (nc, C, rows), a view, and that view's tiles; remembered for the cache's tensors (which a
        rebuild forgets, as ``_tile_views``)."""
        for entry in self._transposed_memo:
            if entry[0] is mat:
                return entry[1], entry[2]
        rows = self.in_features
        view = mat[:rows].reshape(rows, self.n_col_tiles, self.tile_cols).permute(1, 2, 0)
        tiles = list(view.unbind(0))
        self._transposed_memo = self._remembered(self._transposed_memo, (mat, view, tiles))
        return view, tiles

    def _scratch_read_transposed(self, d: torch.Tensor, w_hat: torch.Tensor, gsq: torch.Tensor,
                                 adc_bits: int | None) -> torch.Tensor | None:
        """``read_transposed``'s fused CPU path with reused temporaries: the prologue (scale, DAC, column-tile
        layout, squares), the products (the bfloat16 variance one column tile at a time), the epilogue. None
        (nothing done) while another thread's read holds the temporaries."""
        if not SCRATCH_LOCK.acquire(blocking=False):
            return None
        try:
            low = gsq.dtype == torch.bfloat16
            B, rows, nc = d.shape[0], self.in_features, self.n_col_tiles
            C = self.tile_cols
            s = self._scratch_for(("transposed", B, low), lambda: TransposedScratch(id(self), B, rows, C, nc, low),
                                  transposed_bytes(B, rows, C, nc, low))
            if s is None:
                return None
            NUMBA.read.transposed(d.contiguous().numpy(), s.dt_np, s.sq32, s.sq16, s.mode, s.factor_np,
                                  *self._prologue_settings()[1])
            torch.bmm(s.dt, self._transposed_views(w_hat)[0], out=s.part)
            g2, g2_tiles = self._transposed_views(gsq)
            if low:
                for t in range(nc):
                    torch.mm(s.sq_tiles[t], g2_tiles[t], out=s.var_tiles[t])
            else:
                torch.bmm(s.sq, g2, out=s.var)
            return self._scratch_epilogue(s.part_np, s.var_np, 1.0, adc_bits, s.factor_np, rows)
        finally:
            SCRATCH_LOCK.release()

    _settings_memo: tuple | None = None   # (config, settings), see _prologue_settings

    def _prologue_settings(self) -> tuple[tuple, tuple]:
        """The read prologues' settings from the config, as the float32 scalars torch computes with (numba
        would take a float as float64): (forward's, transposed's), kept while the config is the same object
        (every read passes them; a config is replaced, never changed, e.g. by ``noise_free``)."""
        c = self.config
        memo = self._settings_memo
        if memo is None or memo[0] is not c:
            f32 = np.float32
            unipolar = c.input_range == "unipolar"
            dac_step = 1.0 / (2 ** c.dac_bits - 1 if unipolar else 2 ** (c.dac_bits - 1) - 1) if c.dac_bits else 1.0
            forward = (c.input_max != 1.0, f32(c.input_max), f32(0.0 if unipolar else -1.0), f32(dac_step),
                       c.dac_bits is not None, f32(1.0 / self.adc_step(c.adc_bits)))
            bits = c.backward_dac_bits or c.dac_bits
            step = self.adc_step(c.backward_adc_bits or c.adc_bits)
            back_step = 1.0 / (2 ** (bits - 1) - 1) if bits is not None else 1.0
            transposed = (c.noise_management, f32(c.input_max), f32(back_step), bits is not None, f32(1.0 / step),
                          f32(step), f32(c.w_max))
            memo = self._settings_memo = (c, (forward, transposed))
        return memo[1]

    def _read_kernel(self, x: torch.Tensor):
        """The fused read prologues (neurosim._read_numba) where they apply: float32 reads of float32 inputs
        (B, n) on the CPU outside autograd, numba present; else None (the torch operations: other dtypes and
        devices, autograd, and the kernels' test oracle)."""
        if (self.device.type != "cpu" or self.read_dtype != torch.float32 or self.dtype != torch.float32
                or x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu"
                or (torch.is_grad_enabled() and x.requires_grad) or _numba_kernels() is None):
            return None
        return NUMBA.read

    @staticmethod
    def _squares_buffer(shape: tuple[int, ...], gsq: torch.Tensor | None, flat: bool):
        """The squares' tensor of a prologue, in gsq's dtype (None without read noise), and the kernel's view
        of it: (tensor, mode, float32 array, bfloat16 bits array), the unused array empty; ``flat``: the
        arrays 1-d (the forward kernel's), else of the tensor's shape."""
        kernels = NUMBA.read
        empty32, empty16 = _EMPTY[1 if flat else len(shape)]
        if gsq is None:
            return None, kernels.NO_SQUARES, empty32, empty16
        sq = torch.empty(shape, dtype=gsq.dtype)
        seen = sq.view(-1) if flat else sq
        if gsq.dtype == torch.bfloat16:
            return sq, kernels.SQUARES_BF16, empty32, seen.view(torch.int16).numpy().view(np.uint16)
        return sq, kernels.SQUARES_F32, seen.numpy(), empty16

    def read_transposed(self, d: torch.Tensor) -> torch.Tensor:
        """Transposed read d·Wᵀ of a batch (B, out) → (B, in): columns driven, rows sensed (BP's backward path).

        With noise management each error vector is divided by its largest magnitude before the DAC and
        multiplied back after the ADC, as chips do to keep small errors above the converters' resolution.
        The DAC is bipolar whatever ``input_range`` says (errors are signed) and saturates at full scale.
        As in ``read``, the partial sums are computed in ADC steps. On the CPU the scale, the DAC, the
        division by the step, the tile layout and the squares are one fused pass (bit for bit the same)."""
        c = self.config
        w_hat, gsq = self._read_tensors()
        gsq = self._variance_operand(d.shape[0], gsq)
        adc_bits = c.backward_adc_bits or c.adc_bits
        if gsq is not None and self._scratch_applies(d):
            y = self._scratch_read_transposed(d, w_hat, gsq, adc_bits)
            if y is not None:
                return y
        nc = self.n_col_tiles
        dt, sq, scale, step_scaled = self._transposed_operands(d, gsq)
        unit = c.read_voltage * self.k * c.w_max
        rows = self.in_features  # padded rows carry no current: no converter or noise draw is spent on them
        if c.wire_resistance != "none":
            part = self._nodal_partials(dt * c.read_voltage, transposed=True)[:, :, :rows] / unit
        else:
            part = torch.bmm(dt, self._transposed_views(w_hat)[0])                 # (nc, B, rows)
        var = None
        if gsq is not None:
            g2, g2_tiles = self._transposed_views(gsq)                              # (nc, C, rows), a view
            if gsq.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and sq.requires_grad):
                # torch's bfloat16 bmm copies a permuted operand on every call (~100 µs for 785 × 256); its mm
                # takes a transposed matrix as it is: one product per column tile.
                var = torch.empty((nc, sq.shape[1], rows), dtype=sq.dtype, device=sq.device)
                for t in range(nc):
                    torch.mm(sq[t], g2_tiles[t], out=var[t])
            else:
                var = torch.bmm(sq, g2)
        # Row partial sums of one column tile pass one ADC, then add digitally across column tiles.
        return self._noisy_convert(part, var, step_scaled, adc_bits, scale, rows)

    def _transposed_operands(self, d: torch.Tensor, gsq: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
        """The transposed read's operands: the errors after scale, DAC and division by the ADC step in the
        column-tile layout (nc, B, C), their squares in gsq's dtype (None without gsq), and the digital scale
        back after the ADC as (B, 1) scale and a step it is still to be multiplied by (1.0 from the kernel,
        which includes it); by the fused kernel where it applies, else by the torch operations (its oracle)."""
        c = self.config
        dac_bits = c.backward_dac_bits or c.dac_bits
        step = self.adc_step(c.backward_adc_bits or c.adc_bits)
        nc, C = self.n_col_tiles, self.tile_cols
        d = d.to(self.dtype)
        kernel = self._read_kernel(d)
        if kernel is not None:
            B = d.shape[0]
            dt = torch.empty((nc, B, C), dtype=torch.float32)
            sq, mode, sq32, sq16 = self._squares_buffer((nc, B, C), gsq, flat=False)
            factor = torch.empty((B, 1), dtype=torch.float32)
            kernel.transposed(d.contiguous().numpy(), dt.numpy(), sq32, sq16, mode, flat_numpy(factor),
                              *self._prologue_settings()[1])
            return dt, sq, factor, 1.0
        scale = d.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30) if c.noise_management else \
            torch.full((d.shape[0], 1), c.input_max, device=d.device, dtype=d.dtype)
        dn = d / scale
        dn = quantize(dn, dac_bits, 1.0, inplace=True) if dac_bits is not None else dn.clamp_(-1.0, 1.0)
        if step != 1.0:
            dn.mul_(1.0 / step)
        pad = self.padded_shape[1] - self.out_features
        if pad:
            dn = torch.nn.functional.pad(dn, (0, pad))
        dt = dn.reshape(dn.shape[0], nc, C).transpose(0, 1)   # (nc, B, C)
        sq = None if gsq is None else self._squares(dt, gsq.dtype)
        return dt, sq, scale.mul_(c.w_max), step

    def _tile(self, rr: int, cc: int) -> torch.Tensor:
        """Conductances of tile (rr, cc) as wired: (R, C), or (R, C, 2) for pairs (G⁺, G⁻ side by side)."""
        R, C = self.tile_rows, self.tile_cols
        g = [a.conductance()[rr * R:(rr + 1) * R, cc * C:(cc + 1) * C] for a in self._arrays()]
        return torch.stack(g, -1) if len(g) == 2 else g[0]

    def _tile_solver(self, rr: int, cc: int):
        """The exact solver of tile (rr, cc), factorized once per state of the conductances."""
        from neurosim.wires import NodalSolver

        if self._solvers is None:
            self._solvers = {}
        if (rr, cc) not in self._solvers:
            reference = None if self.minus is not None else self.g_mid
            r = self.config.r_wire
            self._solvers[(rr, cc)] = NodalSolver(self._tile(rr, cc), r, r, reference)
        return self._solvers[(rr, cc)]

    def _nodal_partials(self, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Per-tile currents with wire resistance (exact nodal solve or its approximation), as (tiles along the
        summed axis, B, ·), from drive voltages v (tiles along the summed axis, B, R or C).

        Each tile is one network (docs/wires.md, "Layouts"): a pair's G⁺ and G⁻ in adjacent columns sharing the
        row wires, their currents subtracted before the ADC; or the single devices and the reference column at
        mid-window as the tile's last column. Padded rows and columns of a ragged tile are cells at the
        conductance they hold (mid-window for weight 0), which load the wires; padded rows are driven at 0 V."""
        from neurosim.wires import _approx_tiles, _Layout

        R, C = self.tile_rows, self.tile_cols
        nr, nc = self.n_row_tiles, self.n_col_tiles
        B = v.shape[1]
        if self.config.wire_resistance == "approximate":
            r = self.config.r_wire
            arrays = [a.conductance().reshape(nr, R, nc, C).transpose(1, 2).reshape(nr * nc, R, C)
                      for a in self._arrays()]
            G = torch.stack(arrays, -1) if len(arrays) == 2 else arrays[0]
            layout = _Layout(tuple(G.shape[1:]), None if self.minus is not None else self.g_mid)
            if transposed:                                          # tile (rr, cc) is driven by v[cc]
                drive = v[None].expand(nr, nc, B, C).reshape(nr * nc, B, C)
                out = _approx_tiles(G, drive, r, r, layout, transposed=True).reshape(nr, nc, B, R)
                return out.permute(1, 2, 0, 3).reshape(nc, B, nr * R)
            drive = v[:, None].expand(nr, nc, B, R).reshape(nr * nc, B, R)
            out = _approx_tiles(G, drive, r, r, layout).reshape(nr, nc, B, C)
            return out.permute(0, 2, 1, 3).reshape(nr, B, nc * C)
        outs = []
        n_sum, n_other = (nc, nr) if transposed else (nr, nc)
        for s in range(n_sum):
            pieces = []
            for o in range(n_other):
                solver = self._tile_solver(*((o, s) if transposed else (s, o)))
                pieces.append(solver.read_transposed(v[s]) if transposed else solver.read(v[s]))
            outs.append(torch.cat(pieces, dim=1))
        return torch.stack(outs)

    # -- perturbed reads (DGC) -----------------------------------------------------------------------------
    def read_perturbed(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, delta_plus: torch.Tensor,
                       delta_minus: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (P, B, out) of P reads of x (B, in), read p with the device(s) of weight (rows[p], cols[p])
        changed by delta_plus[p] siemens (G⁺, or the single device of the reference mapping) and
        delta_minus[p] (G⁻), and the rest of the chip as it is: the same DAC, wires, read noise, ADCs, digital
        sum and scaling as ``read``, batched. Each read draws its own read noise, so the batch equals P separate
        reads in distribution (and, without noise, in value, to float tolerance; with the approximate wire
        solve, to its tolerance). The changes apply to the conductances as read now (drift included).

        What changes is computed, not re-read: without wires only column cols[p] of its row tile changes, by
        x̂·Δŵ; with wires the whole tile's outputs change, by an exact rank-1 (rank-2 for a pair) update of
        the tile's network (docs/wires.md, "Perturbed reads"). Not differentiable (a measurement)."""
        with torch.no_grad():
            return self._read_perturbed(x, rows, cols, delta_plus, delta_minus)

    def _perturbations(self, rows, cols, delta_plus, delta_minus):
        """Checked (rows, cols, deltas per device) of a perturbed read."""
        dev = self.device
        rows, cols = (torch.as_tensor(v, device=dev).reshape(-1) for v in (rows, cols))
        for name, idx, n in (("rows", rows, self.in_features), ("cols", cols, self.out_features)):
            if idx.numel() and (idx.dtype.is_floating_point or idx.dtype == torch.bool):
                raise ConfigError(name, str(idx.dtype), "must be integer indices")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ConfigError(name, "entries outside the layer", f"must be indices in [0, {n})")
        if rows.numel() != cols.numel():
            raise ConfigError("cols", f"{cols.numel()} entries", f"must match rows ({rows.numel()} entries)")
        rows, cols = rows.long(), cols.long()
        if self.minus is None and delta_minus is not None:
            raise ConfigError("delta_minus", "given", "the reference mapping has one device per weight")
        deltas = [delta_plus] if self.minus is None else [delta_plus, 0.0 if delta_minus is None else delta_minus]
        out = []
        for name, d, array in zip(("delta_plus", "delta_minus"), deltas, self._arrays(), strict=False):
            d = torch.as_tensor(d, device=dev, dtype=self.dtype)
            d = d.expand(rows.numel()) if d.ndim == 0 else d.reshape(-1)
            if d.numel() != rows.numel():
                raise ConfigError(name, f"{d.numel()} entries", f"must match rows ({rows.numel()} entries)")
            if not bool(torch.isfinite(d).all()):
                raise ConfigError(name, "non-finite entries", "conductance changes must be finite")
            new = array.conductance()[rows, cols] + d
            if bool((new < 0).any()):
                raise ConfigError(name, float(new.min()), "would make a conductance negative (G + delta >= 0 S)")
            out.append(d)
        return rows, cols, out

    def _read_perturbed(self, x, rows, cols, delta_plus, delta_minus):
        c = self.config
        rows, cols, deltas = self._perturbations(rows, cols, delta_plus, delta_minus)
        _, gsq = self._read_tensors()
        xn = self.dac(x)
        B, P = xn.shape[0], rows.numel()
        out = torch.empty((P, B, self.out_features), device=xn.device, dtype=xn.dtype)
        if P == 0:
            return out
        nr, cols_pad = self.n_row_tiles, self.padded_shape[1]
        part0 = self._clean_partials(xn)                                  # (nr, B, padded cols), noise-free
        rt = rows // self.tile_rows
        if c.wire_resistance == "none":                                   # only the perturbed column changes
            dw = deltas[0] if len(deltas) == 1 else deltas[0] - deltas[1]
            change = (xn[:, rows].T * (dw / (self.k * c.w_max))[:, None])[:, :, None]   # (P, B, 1)
            block = cols[:, None]
        else:                                                             # the perturbed tile's columns change
            change = self._wire_changes(xn, rows, cols, deltas)           # (P, B, C)
            C = self.tile_cols
            block = (cols // C * C)[:, None] + torch.arange(C, device=cols.device)
        scale = c.input_max * c.w_max
        if gsq is None:
            q0 = quantize(part0.clone(), c.adc_bits, c.adc_range, inplace=True)
            z0 = q0[0] if nr == 1 else q0.sum(0)                          # the base digital sums (B, padded cols)
            blocks = part0.permute(0, 2, 1)[rt[:, None], block].transpose(1, 2) + change
            blocks = quantize(blocks, c.adc_bits, c.adc_range, inplace=True)
            if nr > 1:                                                    # the other row tiles' conversions
                blocks += (z0.T[block] - q0.permute(0, 2, 1)[rt[:, None], block]).transpose(1, 2)
        else:
            var0 = self._tile_products(xn * xn, gsq)
            g = [a.conductance()[rows, cols] for a in self._arrays()]
            dvar = sum((gk + dk) ** 2 - gk ** 2 for gk, dk in zip(g, deltas, strict=True))
            dvar = xn[:, rows].T.square() * dvar[:, None]                 # (P, B): only the cell's own column
        chunk = max(1, 4_000_000 // (nr * B * cols_pad))
        for s in range(0, P, chunk):
            sl = slice(s, min(P, s + chunk))
            m = sl.stop - s
            if gsq is None:
                z = z0.expand(m, B, cols_pad).clone()
                z.scatter_(2, block[sl, None, :].expand(m, B, block.shape[1]), blocks[sl])
            else:
                ar = torch.arange(m, device=xn.device)
                part = part0.expand(m, *part0.shape).clone()
                view = part.permute(0, 1, 3, 2)                           # (m, nr, padded cols, B)
                view[ar[:, None], rt[sl, None], block[sl]] += change[sl].transpose(1, 2)
                var = var0.expand(m, *var0.shape).clone()
                var[ar, rt[sl], :, cols[sl]] += dvar[sl]
                part = quantize(self.add_read_noise(part, var), c.adc_bits, c.adc_range, inplace=True)
                z = part[:, 0] if nr == 1 else part.sum(1)
            z = z[..., : self.out_features]
            out[sl] = z if scale == 1.0 else z * scale
        return out

    def _wire_changes(self, xn: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                      deltas: list[torch.Tensor]) -> torch.Tensor:
        """Change of the perturbed tile's partial sums (P, B, tile cols), normalized, with wire resistance:
        the rank-k update of each tile's network (exact, or in the approximate model), tile by tile."""
        from neurosim.wires import _approx_changes, _Layout

        c = self.config
        R, C, nc = self.tile_rows, self.tile_cols, self.n_col_tiles
        v = self._row_tiles(xn) * c.read_voltage                          # (nr, B, R)
        unit = c.read_voltage * self.k * c.w_max
        tile = rows // R * nc + cols // C
        d = torch.stack(deltas, 1)                                        # (P, k)
        change = torch.empty((rows.numel(), xn.shape[0], C), device=xn.device, dtype=xn.dtype)
        for t in torch.unique(tile).tolist():
            sel = (tile == t).nonzero().squeeze(1)
            rr, cc = divmod(t, nc)
            li, lj = (rows[sel] - rr * R).cpu().numpy(), (cols[sel] - cc * C).cpu().numpy()
            if c.wire_resistance == "nodal":
                solver = self._tile_solver(rr, cc)
                pr, pc, pd = solver.layout.perturbations(li, lj, d[sel].double().cpu().numpy(), solver._g)
                ch = solver._changes(v[rr].detach().to("cpu", torch.float64).numpy(), pr, pc, pd)
                ch = torch.from_numpy(ch).to(xn.device, xn.dtype)
            else:
                G = self._tile(rr, cc).to(xn.dtype)
                layout = _Layout(tuple(G.shape), None if self.minus is not None else self.g_mid)
                Gp = layout.physical(G)
                pr, pc, pd = layout.perturbations(li, lj, d[sel].double().cpu().numpy(),
                                                  Gp.detach().to("cpu", torch.float64).numpy())
                dev = xn.device
                _, ch = _approx_changes(Gp, v[rr], torch.from_numpy(pr).to(dev), torch.from_numpy(pc).to(dev),
                                        torch.from_numpy(pd).to(dev, xn.dtype), c.r_wire, c.r_wire, layout,
                                        100, 1e-6)
            change[sel] = ch / unit
        return change

    # -- programming --------------------------------------------------------------------------------------
    def pulse_counts(self, dw: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pulses the controller issues for a requested weight change scale·dw, sparsely: (flat indices
        into the (in, out) matrix, signed counts), only cells with a non-zero count. Stochastic rounding fires
        floor(m + u) pulses for m = |Δw|/Δw_pulse: unbiased, drawn by ``stochastic_round_sparse``. A request
        beyond the weight range (|scale·Δw| > 2·w_max, e.g. a diverging run's) is capped at the pulses that
        cross it: the controller knows no weight can move further, and more pulses would only bill time at a
        saturated device. (Capped on the few counts, not on the whole request: no pass over the matrix.)"""
        dw, factor, limits = self._rounding_request(dw, scale)
        if self.config.rounding == "stochastic":   # clamps only where a count can reach the limits
            return stochastic_round_sparse(dw, generator or self.rounding_stream, factor, limits)
        return self._round_nearest(dw, factor, limits)

    def _rounding_request(self, dw: torch.Tensor, scale: float) -> tuple[torch.Tensor, float, tuple[int, int]]:
        """What ``pulse_counts`` rounds: the request in the array's dtype (depressions rescaled where the two
        curves take different pulse counts), the factor to pulses, and the limits of a count."""
        if dw.dtype != self.dtype:
            dw = dw.to(self.dtype)
        if self.dw_up != self.dw_down:  # a single device whose two curves have different pulse counts
            dw = torch.where(dw * scale > 0, dw, dw * (self.dw_up / self.dw_down))
        span = 2.0 * self.config.w_max
        return dw, scale / self.dw_up, (-math.ceil(span / self.dw_down), math.ceil(span / self.dw_up))

    @staticmethod
    def _round_nearest(dw: torch.Tensor, factor: float, limits: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = dw.mul(factor).round_().view(-1)
        idx = n.nonzero().squeeze(1)
        return idx, n.index_select(0, idx).clamp_(*limits)

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
        # A drifting array is patched too while the cache's drift is within drift_tolerance: the cells just
        # written are at age 0, where the drift factor is exactly 1.
        patch = (self._cache_key == self._state_key() and 16 * cells.numel() < self.plus.g.numel()
                 and (self.config.drift_tolerance > 0 or not any([a.drifting for a in self._arrays()])))
        return cells, patch

    def _written(self, idx: torch.Tensor, counts: torch.Tensor, cells: torch.Tensor, new: torch.Tensor | None,
                 patch: bool, patched: bool = False) -> torch.Tensor:
        """After the devices took the pulses: the read cache, the controller's belief, and the pulse count of one
        array and the pulse slots (plain numbers from the CPU kernel; 0-dim tensors from the torch path, so that
        a whole network's numbers come back in one synchronisation). ``patched``: the pulse pass patched the
        read cache already (``_patch_request``)."""
        if patched:
            self._cache_key, self._solvers = self._state_key(), None
        elif patch:
            self._refresh_cells(cells, new)
        if self._bookkeeping_kernel(idx, counts):
            return NUMBA.update.bookkeeping(
                flat_numpy(self.believed), idx.numpy(), counts.numpy(), self.dw_up, self.dw_down,
                self.config.w_max, self.out_features, self.tile_cols, self.n_col_tiles, self.tile_rows,
                self.n_row_tiles)
        return self._bookkeeping_torch(idx, counts)

    def _bookkeeping_kernel(self, idx: torch.Tensor, counts: torch.Tensor) -> bool:
        """Whether ``_written``'s belief and slots run as one numba pass (CPU, numba, matching dtypes): a dozen
        torch operations a layer and step otherwise. The torch path is the oracle (tested bit for bit)."""
        return (self.device.type == "cpu" and self.dtype in (torch.float32, torch.float64)
                and counts.dtype == self.dtype and idx.dtype == torch.long and idx.is_contiguous()
                and counts.is_contiguous() and self.believed.is_contiguous() and _numba_kernels() is not None)

    def _bookkeeping_torch(self, idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_written``'s belief update, pulse count and slots as torch operations (any device)."""
        believed = flat_view(self, self.believed)
        if self.dw_up == self.dw_down:
            step = counts * self.dw_up
        else:
            step = torch.where(counts > 0, counts * self.dw_up, counts * self.dw_down)
        believed.index_copy_(0, idx, believed.index_select(0, idx).add_(step)
                             .clamp_(-self.config.w_max, self.config.w_max))
        # Slots: per tile, the sum over its rows of the largest pulse count in the row; tiles in parallel.
        mag = counts.abs()
        per_row = self._slot_buffer   # kept between steps (a fresh one was an allocation and a fill a step)
        if per_row is None or per_row.dtype != mag.dtype or per_row.device != mag.device:
            per_row = self._slot_buffer = torch.zeros(self.padded_shape[0] * self.n_col_tiles, device=mag.device,
                                                      dtype=mag.dtype)
        else:
            per_row.zero_()
        rows = idx // self.out_features
        where = rows if self.n_col_tiles == 1 else rows * self.n_col_tiles + idx % self.out_features // self.tile_cols
        per_row.scatter_reduce_(0, where, mag, "amax")
        slots = per_row.reshape(self.n_row_tiles, self.tile_rows, self.n_col_tiles).sum(1).amax()
        return mag.sum(), slots

    def program_delta(self, dw: torch.Tensor, scale: float = 1.0) -> dict[str, int]:
        """Update by a requested weight change scale·dw: pulses through the device model (not an exact write).
        (``scale`` saves the caller a pass over the matrix, e.g. −learning rate times a gradient.)"""
        return program_deltas([self], [dw], scale)[0]

    def write_verify(self, w: torch.Tensor, tolerance: float = 0.01, max_iterations: int = 20) -> dict:
        """Program a weight matrix by write-and-verify: read every device (drift and read noise included), pulse
        the ones further than ``tolerance``·w_max from their target towards it, with the pulse count computed
        from that read, repeat. All cells in parallel; every write is whole pulses, so every conductance is one
        the device reaches. With cycle-to-cycle noise a few devices may still be outside after
        ``max_iterations``: the count of devices outside at the last verify is reported as ``unconverged``."""
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
                n = torch.where(off, torch.round(array.pulses_for(target, seen)), torch.zeros_like(target))
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


def _stats(crossbars: list[Crossbar], numbers: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, int]]:
    """(pulses of one array, slots) of several writes → plain numbers, in one synchronisation; the pulses
    count every array of a crossbar (the counts are whole numbers: the product is exact either way)."""
    flat = [t for pair in numbers for t in pair]
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else ())
    values = [next(read) if isinstance(t, torch.Tensor) else t for t in flat]
    return [{"pulses": int(values[2 * i]) * (1 if cb.minus is None else 2), "pulse_slots": int(values[2 * i + 1])}
            for i, cb in enumerate(crossbars)]


def _fire(writes: list[tuple[Crossbar, torch.Tensor, torch.Tensor]]) -> list[dict[str, int]]:
    """Sparse pulse counts (crossbar, flat indices, signed counts) into the devices: the differential pairs of
    all crossbars in one pass of the device model (``program_pairs``, which splits different cards), single
    devices on their own; then each crossbar's bookkeeping, and all the numbers in one synchronisation."""
    parts = [(cb, idx, counts, *cb._cells(idx)) for cb, idx, counts in writes]
    parts = [(*part, part[0]._patch_request() if part[4] else None) for part in parts]
    paired = _program_pairs([(cb.plus, cb.minus, cells, n, request) for cb, _, n, cells, _, request in parts
                             if cb.minus is not None], halves=True)
    news = iter(paired)
    return _stats([part[0] for part in parts],
                  [cb._written(idx, n, cells, next(news) if cb.minus is not None else cb.plus.program_cells(cells, n),
                               patch, request is not None and request[1])
                   for cb, idx, n, cells, patch, request in parts])


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
    # pulse_counts of every layer, the stochastic ones' magnitude statistics read in one synchronisation.
    requests = [cb._rounding_request(dw, scale) for cb, dw in zip(crossbars, dws, strict=True)]
    drawn = [i for i, cb in enumerate(crossbars) if cb.config.rounding == "stochastic"]
    rounded = dict(zip(drawn, stochastic_round_sparse_many(
        [requests[i][0] for i in drawn], [crossbars[i].rounding_stream for i in drawn],
        [requests[i][1] for i in drawn], [requests[i][2] for i in drawn]), strict=True))
    return _fire([(cb, *(rounded[i] if i in rounded else cb._round_nearest(*requests[i])))
                  for i, cb in enumerate(crossbars)])
