"""The hardware clock: closed-form durations and energies, pipelining, shared ADCs, DGC cost, bookkeeping."""

import math

import h5py
import numpy as np
import pytest

from neurosim.config import ConfigError, build
from neurosim.engine import EVENT_DTYPE, Engine, HardwareTable, LayerFootprint

# Round numbers, so every expected value below can be checked with pencil and paper.
HAND = dict(read_s=10e-9, read_j=2e-12, adc_s=1e-9, adc_j=0.5e-12, adcs_per_tile=4,
            neuron_s=2e-9, neuron_j=0.1e-12, derivative_s=3e-9, derivative_j=0.2e-12,
            pulse_s=50e-9, pulse_j=1e-12, bias_s=3e-9, bias_j=5e-15,
            digital_op_s=1e-9, digital_op_j=4e-12, digital_lanes=10)


def hand_table(**changes) -> HardwareTable:
    return HardwareTable(**{**HAND, **changes})


def run(engine: Engine, *ops) -> None:
    """Issue the operations one after another from a trainer process, as a training step does."""
    def trainer():
        for op, args, kwargs in ops:
            yield getattr(engine, op)(*args, **kwargs)
    engine.start(trainer())


def test_one_layer_one_step_equals_the_hand_computation():
    # One layer on 2 tiles of 16 rows x 10 columns, batch 8: forward, transposed backward, program.
    eng = Engine(hand_table(), [LayerFootprint("fc", tiles=2, tile_rows=16, tile_cols=10)])
    run(eng, ("forward", (8,), {}), ("backward", (8,), {}), ("program", ("fc", 100, 16), {}))
    # forward stage: 10 ns read + ceil(10/4)=3 conversions * 1 ns + 2 ns neuron = 15 ns; 8 samples, one
    # stage: 15 + 7*15 = 120 ns. backward stage: 10 + ceil(16/4)=4 * 1 + 3 = 17 ns -> 136 ns.
    # program: 16 slots * 50 ns = 800 ns.  Total 1056 ns.
    assert eng.env.now == pytest.approx(1056e-9, rel=1e-12)
    # forward: 8*2 = 16 reads * 2 pJ = 32; 8*2*10 = 160 conversions * 0.5 = 80; 160 neurons * 0.1 = 16
    # backward: 16 reads = 32; 8*2*16 = 256 conversions * 0.5 = 128; 256 derivatives * 0.2 = 51.2
    # program: 100 pulses * 1 pJ = 100.  Total 439.2 pJ.
    assert eng.totals["energy_j"] == pytest.approx(439.2e-12, rel=1e-12)
    t = eng.totals
    assert (t["reads"], t["adc_conversions"], t["neuron_evals"], t["pulses"]) == (32, 416, 416, 100)
    ev = eng.events()
    assert [o.decode() for o in ev["op"]] == ["read", "adc", "neuron", "read_t", "adc_t", "derivative",
                                            "program"]
    assert ev["count"].tolist() == [16, 160, 160, 16, 256, 256, 100]
    np.testing.assert_allclose(ev["energy_j"], np.array([32, 80, 16, 32, 128, 51.2, 100]) * 1e-12,
                               rtol=1e-12)
    # starts: read at 0, first conversion after the read (10 ns), neuron after 3 conversions (13 ns);
    # backward at 120 ns (+10, +14); program at 256 ns
    np.testing.assert_allclose(ev["t_s"], np.array([0, 10, 13, 120, 130, 134, 256]) * 1e-9, rtol=1e-12)
    # busy time of each part over the batch: 8*10, 8*3, 8*2; 8*10, 8*4, 8*3; 800
    np.testing.assert_allclose(ev["duration_s"], np.array([80, 24, 16, 80, 32, 24, 800]) * 1e-9,
                               rtol=1e-12)
    assert ev["energy_j"].sum() == pytest.approx(t["energy_j"], rel=1e-12)


def test_defaults_are_the_cited_values():
    hw = HardwareTable()
    assert hw.adc_s == pytest.approx(1 / 1.28e9)            # ISAAC: 1.28 GS/s
    assert hw.adc_j == pytest.approx(16e-3 / 8 / 1.28e9)    # ISAAC: 16 mW for 8 ADCs
    assert hw.read_s == pytest.approx(100e-9)               # ISAAC: 100 ns crossbar read
    assert hw.read_j == pytest.approx(2.4e-3 / 8 * 100e-9)  # ISAAC: 2.4 mW for 8 arrays
    assert (hw.bias_s, hw.bias_j) == (pytest.approx(0.5e-9), pytest.approx(25e-15 * 0.2**2))  # stated assumptions
    assert hw.digital_op_j == pytest.approx(4.6e-12)        # Horowitz 2014: fp32 mult + add
    assert build(HardwareTable, {}) == hw
    # Pulse timing and energy are the device card's (HardwareTable.resolve); without a card, NeuroSim's.
    assert (hw.pulse_s, hw.pulse_j) == (None, None)
    assert not hw.resolved
    bare = hw.resolve()
    assert bare.resolved and Engine(hw, [LayerFootprint("x", 1, 4, 4)]).hardware == bare
    assert bare.pulse_s == pytest.approx(80e-9)             # MLP+NeuroSim V3.0 RealDevice
    assert bare.pulse_j == pytest.approx(2.0**2 * 10e-6 * 80e-9)


def test_pulse_timing_and_energy_follow_the_card_unless_the_table_sets_them():
    # PCMO (Jerry et al. 2017): -2 V / +2 V pulses of 1 ms, window 6.36 nS .. 43.5 nS.
    card = dict(pulse_width=1e-3, pulse_voltage_ltp=-2.0, pulse_voltage_ltd=2.0, g_min=6.356471e-9,
                g_max=4.347826e-8)
    g_mid = 0.5 * (card["g_min"] + card["g_max"])
    hw = HardwareTable().resolve(**card)
    assert hw.pulse_s == 1e-3
    assert hw.pulse_j == pytest.approx(4.0 * g_mid * 1e-3, rel=1e-12)
    eng = Engine(hw, [LayerFootprint("fc", 1, 8, 8)])
    run(eng, ("program", ("fc", 30, 7), {}))
    assert eng.env.now == pytest.approx(7 * 1e-3, rel=1e-12)          # slots x the card's 1 ms
    assert eng.totals["energy_j"] == pytest.approx(30 * hw.pulse_j, rel=1e-12)
    # Unequal voltages: the mean of the squares (a pair fires both polarities equally often).
    asym = HardwareTable().resolve(**{**card, "pulse_voltage_ltp": 3.0, "pulse_voltage_ltd": -1.0})
    assert asym.pulse_j == pytest.approx(5.0 * g_mid * 1e-3, rel=1e-12)
    # What the table sets is kept, and what is derived follows it: the energy uses its pulse_s.
    short = HardwareTable(pulse_s=100e-9).resolve(**card)
    assert short.pulse_s == 100e-9
    assert short.pulse_j == pytest.approx(4.0 * g_mid * 100e-9, rel=1e-12)
    fixed = HardwareTable(pulse_j=1e-12).resolve(**card)
    assert (fixed.pulse_s, fixed.pulse_j) == (1e-3, 1e-12)
    # A card without voltages or width: NeuroSim's 2 V and 80 ns, with the card's own window.
    bare = HardwareTable().resolve(g_min=1e-6, g_max=3e-6)
    assert bare.pulse_s == 80e-9 and bare.pulse_j == pytest.approx(4.0 * 2e-6 * 80e-9, rel=1e-12)
    with pytest.raises(ValueError, match="g_min and g_max"):
        HardwareTable().resolve(g_min=1e-6)


def test_an_engine_that_keeps_time_without_recording_runs_the_same_clock():
    ops = (("forward", (8,), {}), ("backward", (8,), {}), ("program", ("fc", 100, 16), {}),
           ("perturb", ("fc", 3, 8), {}), ("digital", ("fc", 77), {}))
    layers = [LayerFootprint("fc", tiles=2, tile_rows=16, tile_cols=10)]
    on = Engine(hand_table(), layers)
    quiet = Engine(hand_table(), layers, enabled=False, keep_time=True)
    off = Engine(hand_table(), layers, enabled=False)
    assert (on.timed, quiet.timed, off.timed) == (True, True, False)
    for eng in (on, quiet, off):
        run(eng, *ops)
    assert quiet.env.now == on.env.now > 0 and off.env.now == 0
    assert len(quiet.events()) == 0 and quiet.totals["energy_j"] == 0 and quiet.totals["pulses"] == 0
    assert math.isnan(quiet.mark_epoch(1)["sim_time_s"]) and quiet.epochs == []


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_pipeline_is_fill_plus_slowest_stage(batch):
    # three layers of different speeds: stages 1*(10+ceil(8/4)*1+2) = 14, 3*(10+4+2) = 48, 2*(10+1+2) = 26
    layers = [LayerFootprint("a", 1, 32, 8), LayerFootprint("b", 3, 8, 16, reads_per_sample=3),
              LayerFootprint("c", 2, 16, 4, reads_per_sample=2)]
    eng = Engine(hand_table(), layers)
    run(eng, ("forward", (batch,), {}))
    stages = np.array([14, 48, 26]) * 1e-9
    assert eng.env.now == pytest.approx(stages.sum() + (batch - 1) * stages.max(), rel=1e-12)
    reads = eng.events()[eng.events()["op"] == b"read"]
    assert [n.decode() for n in reads["layer"]] == ["a", "b", "c"]
    np.testing.assert_allclose(reads["t_s"], [0, 14e-9, 62e-9], rtol=1e-12)   # pipeline fill
    assert reads["count"].tolist() == [batch * 1 * 1, batch * 3 * 3, batch * 2 * 2]


def test_backward_runs_in_reverse_order_and_a_subset_of_layers():
    layers = [LayerFootprint("a", 1, 32, 8), LayerFootprint("b", 1, 8, 16), LayerFootprint("c", 1, 16, 4)]
    eng = Engine(hand_table(), layers)
    run(eng, ("backward", (5,), {"layers": ["b", "c"]}))
    ev = eng.events()
    assert [n.decode() for n in ev["layer"][ev["op"] == b"read_t"]] == ["c", "b"]
    # transposed stages: c: 10 + ceil(16/4)*1 + 3 = 17; b: 10 + ceil(8/4) + 3 = 15 -> 32 + 4*17
    assert eng.env.now == pytest.approx((32 + 4 * 17) * 1e-9, rel=1e-12)


def test_shared_adcs_make_columns_wait():
    # Only the conversions take time, so the pass time is the conversion part alone.
    def conversion_time(adcs, cols):
        table = hand_table(read_s=0.0, neuron_s=0.0, adcs_per_tile=adcs)
        eng = Engine(table, [LayerFootprint("x", 1, 4, cols)])
        run(eng, ("forward", (1,), {}))
        return eng.env.now, eng.totals["energy_j"]

    t8, e8 = conversion_time(8, 128)
    t16, e16 = conversion_time(16, 128)
    assert t8 == pytest.approx(16e-9) and t16 == pytest.approx(8e-9)   # 128/8 and 128/16 rounds
    assert e8 == pytest.approx(e16)                                     # same conversions, same energy
    t8, _ = conversion_time(8, 100)
    t16, _ = conversion_time(16, 100)
    assert (t8, t16) == (pytest.approx(13e-9), pytest.approx(7e-9))     # ceil(100/8), ceil(100/16)


@pytest.mark.parametrize(("pulses", "slots", "cell_reads", "bias"), [(0, 0, 0, 0), (0, 0, 0, 6), (8, 4, 0, 0),
                                                                     (8, 5, 12, 0)])
def test_perturb_cost_is_the_measurements_plus_what_perturbing_and_restoring_did(pulses, slots, cell_reads, bias):
    layers = [LayerFootprint("a", 1, 32, 8), LayerFootprint("b", 1, 8, 16)]
    fwd = Engine(hand_table(), layers)
    run(fwd, ("forward", (4,), {}))
    t_fwd, e_fwd = fwd.env.now, fwd.totals["energy_j"]
    hw = hand_table()
    for p in (1, 3, 10):
        eng = Engine(hand_table(), layers)
        run(eng, ("perturb", ("b", p, 4), {"pulses": p * pulses, "pulse_slots": p * slots,
                                          "cell_reads": p * cell_reads, "bias_changes": p * bias}))
        each_s = t_fwd + slots * hw.pulse_s + cell_reads * (hw.read_s + hw.adc_s) + bias * hw.bias_s
        each_j = e_fwd + pulses * hw.pulse_j + cell_reads * (hw.read_j + hw.adc_j) + bias * hw.bias_j
        assert eng.env.now == pytest.approx(p * each_s, rel=1e-12)
        assert eng.totals["energy_j"] == pytest.approx(p * each_j, rel=1e-12)
        assert eng.totals["perturbations"] == p
        assert eng.totals["pulses"] == p * pulses
        assert eng.totals["reads"] == p * (fwd.totals["reads"] + cell_reads)
        ev = eng.events()
        assert len(ev) == 1 and ev[0]["op"] == b"perturb" and ev[0]["count"] == p   # one grouped event


@pytest.mark.parametrize(("ops", "lanes", "clocks"), [(1000, 10, 100), (1001, 10, 101), (5, 10, 1),
                                                      (1000, 1000, 1), (0, 10, 0)])
def test_digital_unit_runs_lanes_in_parallel(ops, lanes, clocks):
    eng = Engine(hand_table(digital_lanes=lanes), [LayerFootprint("x", 1, 4, 4)])
    run(eng, ("digital", ("update", ops), {}))
    assert eng.env.now == pytest.approx(clocks * 1e-9)
    assert eng.totals["energy_j"] == pytest.approx(ops * 4e-12)   # energy does not depend on lanes
    assert eng.totals["digital_ops"] == ops


def test_digital_backward_counts_given_macs_layer_after_layer():
    layers = [LayerFootprint("a", 2, 32, 8), LayerFootprint("b", 1, 8, 16)]
    eng = Engine(hand_table(), layers)
    run(eng, ("backward", (3,), {"transposed": False, "macs": {"b": 95}}))
    ev = eng.events()
    assert ev["op"].tolist() == [b"digital", b"digital"] and ev["layer"].tolist() == [b"b", b"a"]
    # b: 95 given -> 10 clocks; a: default 3*1*2*32*8 = 1536 -> 154 clocks; sequential on one unit
    assert ev["count"].tolist() == [95, 1536]
    np.testing.assert_allclose(ev["t_s"], [0, 10e-9], rtol=1e-12)
    assert eng.env.now == pytest.approx(164e-9, rel=1e-12)


def test_operations_on_shared_resources_wait_and_others_overlap():
    layers = [LayerFootprint("a", 1, 32, 8), LayerFootprint("b", 1, 8, 16)]
    eng = Engine(hand_table(), layers)

    def trainer():
        # programming two layers at once overlaps: the clock advances by the longer one
        yield eng.parallel(eng.program("a", 10, 4), eng.program("b", 10, 6))
        assert eng.env.now == pytest.approx(300e-9)
        # two passes over the same tiles cannot overlap: the second starts when the first ends
        first, second = eng.forward(2), eng.forward(2)
        yield eng.parallel(first, second)

    eng.start(trainer())
    # stages a: 10 + ceil(8/4) + 2 = 14 ns, b: 10 + ceil(16/4) + 2 = 16 ns; batch 2: 30 + 16 = 46 ns
    fwd_time = 46e-9
    reads = eng.events()[eng.events()["op"] == b"read"]
    np.testing.assert_allclose(reads["t_s"][reads["layer"] == b"a"], [300e-9, 300e-9 + fwd_time], rtol=1e-12)
    assert eng.env.now == pytest.approx(300e-9 + 2 * fwd_time, rel=1e-12)


def test_epochs_keep_cumulative_values_and_deltas():
    eng = Engine(hand_table(), [LayerFootprint("x", 1, 4, 4)])
    out = []

    def trainer():
        for epoch in range(3):
            for _ in range(epoch + 1):                   # epoch e programs e+1 times
                yield eng.program("x", 5, 2)
            out.append(eng.mark_epoch(epoch))

    eng.start(trainer())
    assert [r["pulses"] for r in out] == [5, 15, 30]
    assert [r["delta_pulses"] for r in out] == [5, 10, 15]
    np.testing.assert_allclose([r["sim_time_s"] for r in out], np.array([1, 3, 6]) * 100e-9, rtol=1e-12)
    np.testing.assert_allclose([r["delta_energy_j"] for r in out], np.array([5, 10, 15]) * 1e-12, rtol=1e-12)
    m = eng.metrics()
    assert m["epoch"].tolist() == [0, 1, 2] and m["pulses"].tolist() == [5, 15, 30]
    assert set(out[0]) >= {"epoch", "sim_time_s", "energy_j", "pulses", "perturbations", "reads",
                           "adc_conversions", "digital_ops"}


def test_disabled_engine_records_nothing_and_schedules_nothing():
    eng = Engine(hand_table(), [LayerFootprint("x", 1, 4, 4)], enabled=False)
    seen = []

    def trainer():
        for _ in range(3):
            seen.append((yield eng.forward(4)))
            yield eng.backward(4)
            yield eng.program("x", 10, 2)
            yield eng.perturb("x", 7, 4)
            yield eng.digital("x", 100)
        return "done"

    assert eng.start(trainer()) == "done"
    assert seen == [None, None, None]
    assert eng.env.now == 0 and eng.env.peek() == math.inf        # no simpy event was ever scheduled
    assert len(eng.events()) == 0 and eng.events().dtype == EVENT_DTYPE
    assert all(v == 0 for v in eng.totals.values())
    row = eng.mark_epoch(0)
    assert math.isnan(row["sim_time_s"]) and math.isnan(row["energy_j"]) and eng.epochs == []


def test_events_have_the_documented_layout_and_fit_hdf5(tmp_path):
    eng = Engine(hand_table(), [LayerFootprint("conv1", 2, 27, 16, reads_per_sample=9)])
    run(eng, ("forward", (2,), {}), ("perturb", ("conv1", 3, 2), {}), ("digital", ("conv1", 50), {}))
    ev = eng.events()
    assert ev.dtype == EVENT_DTYPE
    assert ev.dtype.names == ("t_s", "duration_s", "op", "layer", "count", "energy_j")
    assert [ev.dtype[n].kind for n in ev.dtype.names] == ["f", "f", "S", "S", "i", "f"]
    assert np.all(np.diff(ev["t_s"]) >= 0)
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["events"] = ev
    with h5py.File(tmp_path / "run.h5", "r") as f:
        back = f["events"][()]
    assert back.tolist() == ev.tolist()


def test_bad_hardware_values_are_refused_naming_the_field():
    with pytest.raises(ConfigError) as err:
        build(HardwareTable, {"pulse_s": -1e-9}, source="s.toml")
    assert err.value.field == "pulse_s" and err.value.value == -1e-9 and "s.toml" in str(err.value)
    with pytest.raises(ConfigError, match="read_s"):
        HardwareTable(read_s=-1.0)
    with pytest.raises(ConfigError, match="adcs_per_tile"):
        build(HardwareTable, {"adcs_per_tile": 0})
    with pytest.raises(ConfigError, match="adc_j"):
        build(HardwareTable, {"adc_j": float("nan")})
    with pytest.raises(ConfigError, match="adc_speed"):
        build(HardwareTable, {"adc_speed": 1.0})


def test_bad_layers_and_arguments_are_refused():
    with pytest.raises(ConfigError, match="tile_cols"):
        LayerFootprint("x", 1, 4, 0)
    with pytest.raises(ConfigError, match="same name"):
        Engine(hand_table(), [LayerFootprint("x", 1, 4, 4), LayerFootprint("x", 1, 4, 4)])
    eng = Engine(hand_table(), [LayerFootprint("x", 1, 4, 4)])
    with pytest.raises(ValueError, match="unknown layer"):
        eng.program("y", 1, 1)
    with pytest.raises(ValueError, match="pulses"):
        eng.program("x", -1, 1)
    with pytest.raises(ValueError, match="batch"):
        eng.forward(0)
