"""Discrete-event hardware timeline: how long an on-chip training run takes and how much energy it uses.

The trainer runs as a simpy process and issues *grouped* hardware operations (one call per operation, layer
and step, never one per cell or sample); the engine turns each into a duration and an energy from a
``HardwareTable``, advances the simpy clock, sums the energy and keeps a small event trace. Tiles, ADC banks
and the digital unit are simpy resources, so operations issued by concurrent processes wait for each other.
Inside one pass the samples pipeline through the layers in closed form (fill + slowest stage), which keeps
the cost per call at a handful of simpy events. The engine knows nothing of torch: plain ints and floats.
The timing model, every default and its source are in docs/engine.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from neurosim.config import ConfigError, check, setting

# The /events dataset of the HDF5 run file (DESIGN.md). Byte strings, because h5py stores them natively.
EVENT_DTYPE = np.dtype([("t_s", "f8"), ("duration_s", "f8"), ("op", "S16"), ("layer", "S32"),
                        ("count", "i8"), ("energy_j", "f8")])

_COUNTERS = ("pulses", "perturbations", "reads", "adc_conversions", "neuron_evals", "digital_ops")

# ISAAC (Shafiee et al., ISCA 2016, component table): per in-situ multiply-accumulate unit, 8 ADCs of 8 bit at
# 1.28 GS/s draw 16 mW together, and 8 memristor arrays of 128x128 draw 2.4 mW with a 100 ns read cycle.
_ISAAC_ADC_RATE = 1.28e9
_ISAAC_ADC_W = 16e-3 / 8
_ISAAC_ARRAY_W = 2.4e-3 / 8
_ISAAC_READ_S = 100e-9
# MLP+NeuroSim V3.0 (Chen, Peng, Yu, IEDM 2017; code defaults, RealDevice): 2 V write pulses of 80 ns,
# Gmax = 10 uS; controller clock 2 GHz; 16 columns share one read circuit. The pulse figures stand in only
# for what a device card does not give (see HardwareTable.resolve).
_NS_PULSE_S = 80e-9
_NS_PULSE_V = 2.0
_NS_G = 10e-6
_NS_CLOCK_S = 1 / 2e9


@dataclass
class HardwareTable:
    """Duration and energy of each hardware operation; the ``[hardware]`` table of a scenario."""

    read_s: float = setting(_ISAAC_READ_S, "one analog read of a tile for one input vector (drive rows, "
                            "settle, integrate) [s]; ISAAC's crossbar read cycle, 100 ns", ge=0)
    read_j: float = setting(_ISAAC_ARRAY_W * _ISAAC_READ_S, "energy of that read, per tile [J]; ISAAC: "
                            "0.3 mW per 128x128 array over 100 ns = 30 pJ", ge=0)
    adc_s: float = setting(1 / _ISAAC_ADC_RATE, "one ADC conversion [s]; ISAAC's 8-bit ADC at 1.28 GS/s",
                           ge=0)
    adc_j: float = setting(_ISAAC_ADC_W / _ISAAC_ADC_RATE, "energy of one conversion [J]; ISAAC: 2 mW per "
                           "ADC at 1.28 GS/s = 1.56 pJ", ge=0)
    adcs_per_tile: int = setting(8, "ADCs shared by a tile's columns; a read needs ceil(cols/adcs) "
                                 "conversion rounds; MLP+NeuroSim V3.0 muxes 16 columns per read circuit: "
                                 "8 for 128 columns", ge=1)
    neuron_s: float = setting(_NS_CLOCK_S, "neuron/activation evaluation after the ADC, per read (all "
                              "outputs in parallel) [s]; one 2 GHz controller clock as in MLP+NeuroSim V3.0",
                              ge=0)
    neuron_j: float = setting(0.03e-12, "energy of one neuron evaluation, per converted output [J]; an 8-bit "
                              "add/compare in 45 nm (Horowitz, ISSCC 2014): 0.03 pJ", ge=0)
    derivative_s: float = setting(_NS_CLOCK_S, "derivative-circuit evaluation in a transposed backward read, "
                                  "per read [s]; one 2 GHz clock", ge=0)
    derivative_j: float = setting(0.2e-12, "energy of one derivative evaluation (f'(z) times the error), per "
                                  "converted output [J]; an 8-bit multiply in 45 nm (Horowitz 2014): 0.2 pJ",
                                  ge=0)
    pulse_s: float | None = setting(None, "one programming pulse slot (a row's cells are pulsed in parallel) "
                                    "[s]; none: the device card's pulse_width (80 ns, MLP+NeuroSim V3.0's "
                                    "RealDevice, for a card that gives none)", ge=0)
    pulse_j: float | None = setting(None, "energy of one pulse on one cell [J]; none: V^2*G*pulse_s with the "
                                    "mean of the card's squared pulse voltages (2 V where it gives none) and G "
                                    "at mid-window (g_min+g_max)/2; without a card NeuroSim's 2 V, 10 uS, 80 ns "
                                    "= 3.2 pJ", ge=0)
    bias_s: float = setting(_NS_CLOCK_S, "DGC 'temporary' perturbation: applying or removing the temporal "
                            "change of one cell's read (a bias-DAC code change) [s]; assumption: one 2 GHz "
                            "controller clock, the settling being part of the measurement's read", ge=0)
    bias_j: float = setting(1e-15, "energy of one such bias change [J]; assumption: C·V² of one line, "
                            "C = 25 fF (a 128-cell wire) at the 0.2 V read voltage = 1 fJ", ge=0)
    digital_op_s: float = setting(_NS_CLOCK_S, "one operation (MAC/add/compare) of the digital controller "
                                  "[s]; one 2 GHz clock as in MLP+NeuroSim V3.0", ge=0)
    digital_op_j: float = setting(4.6e-12, "energy of one digital operation [J]; a 32-bit float multiply "
                                  "(3.7 pJ) plus add (0.9 pJ) in 45 nm (Horowitz, ISSCC 2014)", ge=0)
    digital_lanes: int = setting(128, "operations the digital unit executes in parallel (assumption: one "
                                 "lane per column of a 128-column tile)", ge=1)

    def __post_init__(self) -> None:
        check(self)   # a table built in code is refused as early as one read from TOML

    @property
    def resolved(self) -> bool:
        """Whether every derived field has a value (what the engine computes with)."""
        return None not in (self.pulse_s, self.pulse_j)

    def resolve(self, pulse_width: float | None = None, pulse_voltage_ltp: float | None = None,
                pulse_voltage_ltd: float | None = None, g_min: float | None = None,
                g_max: float | None = None) -> HardwareTable:
        """This table with every unset pulse field derived from a device card's numbers (plain floats, so the
        engine needs no device classes); a field the table sets is kept, and what is derived follows it.

        pulse_s = pulse_width; pulse_j = mean(V_ltp^2, V_ltd^2) * G_mid * pulse_s with G_mid = (g_min+g_max)/2:
        a pair's update pulses one device up and the other down, so the two polarities fire equally often,
        and the cells of a pair sit around mid-window. A number the card lacks is
        NeuroSim's (80 ns, 2 V); with no conductance window at all, G = 10 uS (NeuroSim's 3.2 pJ)."""
        pulse_s = self.pulse_s if self.pulse_s is not None else \
            (_NS_PULSE_S if pulse_width is None else float(pulse_width))
        pulse_j = self.pulse_j
        if pulse_j is None:
            volts = [float(v) for v in (pulse_voltage_ltp, pulse_voltage_ltd) if v is not None]
            v2 = sum(v * v for v in volts) / len(volts) if volts else _NS_PULSE_V ** 2
            if (g_min is None) != (g_max is None):
                raise ValueError("g_min and g_max come together (the window's middle sets the pulse energy)")
            g = _NS_G if g_min is None else 0.5 * (float(g_min) + float(g_max))
            pulse_j = v2 * g * pulse_s
        return dataclasses.replace(self, pulse_s=pulse_s, pulse_j=pulse_j)


@dataclass
class LayerFootprint:
    """How one layer is laid out on the chip, as the crossbar mapping reports it (plain ints)."""

    name: str
    tiles: int                # crossbar tiles holding the layer; they work in parallel
    tile_rows: int            # rows used per tile (max over tiles)
    tile_cols: int            # columns used per tile (max over tiles): ADC conversions per read
    reads_per_sample: int = 1  # analog reads per input sample (conv: number of output positions)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isascii() or not 0 < len(self.name) <= 32:
            raise ConfigError("name", self.name, "must be 1 to 32 ASCII characters (the /events layer field)")
        for field in ("tiles", "tile_rows", "tile_cols", "reads_per_sample"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(field, value, f"layer '{self.name}': must be an integer >= 1")


class _Pass:
    """A pipelined pass through a fixed list of layers, precomputed once: per-sample stage times, energy,
    counts and the per-sample event template. A call then costs a few multiplications."""

    __slots__ = ("counts", "energy", "fill", "resources", "slowest", "template")

    def __init__(self, hw: HardwareTable, layers: Sequence[LayerFootprint], backward: bool,
                 resources: list[_Unit]):
        ops = (b"read_t", b"adc_t", b"derivative") if backward else (b"read", b"adc", b"neuron")
        post_s, post_j = (hw.derivative_s, hw.derivative_j) if backward else (hw.neuron_s, hw.neuron_j)
        offset, stages, rows = 0.0, [], []
        reads = convs = 0
        energy = 0.0
        for lay in layers:
            outputs = lay.tile_rows if backward else lay.tile_cols   # a transposed read converts rows
            rounds = -(-outputs // hw.adcs_per_tile)                 # columns wait for the shared ADCs
            rps = lay.reads_per_sample
            parts = ((rps * hw.read_s, rps * lay.tiles, hw.read_j),
                     (rps * rounds * hw.adc_s, rps * lay.tiles * outputs, hw.adc_j),
                     (rps * post_s, rps * lay.tiles * outputs, post_j))
            leads = (0.0, hw.read_s, hw.read_s + rounds * hw.adc_s)   # first activity within a sample
            for op, (dur, count, unit_j), lead in zip(ops, parts, leads, strict=True):
                if dur > 0 or unit_j > 0:
                    rows.append((offset + lead, dur, op, lay.name.encode(), count, count * unit_j))
                energy += count * unit_j
            stage = parts[0][0] + parts[1][0] + parts[2][0]
            stages.append(stage)
            offset += stage
            reads += rps * lay.tiles
            convs += rps * lay.tiles * outputs
        self.fill = offset                       # the first sample crosses every stage
        self.slowest = max(stages)               # then one sample leaves per slowest stage
        self.energy = energy                     # per sample
        self.counts = (reads, convs)             # per sample; one neuron/derivative evaluation per conversion
        self.template = np.array(rows, dtype=EVENT_DTYPE)   # per sample, t_s relative to the pass start
        self.resources = resources

    def duration(self, batch: int) -> float:
        return self.fill + (batch - 1) * self.slowest


class Engine:
    """The hardware clock of one run: issue grouped operations from a simpy process and read the totals.

    Every operation method starts the operation when called and returns a simpy event that fires when it
    ends, so ``yield engine.forward(b)`` makes the trainer wait for it; operations issued without waiting in
    between run concurrently where their resources allow (``parallel`` joins them). With ``enabled=False``
    nothing is recorded (no energy, counts or events; epochs read NaN). The clock then still runs if
    ``keep_time`` (the same timeline, so devices that drift age exactly as in a recorded run); otherwise the
    methods do nothing and return ``None`` and ``start`` simply drives the generator, so the trainer keeps
    its ``yield``s either way. ``timed`` says whether the clock runs.

    ``hardware``: fields left unset (pulse timing and energy) are resolved without a card
    (``HardwareTable.resolve``); the trainer's ``make_engine`` resolves them from the device card first.
    """

    def __init__(self, hardware: HardwareTable | None = None, layers: Iterable[LayerFootprint] = (),
                 enabled: bool = True, keep_time: bool = False):
        hw = HardwareTable() if hardware is None else hardware
        check(hw)
        self.hardware = hw if hw.resolved else hw.resolve()
        self.layers = list(layers)
        if not self.layers:
            raise ConfigError("layers", [], "the engine needs at least one layer footprint")
        self._index: dict[str, int] = {}
        for i, lay in enumerate(self.layers):
            if lay.name in self._index:
                raise ConfigError("name", lay.name, "two layers have the same name")
            self._index[lay.name] = i
        self.enabled = bool(enabled)
        self.timed = self.enabled or bool(keep_time)
        self.env = simpy.Environment()
        # Resources: per layer its tiles (working as a group) and its ADC bank; one digital unit.
        self.tiles = {lay.name: _Unit(self.env, 1) for lay in self.layers}
        self.adcs = {lay.name: _Unit(self.env, 1) for lay in self.layers}
        self.digital_unit = _Unit(self.env, 1)
        self._passes: dict[tuple, _Pass] = {}
        # The trace, kept cheap: (t0, batch, pass) per pass call, expanded into per-layer rows by events();
        # (t_s, duration_s, op, layer, count, energy_j) for every other operation.
        self._log: list[tuple] = []
        self._energy = 0.0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self.epochs: list[dict[str, Any]] = []
        self._last_epoch = self._snapshot()

    # ---- running -------------------------------------------------------------------------------------

    def start(self, process_generator: Generator) -> Any:
        """Run a trainer generator to completion (as a simpy process when timed); returns its value."""
        if not self.timed:
            try:
                while True:
                    process_generator.send(None)
            except StopIteration as stop:
                return stop.value
        proc = self.env.process(process_generator)
        self.env.run(until=proc)
        return proc.value

    def parallel(self, *events: simpy.Event | None) -> simpy.Event | None:
        """One event for operations issued together (e.g. programming all layers at once)."""
        if not self.timed:
            return None
        return self.env.all_of([e for e in events if e is not None])

    # ---- operations ----------------------------------------------------------------------------------

    def forward(self, batch: int, layers: Sequence[str] | None = None) -> simpy.Event | None:
        """Pipelined forward pass of ``batch`` samples through ``layers`` (all by default, in network order).

        Stage time of a layer per sample: reads_per_sample * (read_s + ceil(tile_cols/adcs_per_tile)*adc_s
        + neuron_s); pass time: sum(stages) + (batch-1)*max(stages). Events: read, adc, neuron per layer.
        """
        if not self.timed:
            return None
        plan = self._pass(layers, False)
        batch = _positive("batch", batch)
        return self._issue(plan.resources, plan.duration(batch), self._book_pass, batch, plan)

    def backward(self, batch: int, layers: Sequence[str] | None = None, transposed: bool = True,
                 macs: dict[str, int] | None = None) -> simpy.Event | None:
        """Backward pass in reverse network order over ``layers`` (all by default).

        ``transposed=True``: a pipelined transposed read of the tiles (rows converted, derivative circuit
        instead of neuron; events read_t, adc_t, derivative). ``transposed=False``: the digital unit computes
        the errors from the weights the controller believes it wrote, layer after layer; ``macs[layer]``
        gives the operations (default batch*reads_per_sample*tiles*tile_rows*tile_cols); events 'digital'.
        """
        if not self.timed:
            return None
        batch = _positive("batch", batch)
        if transposed:
            plan = self._pass(layers, True)
            return self._issue(plan.resources, plan.duration(batch), self._book_pass, batch, plan)
        hw = self.hardware
        work = []
        for name in self._ordered(layers, reverse=True):
            ops = (macs or {}).get(name)
            if ops is None:
                lay = self.layers[self._index[name]]
                ops = batch * lay.reads_per_sample * lay.tiles * lay.tile_rows * lay.tile_cols
            ops = _count("macs", ops)
            work.append((name.encode(), ops, -(-ops // hw.digital_lanes) * hw.digital_op_s))
        return self._issue([self.digital_unit], sum(w[2] for w in work), self._book_digital, work)

    def program(self, layer: str, pulses: int, pulse_slots: int) -> simpy.Event | None:
        """Write a weight update: ``pulses`` pulses in all (energy pulses*pulse_j), applied in ``pulse_slots``
        sequential slots as the trainer scheduled them (rows one after another, a row's cells in parallel)."""
        if not self.timed:
            return None
        pulses, slots = _count("pulses", pulses), _count("pulse_slots", pulse_slots)
        tiles = self.tiles.get(layer)
        if tiles is None:
            self._check_layer(layer)
        duration = slots * self.hardware.pulse_s
        return self._issue([tiles], duration, self._book_program, layer, pulses, duration)

    def perturb(self, layer: str, perturbations: int, batch: int, pulses: int = 0, pulse_slots: int = 0,
                cell_reads: int = 0, bias_changes: int = 0) -> simpy.Event | None:
        """DGC on ``layer``: ``perturbations`` sequential perturb-measure-restore cycles (a central difference
        is two cycles), each measuring with one pipelined forward pass of ``batch`` samples through the whole
        network, plus what perturbing and restoring did, as counted by the simulation of it: ``pulses`` fired
        in ``pulse_slots`` sequential slots, ``cell_reads`` single-cell reads (write-and-verify: one read and
        one conversion each) and ``bias_changes`` (temporary perturbations). One event: the cycles take their
        time in sequence on the clock, however the numerics batch them."""
        if not self.timed:
            return None
        n = _count("perturbations", perturbations)
        batch = _positive("batch", batch)
        pulses, slots = _count("pulses", pulses), _count("pulse_slots", pulse_slots)
        cell_reads, bias = _count("cell_reads", cell_reads), _count("bias_changes", bias_changes)
        self._check_layer(layer)
        hw = self.hardware
        fwd = self._pass(None, False)
        duration = (n * fwd.duration(batch) + slots * hw.pulse_s + cell_reads * (hw.read_s + hw.adc_s)
                    + bias * hw.bias_s)
        energy = (n * batch * fwd.energy + pulses * hw.pulse_j + cell_reads * (hw.read_j + hw.adc_j)
                  + bias * hw.bias_j)
        return self._issue(fwd.resources, duration, self._book_perturb, layer, n, n * batch, energy, duration,
                           pulses, cell_reads)

    def digital(self, layer: str, ops: int) -> simpy.Event | None:
        """``ops`` operations of the digital controller for ``layer`` (any label): ceil(ops/lanes) clocks."""
        if not self.timed:
            return None
        ops = _count("ops", ops)
        hw = self.hardware
        work = [(layer.encode(), ops, -(-ops // hw.digital_lanes) * hw.digital_op_s)]
        return self._issue([self.digital_unit], work[0][2], self._book_digital, work)

    # ---- results -------------------------------------------------------------------------------------

    @property
    def totals(self) -> dict[str, float | int]:
        """Running totals: clock, energy and the counts of every kind of operation (booked at its start)."""
        return {"time_s": float(self.env.now), "energy_j": self._energy, **self._counts}

    def mark_epoch(self, epoch: int) -> dict[str, Any]:
        """Close an epoch. Cumulative values (sim_time_s is the clock at its end) plus ``delta_*`` for the
        epoch alone. With the clock off the values are NaN (not measured) and nothing is stored."""
        keys = ("sim_time_s", "energy_j", *_COUNTERS)
        if not self.enabled:
            nan = float("nan")
            return {"epoch": epoch, **dict.fromkeys(keys, nan), **{f"delta_{k}": nan for k in keys}}
        now = self._snapshot()
        row = {"epoch": epoch, **now, **{f"delta_{k}": now[k] - self._last_epoch[k] for k in keys}}
        self._last_epoch = now
        self.epochs.append(row)
        return row

    def metrics(self) -> dict[str, np.ndarray]:
        """The stored epochs as 1-D arrays, one entry per epoch (for /metrics of the run file)."""
        if not self.epochs:
            return {}
        return {k: np.asarray([row[k] for row in self.epochs]) for k in self.epochs[0]}

    def events(self) -> np.ndarray:
        """The event trace as a structured array of EVENT_DTYPE, in the order the operations started
        (a pass's rows in its layer order). Built on demand from the compact log, vectorized per pass."""
        log = self._log
        sizes = np.fromiter((len(e[2].template) if len(e) == 3 else 1 for e in log), np.int64, len(log))
        first = np.cumsum(sizes) - sizes
        out = np.empty(int(sizes.sum()), dtype=EVENT_DTYPE)
        singles, passes = [], {}
        for i, e in enumerate(log):
            if len(e) == 3:
                passes.setdefault(id(e[2]), (e[2], []))[1].append(i)
            else:
                singles.append(i)
        if singles:
            out[first[singles]] = np.array([log[i] for i in singles], dtype=EVENT_DTYPE)
        for plan, idx in passes.values():
            tpl = plan.template
            if not len(tpl):
                continue
            t0 = np.array([log[i][0] for i in idx])[:, None]
            batch = np.array([log[i][1] for i in idx], dtype=np.int64)[:, None]
            rows = first[idx][:, None] + np.arange(len(tpl))
            out["t_s"][rows] = t0 + tpl["t_s"]
            out["duration_s"][rows] = batch * tpl["duration_s"]
            out["op"][rows] = tpl["op"]
            out["layer"][rows] = tpl["layer"]
            out["count"][rows] = batch * tpl["count"]
            out["energy_j"][rows] = batch * tpl["energy_j"]
        return out

    # ---- internals -----------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return {"sim_time_s": float(self.env.now), "energy_j": self._energy, **self._counts}

    def _check_layer(self, layer: str) -> None:
        if layer not in self._index:
            raise ValueError(f"unknown layer {layer!r} (known: {', '.join(self._index)})")

    def _ordered(self, layers: Sequence[str] | None, reverse: bool) -> list[str]:
        if layers is None:
            names = list(self._index)
        else:
            for name in layers:
                self._check_layer(name)
            names = sorted(set(layers), key=self._index.__getitem__)
            if not names:
                raise ValueError("an empty list of layers")
        return names[::-1] if reverse else names

    def _pass(self, layers: Sequence[str] | None, backward: bool) -> _Pass:
        key = (layers if layers is None else tuple(layers), backward)
        plan = self._passes.get(key)
        if plan is None:
            names = self._ordered(layers, reverse=backward)
            # canonical resource order (network order, tiles before ADCs) so waiting passes cannot deadlock
            canonical = sorted(names, key=self._index.__getitem__)
            resources = [self.tiles[n] for n in canonical] + [self.adcs[n] for n in canonical]
            plan = _Pass(self.hardware, [self.layers[self._index[n]] for n in names], backward, resources)
            self._passes[key] = plan
        return plan

    # The _book_* methods account for an operation when it starts (t0): energy, counts, trace.

    def _book_pass(self, t0: float, batch: int, plan: _Pass) -> None:
        self._log.append((t0, batch, plan))
        self._energy += batch * plan.energy
        c = self._counts
        c["reads"] += batch * plan.counts[0]
        c["adc_conversions"] += batch * plan.counts[1]
        c["neuron_evals"] += batch * plan.counts[1]

    def _book_program(self, t0: float, layer: str, pulses: int, duration: float) -> None:
        energy = pulses * self.hardware.pulse_j
        self._energy += energy
        self._counts["pulses"] += pulses
        if pulses:
            self._log.append((t0, duration, b"program", layer.encode(), pulses, energy))

    def _book_perturb(self, t0: float, layer: str, n: int, samples: int, energy: float, duration: float,
                      pulses: int, cell_reads: int) -> None:
        fwd = self._pass(None, False)
        self._energy += energy
        c = self._counts
        c["perturbations"] += n
        c["pulses"] += pulses
        c["reads"] += samples * fwd.counts[0] + cell_reads
        c["adc_conversions"] += samples * fwd.counts[1] + cell_reads
        c["neuron_evals"] += samples * fwd.counts[1]
        if n:
            self._log.append((t0, duration, b"perturb", layer.encode(), n, energy))

    def _book_digital(self, t0: float, work: list[tuple[bytes, int, float]]) -> None:
        unit_j = self.hardware.digital_op_j
        for name, ops, dur in work:
            self._energy += ops * unit_j
            self._counts["digital_ops"] += ops
            if ops:
                self._log.append((t0, dur, b"digital", name, ops, ops * unit_j))
            t0 += dur

    def _issue(self, resources: list[_Unit], duration: float, book: Callable[..., None],
               *args: Any) -> simpy.Event:
        """Start an operation holding ``resources`` for ``duration``; ``book(t0, *args)`` accounts for it."""
        env = self.env
        for r in resources:
            if r.users or r.put_queue:   # every unit has capacity 1
                return env.process(self._wait_and_run(resources, duration, book, args))
        # Common case (nothing else uses them): seize them now and free them when the timeout fires. The
        # callback is registered before the trainer's, so the trainer's next operation finds them free.
        done = env.timeout(duration)
        for r in resources:
            r.users.append(done)
        done.callbacks.append(_Unit.free_all)
        done.held = resources
        if self.enabled:
            book(env.now, *args)
        return done

    def _wait_and_run(self, resources: list[_Unit], duration: float, book: Callable[..., None],
                      args: tuple) -> Generator:
        """Contended case: request in canonical order, then run; the operation starts when all are held."""
        requests = []
        for r in resources:
            q = r.request()
            yield q
            requests.append(q)
        if self.enabled:
            book(self.env.now, *args)
        yield self.env.timeout(duration)
        for r, q in zip(resources, requests, strict=True):
            r.release(q)


class _Unit(simpy.Resource):
    """A simpy Resource (tile group, ADC bank, digital unit). An uncontended operation holds it through its
    own timeout event in ``users`` instead of a Request/Release pair: the same for anyone requesting it,
    at a fraction of the cost."""

    @staticmethod
    def free_all(done: simpy.Event) -> None:
        for r in done.held:
            r.users.remove(done)
            if r.put_queue:
                r._trigger_put(None)   # grant waiting requests, as a Release event would


def _count(name: str, value: int) -> int:
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, bool) or not isinstance(value, _INTEGERS) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _positive(name: str, value: int) -> int:
    if type(value) is int and value >= 1:
        return value
    value = _count(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


_INTEGERS = (int, np.integer)

__all__ = ["EVENT_DTYPE", "Engine", "HardwareTable", "LayerFootprint"]
