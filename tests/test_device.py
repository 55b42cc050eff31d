"""Device model: pulse response, finite states, bounds, spreads, faults, drift, determinism, card validation."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from neurosim.backend import make_generator
from neurosim.cli import main
from neurosim.config import ConfigError
from neurosim.device import DeviceArray, load_card, shipped_card_paths, shipped_cards
from neurosim.nonlinearity import MAX_LABEL, a_from_label, label_from_a, pulse_response


def array(spec, shape=(64, 64), seed=0, dtype=torch.float64):
    return DeviceArray(spec, shape, make_generator(seed, "cpu", "cells"), dtype=dtype,
                       noise_generator=make_generator(seed, "cpu", "noise"))


@pytest.mark.parametrize("a_ltp,a_ltd", [(None, None), (0.25, 0.6), (2.0, 0.1)])
def test_distinct_levels_equal_states_and_stay_in_bounds(spec_factory, a_ltp, a_ltd):
    spec = spec_factory(states=33, a_ltp=a_ltp, a_ltd=a_ltd)
    cells = array(spec, (1, 1))
    seen = [float(cells.g)]
    for _ in range(spec.states + 10):  # 10 more pulses than needed: the top is a bound, not a new level
        cells.program(torch.ones(1, 1))
        seen.append(float(cells.g))
    span = spec.g_max - spec.g_min
    levels = {round((g - spec.g_min) / span * 1e9) for g in seen}
    assert len(levels) == spec.states
    assert min(seen) >= spec.g_min and max(seen) <= spec.g_max * (1 + 1e-12)
    # Random pulse trains of both polarities never leave the window either.
    many = array(spec, (32, 32), seed=3)
    g = make_generator(5, "cpu", "pulses")
    for _ in range(50):
        many.program(torch.randint(-8, 9, (32, 32), generator=g).double())
        assert bool((many.g >= many.g_min).all()) and bool((many.g <= many.g_max).all())


@pytest.mark.parametrize("label", [0.5, 1.0, 2.4, 4.88])
def test_potentiation_curve_matches_closed_form(spec_factory, label):
    """G(p) = B(1 − exp(−p/A)) + Gmin with B = (Gmax − Gmin)/(1 − exp(−P/A)), A from the label."""
    spec = spec_factory(states=97, nl_ltp=label, nl_ltd=-label)
    P = spec.states - 1
    A = a_from_label(label) * P
    B = (spec.g_max - spec.g_min) / (1 - math.exp(-P / A))
    cells = array(spec, (1, 1))
    for p in range(1, P + 1):
        cells.program(torch.ones(1, 1))
        expected = B * (1 - math.exp(-p / A)) + spec.g_min
        assert float(cells.g) == pytest.approx(expected, rel=1e-9)
    # Depression mirrors the curve from g_max with its own label.
    for q in range(1, P + 1):
        cells.program(-torch.ones(1, 1))
        expected = spec.g_max - B * (1 - math.exp(-q / A))
        assert float(cells.g) == pytest.approx(expected, rel=1e-9, abs=1e-12 * spec.g_max)


def test_shipped_cards_follow_their_published_curve():
    for name, spec in shipped_cards().items():
        a = spec.a_norm("ltp")
        P = spec.pulses_ltp
        cells = array(spec, (1, 1))
        pulses = torch.arange(1, P + 1, dtype=torch.float64)
        got = []
        for _ in range(P):
            cells.program(torch.ones(1, 1))
            got.append(float(cells.g))
        if math.isinf(a):
            expected = spec.g_min + (spec.g_max - spec.g_min) * pulses / P
        else:
            A = a * P
            expected = spec.g_min + (spec.g_max - spec.g_min) * (1 - torch.exp(-pulses / A)) / (1 - math.exp(-P / A))
        if spec.c2c == 0:
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), expected, rtol=1e-6, atol=0,
                                       msg=name)
        else:  # noisy card: mean curve only; check the noise-free model through after_pulses instead
            cells = array(spec, (1, 1))
            for p in range(P):
                cells.g = cells.after_pulses(torch.ones(1, 1), noise=False)
                assert float(cells.g) == pytest.approx(float(expected[p]), rel=1e-6), name


def test_device_to_device_spreads_match_sigma(spec_factory):
    sigma = {"g_min_dtod": 0.10, "g_max_dtod": 0.05, "step_dtod": 0.2}
    spec = spec_factory(a_ltp=0.5, nl_ltd=-3.0, nl_dtod=0.15, **sigma)
    cells = array(spec, (100, 100))
    n = 100 * 100
    # The standard error of a sample standard deviation of n normal draws is sigma/sqrt(2(n−1)): allow 5 of them.
    for field, values, nominal, s in (("g_min", cells.g_min, spec.g_min, 0.10),
                                      ("g_max", cells.g_max, spec.g_max, 0.05),
                                      ("step", cells.step, 1.0, 0.2)):
        rel = values / nominal
        tol = 5 * s / math.sqrt(2 * (n - 1))
        assert float(rel.std()) == pytest.approx(s, abs=tol), field
        assert float(rel.mean()) == pytest.approx(1.0, abs=5 * s / math.sqrt(n)), field
    # The nonlinearity spreads on the label, absolute (NeuroSim's sigmaDtoD), each polarity on its own draw.
    for values, nominal in ((cells.a_ltp, label_from_a(0.5)), (cells.a_ltd, 3.0)):
        labels = torch.from_numpy(label_from_a(values.numpy()))
        assert float(labels.std()) == pytest.approx(0.15, abs=5 * 0.15 / math.sqrt(2 * (n - 1)))
        assert float(labels.mean()) == pytest.approx(nominal, abs=5 * 0.15 / math.sqrt(n))
    r = float(torch.corrcoef(torch.stack([cells.a_ltp.reshape(-1), cells.a_ltd.reshape(-1)]))[0, 1])
    assert abs(r) < 5 / math.sqrt(n)


@pytest.mark.parametrize("nominal,sigma", [(0.0, 1.0), (9.0, 1.0), (2.4, 10.0)])
def test_nonlinearity_spread_is_a_truncated_gaussian_on_the_label(spec_factory, nominal, sigma):
    """Labels N(nominal, sigma²) conditioned on |label| < MAX_LABEL: the distribution (Kolmogorov-Smirnov
    distance below 2/sqrt(n), which a correct sampler exceeds with probability 1e-3; the seed is fixed), no
    pile-up at the step response (a clamp would put P(label > MAX) there: 14 % at nominal 9), and a linear
    card's spread is not zero: its cells bend both ways."""
    from scipy.stats import kstest, truncnorm

    spec = spec_factory(states=33, nl_ltp=nominal, nl_dtod=sigma)
    cells = array(spec, (100, 100))
    labels = label_from_a(cells.a_ltp.reshape(-1).numpy())
    n = labels.size
    lo, hi = (-MAX_LABEL - nominal) / sigma, (MAX_LABEL - nominal) / sigma
    stat = kstest(labels, truncnorm(lo, hi, loc=nominal, scale=sigma).cdf).statistic
    assert stat < 2 / math.sqrt(n)
    assert np.abs(labels).max() < MAX_LABEL
    near_edge = truncnorm(lo, hi, loc=nominal, scale=sigma).sf(MAX_LABEL - 0.01) * n  # expected count there
    assert (labels > MAX_LABEL - 0.01).sum() <= near_edge + 5 * math.sqrt(near_edge) + 1
    if nominal == 0.0:
        convex = float((cells.a_ltp < 0).double().mean())
        assert abs(convex - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert bool(torch.isfinite(cells.a_ltp).all()) and bool((cells.a_ltp != 0).all())


def test_a_huge_label_spread_tends_to_the_uniform_distribution(spec_factory):
    from scipy.stats import kstest, uniform

    cells = array(spec_factory(states=33, nl_ltp=2.0, nl_dtod=1e12), (100, 100))
    labels = label_from_a(cells.a_ltp.reshape(-1).numpy())
    assert kstest(labels, uniform(-MAX_LABEL, 2 * MAX_LABEL).cdf).statistic < 2 / math.sqrt(labels.size)


def test_every_cell_follows_its_own_closed_form_curve_both_ways(spec_factory):
    """With label spreads (labels of both signs, up to |label| 6-8), each cell's pulses follow
    g_min + span·pulse_response(p, P, a_cell) up and g_max − span·pulse_response(q, P, a_cell) down, a negative
    a being the point-reflected curve (NeuroSim's getParamA of a negative label)."""
    spec = spec_factory(states=33, nl_ltp=0.5, nl_ltd=-0.5, nl_dtod=2.5)
    cells = array(spec, (16, 16))
    a_ltp, a_ltd = cells.a_ltp.numpy(), cells.a_ltd.numpy()
    assert (a_ltp < 0).any() and (a_ltp > 0).any() and (np.abs(a_ltp) < 0.15).any()  # labels beyond ±6
    span, P = spec.g_max - spec.g_min, spec.pulses_ltp
    for p in range(1, P + 3):
        cells.program(torch.ones(16, 16, dtype=torch.float64))
        expected = spec.g_min + span * pulse_response(min(p, P), P, a_ltp)
        np.testing.assert_allclose(cells.g.numpy(), expected, rtol=1e-9, atol=1e-12 * span)
    for q in range(1, P + 3):
        cells.program(-torch.ones(16, 16, dtype=torch.float64))
        expected = spec.g_max - span * pulse_response(min(q, P), P, a_ltd)
        np.testing.assert_allclose(cells.g.numpy(), expected, rtol=1e-9, atol=1e-12 * span)


def test_cycle_to_cycle_noise_matches_sigma(spec_factory):
    spec = spec_factory(states=1001, c2c=0.01)  # linear: the nominal step is exactly span/1000
    span = spec.g_max - spec.g_min
    n = 200 * 200
    for pulses in (1, 4):
        cells = array(spec, (200, 200))
        cells.set_conductance(torch.full((200, 200), spec.g_min + 0.5 * span, dtype=torch.float64))
        before = cells.g.clone()
        cells.program(torch.full((200, 200), float(pulses), dtype=torch.float64))
        noise = (cells.g - before - pulses * span / 1000) / span
        expected = 0.01 * math.sqrt(pulses)
        assert float(noise.std()) == pytest.approx(expected, abs=5 * expected / math.sqrt(2 * (n - 1)))
        assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n)


def test_read_noise_matches_sigma(spec_factory):
    spec = spec_factory(read_noise=0.03)
    cells = array(spec, (200, 200))
    rel = cells.read() / cells.g - 1
    n = 200 * 200
    assert float(rel.std()) == pytest.approx(0.03, abs=5 * 0.03 / math.sqrt(2 * (n - 1)))
    assert torch.equal(cells.conductance(), cells.g)  # the noise-free state is untouched by reads


def test_stuck_at_faults(spec_factory):
    spec = spec_factory(stuck_at_gmin=0.05, stuck_at_gmax=0.02)
    cells = array(spec, (200, 200))
    n = 200 * 200
    for mask, rate in ((cells.stuck_low, 0.05), (cells.stuck_high, 0.02)):
        # Binomial count: standard deviation sqrt(n p (1 − p)); allow 5 of them.
        assert abs(int(mask.sum()) - n * rate) < 5 * math.sqrt(n * rate * (1 - rate))
    cells.program(torch.full((200, 200), 10.0, dtype=torch.float64))
    g_min, g_max = cells.g_min.expand(cells.shape), cells.g_max.expand(cells.shape)
    assert torch.equal(cells.g[cells.stuck_low], g_min[cells.stuck_low])
    assert torch.equal(cells.g[cells.stuck_high], g_max[cells.stuck_high])
    free = ~cells.stuck
    assert bool((cells.g[free] > g_min[free]).all())


@pytest.mark.parametrize("spread", [0.0, 0.1])
@pytest.mark.parametrize("labels", [(0.0, 0.0), (2.4, -4.88), (0.0, -3.0)])
def test_sparse_pulse_path_equals_the_whole_array_path(spec_factory, spread, labels):
    # One program of every cell (the gather-free path) and two programs of halves (the packed-table gather)
    # move every cell by the same pulses: the conductances agree to float64 rounding, both polarities,
    # linear and nonlinear curves, with and without d2d spreads and stuck cells.
    spec = spec_factory(states=65, nl_ltp=labels[0], nl_ltd=labels[1], g_min_dtod=spread, g_max_dtod=spread,
                        nl_dtod=spread, step_dtod=spread, stuck_at_gmin=0.05, stuck_at_gmax=0.05)
    n = torch.randint(-6, 7, (32, 32), generator=torch.Generator().manual_seed(1)).double()
    n[n == 0] = 1.0
    whole, halves = array(spec, (32, 32)), array(spec, (32, 32))
    start = torch.rand(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cells in (whole, halves):
        cells.set_conductance(spec.g_min + start * (spec.g_max - spec.g_min))
    whole.program(n)
    flat = n.reshape(-1)
    for part in (torch.arange(0, 1024, 2), torch.arange(1, 1024, 2)):
        halves.program_cells(part, flat[part])
    torch.testing.assert_close(halves.g, whole.g, rtol=1e-12, atol=1e-12 * spec.g_max)
    assert torch.equal(whole.g[whole.stuck], halves.g[halves.stuck])
    stuck_value = torch.where(whole.stuck_low, whole.g_min.expand(whole.shape), whole.g_max.expand(whole.shape))
    assert torch.equal(whole.g[whole.stuck], stuck_value[whole.stuck])


@pytest.mark.parametrize("varied", [True, False])
def test_program_pair_moves_both_devices_as_two_single_programs(spec_factory, varied):
    # The pair pass (one gather of the shared table, one chain over both devices) against two program_cells
    # calls: same conductances; per-cell tables (spreads, stuck cells) and the one-row-per-polarity table.
    from neurosim.device import pair_arrays, program_pair

    extra = {"g_min_dtod": 0.1, "g_max_dtod": 0.1, "nl_dtod": 0.1, "step_dtod": 0.1, "stuck_at_gmin": 0.05}
    spec = spec_factory(states=65, nl_ltp=2.4, nl_ltd=-4.88, **(extra if varied else {}))
    noise = make_generator(0, "cpu", "noise")
    pair = [DeviceArray(spec, (32, 32), make_generator(0, "cpu", name), dtype=torch.float64,
                        noise_generator=noise) for name in ("plus", "minus")]
    single = [DeviceArray(spec, (32, 32), make_generator(0, "cpu", name), dtype=torch.float64,
                          noise_generator=noise) for name in ("plus", "minus")]
    start = torch.rand(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cells in (*pair, *single):
        cells.set_conductance(spec.g_min + start * (spec.g_max - spec.g_min))
    before = pair[0].g.clone()
    idx = torch.randperm(1024, generator=torch.Generator().manual_seed(3))[:300]
    counts = torch.randint(1, 5, (300,), generator=torch.Generator().manual_seed(4)).double()
    counts[::2] *= -1
    pair_arrays(pair[0], pair[1])
    assert program_pair(pair[0], pair[1], idx, counts) is not None      # the paired path, not the fallback
    single[0].program_cells(idx, counts)
    single[1].program_cells(idx, -counts)
    for a, b in zip(pair, single, strict=True):
        torch.testing.assert_close(a.g, b.g, rtol=1e-12, atol=1e-12 * spec.g_max)
    assert int((pair[0].g != before).sum()) > 250   # the pulses did move the free cells (≤ 5% are stuck)


def test_every_cell_in_any_order_is_the_whole_array_path(spec_factory):
    # The sparse sampler returns cells in no order; when it happens to return every cell, counts must still
    # land on their own cells.
    spec = spec_factory(states=65, nl_ltp=2.0, nl_ltd=-3.0, g_min_dtod=0.1)
    n = torch.randint(1, 6, (16, 16), generator=torch.Generator().manual_seed(1)).double()
    n[::2] *= -1
    ordered, shuffled = array(spec, (16, 16)), array(spec, (16, 16))
    for cells in (ordered, shuffled):
        cells.set_conductance(torch.full((16, 16), 0.5 * (spec.g_min + spec.g_max), dtype=torch.float64))
    ordered.program(n)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(2))
    shuffled.program_cells(perm, n.reshape(-1)[perm])
    assert torch.equal(ordered.g, shuffled.g)


def test_stuck_cells_do_not_drift(spec_factory):
    spec = spec_factory(drift_nu=0.1, drift_t0=1.0, stuck_at_gmin=0.1, stuck_at_gmax=0.1)
    cells = array(spec, (40, 40))
    cells.set_conductance(torch.full((40, 40), 0.5 * (spec.g_min + spec.g_max), dtype=torch.float64))
    cells.advance(100.0)
    g = cells.conductance()
    assert torch.equal(g[cells.stuck], cells.g[cells.stuck])
    assert bool((g[~cells.stuck] < cells.g[~cells.stuck]).all())


def test_drift_follows_power_law(spec_factory):
    spec = spec_factory(drift_nu=0.06, drift_t0=1.0)
    cells = array(spec, (4, 4))
    cells.set_conductance(torch.full((4, 4), 5e-6, dtype=torch.float64))
    g0 = cells.g.clone()
    cells.advance(0.5)  # before t0 nothing has drifted
    assert torch.equal(cells.conductance(), cells.g)
    cells.advance(999.5)
    torch.testing.assert_close(cells.conductance(), g0 * 1000 ** -0.06, rtol=1e-12, atol=0)


def test_same_seed_same_tensors_other_seed_other_samples(spec_factory):
    spec = spec_factory(g_min_dtod=0.1, g_max_dtod=0.1, nl_dtod=0.1, a_ltp=0.4, c2c=0.02, read_noise=0.01,
                        stuck_at_gmin=0.01)

    def run(seed):
        cells = array(spec, (32, 32), seed=seed)
        cells.program(torch.full((32, 32), 3.0, dtype=torch.float64))
        return {**cells.state_dict(), "read": cells.read()}

    a, b, c = run(1), run(1), run(2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["g_min"], c["g_min"])
    assert not torch.equal(a["g"], c["g"])


def test_every_shipped_card_loads():
    paths = shipped_card_paths()
    for required in ("ideal", "ag_asi", "taox_hfox", "pcmo", "alox_hfo2", "gst_pcm", "epiram", "hzo_fefet"):
        assert required in paths, required
    assert len(paths) >= 10
    for name in paths:
        spec = load_card(name)
        assert spec.g_max > spec.g_min > 0
        assert spec.source


GOOD = """name = "mine"
g_min = 1e-6
g_max = 1e-5
states = 64
nl_ltp = 1.0
[source]
g_min = "a paper"
g_max = "a paper"
states = "a paper"
nl_ltp = "a paper"
"""


@pytest.mark.parametrize("text,field", [
    (GOOD.replace('g_max = 1e-5\n', ''), "g_max"),                                  # missing field
    (GOOD.replace('states = 64', 'states = 64\ncolour = "red"'), "colour"),         # unknown field
    (GOOD.replace('g_max = 1e-5', 'g_max = 1e-7'), "g_max"),                        # Gmin >= Gmax
    (GOOD.replace('nl_ltp = 1.0', 'nl_ltp = 1.0\nc2c = -0.1').replace('[source]', '[source]\nc2c = "x"'), "c2c"),
    (GOOD.replace('states = 64', 'states = 1'), "states"),                          # too few states
    (GOOD.replace('states = 64', 'states = "many"'), "states"),                     # wrong type
    (GOOD.replace('g_min = 1e-6', 'g_min = -1e-6'), "g_min"),                       # negative conductance
    (GOOD.replace('nl_ltp = 1.0', 'nl_ltp = 25.0'), "nl_ltp"),                      # beyond a step response
    (GOOD.replace('nl_ltp = 1.0', 'nl_ltp = 1.0\nread_noise = 0.3').replace('[source]', '[source]\nread_noise = "x"'),
     "read_noise"),                                                                   # reads clamp at 0 too often
    (GOOD.replace('g_max = 1e-5', 'g_max = 5.0'), "g_max"),                          # not a device (5 S)
    (GOOD.replace('g_min = 1e-6', 'g_min = 1e-18'), "g_min"),
    (GOOD.replace('states = 64', 'states = 60000'), "states"),                      # steps finer than float32
    (GOOD.replace('g_max = 1e-5', 'g_max = 1.000001e-6').replace('states = 64', 'states = 2'), "g_max"),
    (GOOD.replace('states = "a paper"\n', ''), "source.states"),                    # number without a source
    ("name = [unclosed", "not valid TOML"),                                          # not TOML at all
])
def test_bad_cards_are_refused_with_the_field_named(tmp_path, capsys, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_card(path)
    assert field in str(e.value) and str(path) in str(e.value)
    assert main(["devices", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and str(path) in lines[0]


def test_bad_card_through_the_installed_command_prints_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace('g_max = 1e-5', 'g_max = 1e-7'))
    proc = subprocess.run([sys.executable, "-m", "neurosim.cli", "devices", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_good_card_and_missing_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    assert main(["devices", str(path)]) == 0
    assert "mine" in capsys.readouterr().out
    assert main(["devices", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["devices"]) == 0
    assert "Ag:a-Si" in capsys.readouterr().out


@pytest.mark.parametrize("fields", [{"states": 2}, {"states": 5, "nl_ltp": 3.0},
                                    {"states": 9, "nl_ltp": 1.0, "nl_dtod": 3.0, "step_dtod": 0.3,
                                     "g_min_dtod": 0.2, "g_max_dtod": 0.2, "stuck_at_gmin": 0.05}])
def test_idealized_writes_land_on_levels_pulses_reach(spec_factory, fields):
    """set_conductance puts each cell on the level nearest the target among those its own potentiation pulses
    reach from g_min (found here by pulsing a twin array one pulse at a time), so a device of few states holds
    few values; stuck cells stay stuck."""
    spec = spec_factory(**fields)
    cells, twin = array(spec, (24, 24)), array(spec, (24, 24))    # same seed: the same sampled cells
    levels = [twin.g.clone()]
    while True:
        twin.program(torch.ones(24, 24, dtype=torch.float64))
        if torch.equal(twin.g, levels[-1]):
            break
        levels.append(twin.g.clone())
    levels = torch.stack(levels)                                     # (levels, 24, 24)
    target = spec.g_min + torch.rand(24, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64) \
        * (spec.g_max - spec.g_min) * 1.2
    cells.set_conductance(target)
    nearest = levels.gather(0, (levels - target).abs().argmin(0, keepdim=True))[0]
    free = ~cells.stuck
    torch.testing.assert_close(cells.g[free], nearest[free], rtol=1e-10, atol=0)  # float64, two paths of arithmetic
    if spec.stuck_at_gmin:
        assert torch.equal(cells.g[cells.stuck], cells.g_min.expand(cells.shape)[cells.stuck])
    if "nl_dtod" not in fields:
        assert len(torch.unique(cells.g)) <= spec.states
    analog = array(spec, (24, 24))
    analog.set_conductance(target, snap=False)
    assert len(torch.unique(analog.g)) > spec.states  # the reference placement keeps analog values


def test_crossbar_set_weights_holds_levels_and_the_controller_knows_them(spec_factory):
    from neurosim.crossbar import Crossbar

    spec = spec_factory(states=2)
    bar = Crossbar(spec, 40, 26, seed=0, dtype=torch.float64)
    w = torch.rand(40, 26, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    bar.set_weights(w)
    assert set(torch.unique(torch.cat([bar.plus.g, bar.minus.g])).tolist()) <= {spec.g_min, spec.g_max}
    assert set(torch.unique(bar.weights()).tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(bar.believed, bar.weights(), rtol=0, atol=0)  # no spread: belief = chip
    bar.set_weights(w, snap=False)
    torch.testing.assert_close(bar.weights(), w, rtol=1e-12, atol=1e-12)
    # With spreads the chip's levels are each cell's own; the controller believes the nominal card's.
    nominal = Crossbar(spec_factory(states=9), 40, 26, seed=0, dtype=torch.float64)
    varied = Crossbar(spec_factory(states=9, g_min_dtod=0.2, step_dtod=0.2), 40, 26, seed=0, dtype=torch.float64)
    for b in (nominal, varied):
        b.set_weights(w)
    assert torch.equal(varied.believed, nominal.weights()) and not torch.equal(varied.weights(), nominal.weights())


@pytest.mark.parametrize("labels", [(0.0, 0.0), (2.4, -4.88)])
def test_a_pulse_starts_from_the_drifted_conductance(spec_factory, labels):
    """Drift lowers G(t) = G·(age/t0)^-nu; a pulse moves the cell from there and restarts its age, on the whole-
    array path, the sparse path and the paired path alike (the same numbers as pulsing a cell placed at the
    drifted value without drift)."""
    from neurosim.device import pair_arrays, program_pair

    drifting = spec_factory(states=65, nl_ltp=labels[0], nl_ltd=labels[1], drift_nu=0.1, drift_t0=1.0)
    still = spec_factory(states=65, nl_ltp=labels[0], nl_ltd=labels[1])
    n = torch.randint(-4, 5, (16, 16), generator=torch.Generator().manual_seed(1)).double()
    n[n == 0] = 2.0
    start = spec_factory().g_min + torch.rand(16, 16, generator=torch.Generator().manual_seed(2),
                                              dtype=torch.float64) * 9e-6
    whole, sparse = array(drifting, (16, 16)), array(drifting, (16, 16))
    pair = [array(drifting, (16, 16)), array(drifting, (16, 16), seed=1)]
    pair_arrays(*pair)
    for cells in (whole, sparse, *pair):
        cells.set_conductance(start)
        cells.advance(500.0)
    drifted = whole.conductance().clone()
    reference = array(still, (16, 16))
    reference.set_conductance(drifted, snap=False)
    reference.program(n)
    whole.program(n)
    flat = n.reshape(-1)
    for part in (torch.arange(0, 256, 2), torch.arange(1, 256, 2)):
        sparse.program_cells(part, flat[part])
    idx = torch.arange(0, 256, 3)
    assert program_pair(pair[0], pair[1], idx, flat[idx]) is not None
    for cells in (whole, sparse):
        torch.testing.assert_close(cells.g, reference.g, rtol=1e-12, atol=0)
        assert torch.equal(cells.conductance(), cells.g)          # age restarted: nothing has drifted yet
    moved = torch.zeros(256, dtype=torch.bool)
    moved[idx] = True
    torch.testing.assert_close(pair[0].g.reshape(-1)[moved], reference.g.reshape(-1)[moved], rtol=1e-12, atol=0)
    assert torch.equal(pair[0].conductance().reshape(-1)[~moved], drifted.reshape(-1)[~moved])


def test_positions_and_pulse_counts_are_finite_at_the_window_edges(spec_factory):
    spec = spec_factory(states=1024, nl_ltp=9.9, nl_ltd=-9.9, nl_dtod=10.0, g_min_dtod=1.0, step_dtod=1.0)
    for dtype in (torch.float32, torch.float64):
        cells = DeviceArray(spec, (64, 64), make_generator(0, "cpu", "cells"), dtype=dtype)
        for g in (cells.g_min.expand(cells.shape), cells.g_max.expand(cells.shape),
                  torch.zeros(cells.shape, dtype=dtype), torch.full(cells.shape, 1.0, dtype=dtype)):
            p, q = cells.pulse_position(g)
            assert bool(torch.isfinite(p).all() and torch.isfinite(q).all())
            assert float(p.min()) >= 0 and float(p.max()) <= spec.pulses_ltp
            for target in (cells.g_min.expand(cells.shape), cells.g_max.expand(cells.shape)):
                assert bool(torch.isfinite(cells.pulses_for(target, g)).all())


def test_a_steep_convex_cell_crosses_its_flat_start_in_one_pulse_train(spec_factory):
    # Documented limit (docs/devices.md): a cell's state is its conductance, so a single pulse on the flat start
    # of a very steep convex curve (label below about -8.8 in float64) changes G by less than float resolution;
    # a train of n pulses in one write (what write-and-verify issues) moves it by n steps.
    spec = spec_factory(states=33, nl_ltp=0.0, nl_dtod=5.0)
    cells = array(spec, (64, 64))
    steep = torch.from_numpy(label_from_a(cells.a_ltp.numpy()) < -9.5)
    assert int(steep.sum()) > 20
    cells.program(torch.ones(64, 64, dtype=torch.float64))
    torch.testing.assert_close(cells.g[steep], torch.full_like(cells.g[steep], spec.g_min), rtol=1e-12, atol=0)
    cells.set_conductance(torch.full((64, 64), spec.g_min, dtype=torch.float64))
    cells.program(torch.full((64, 64), float(spec.pulses_ltp), dtype=torch.float64))
    torch.testing.assert_close(cells.g[steep], torch.full_like(cells.g[steep], spec.g_max), rtol=1e-12, atol=0)


def test_reads_are_never_negative_and_the_read_noise_bound(spec_factory):
    spec = spec_factory(read_noise=0.2)
    cells = array(spec, (200, 200))
    reads = torch.stack([cells.read() for _ in range(5)])
    assert float(reads.min()) >= 0.0
    rel = reads / cells.g - 1
    n = reads.numel()
    assert float(rel.std()) == pytest.approx(0.2, abs=5 * 0.2 / math.sqrt(2 * (n - 1)))
    with pytest.raises(ConfigError, match="read_noise"):
        spec_factory(read_noise=0.21)


def test_write_verify_counts_pulses_from_the_drifted_read(spec_factory):
    """After drift, one write-and-verify pass lands every device that needed pulses within half a step of its
    target: the count comes from the (drifted) read and the pulses start from that same conductance."""
    from neurosim.crossbar import Crossbar

    spec = spec_factory(states=257, drift_nu=0.1, drift_t0=1.0)
    bar = Crossbar(spec, 30, 20, seed=0, dtype=torch.float64)
    w1 = torch.rand(30, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5
    bar.set_weights(w1)
    bar.advance(1e4)                                 # G drops by 1e4^-0.1 = 0.40
    w2 = torch.rand(30, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    targets = bar.target_conductances(w2)
    stats = bar.write_verify(w2, tolerance=0.01, max_iterations=1)
    half_step = 0.5 * (spec.g_max - spec.g_min) / spec.pulses_ltp
    for cells, target in zip(bar._arrays(), targets, strict=True):
        err = (cells.conductance() - target)[:30, :20].abs()
        assert float(err.max()) <= half_step * (1 + 1e-9)
    assert stats["unconverged"] > 0        # the verify before the pulses saw every device off (drift)


def test_a_pair_pass_serves_a_convex_cell_of_either_device(spec_factory):
    """The paired pass uses one set of flags for both devices: a steep convex cell of the second device, pulsed
    across its flat start in one train, moves as it does on its own although the first device has none."""
    from neurosim.device import pair_arrays, program_pair

    spec = spec_factory(states=17, nl_ltp=0.0, nl_ltd=0.0, nl_dtod=20.0)
    seeds = (3, 10)  # found by search: the first array has no convex cell, the second a steep one in cell 0
    first, second = array(spec, (1, 3), seed=seeds[0]), array(spec, (1, 3), seed=seeds[1])
    assert not bool((first.a_ltp < 0).any() or (first.a_ltd < 0).any())
    assert label_from_a(float(second.a_ltp[0, 0])) < -9.5
    singles = [array(spec, (1, 3), seed=s) for s in seeds]
    pair_arrays(first, second)
    idx = torch.arange(2)                                        # two of the three cells: the paired pass
    counts = torch.tensor([-16.0, -16.0], dtype=torch.float64)   # second gets +16: across its whole LTP curve
    assert program_pair(first, second, idx, counts) is not None
    singles[0].program_cells(idx, counts)
    singles[1].program_cells(idx, -counts)
    for paired, single in zip((first, second), singles, strict=True):
        torch.testing.assert_close(paired.g, single.g, rtol=1e-12, atol=0)
    assert float(second.g[0, 0]) == pytest.approx(spec.g_max, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 3.0])
def test_relative_spreads_have_their_mean_and_sigma_and_no_pile_up(spec_factory, sigma):
    """g_min, g_max, step and drift-exponent spreads are lognormal with the nominal mean and relative sigma:
    every cell positive, no two cells on a common floor (a clamped Gaussian put 16 % on its floor at sigma 1)."""
    from neurosim.backend import make_generator
    from neurosim.device import DeviceArray

    spec = spec_factory(g_min_dtod=sigma, step_dtod=sigma, drift_nu=0.05, drift_nu_dtod=sigma)
    n = 200_000
    cells = DeviceArray(spec, (n, 1), make_generator(1, "cpu", "spread"), dtype=torch.float64)
    for values, nominal in ((cells.g_min, spec.g_min), (cells.step, 1.0), (cells.drift_nu, 0.05)):
        v = values.reshape(-1) / nominal
        assert bool((v > 0).all())
        assert torch.unique(v).numel() > 0.999 * n
        s2 = math.log1p(sigma * sigma)                 # the log's variance; the sample mean's sd follows
        sd_mean = sigma / math.sqrt(n)
        assert abs(float(v.mean()) - 1.0) < 6 * sd_mean * (1 + sigma)
        log_sd = float(v.log().std())
        assert abs(log_sd - math.sqrt(s2)) < 6 * math.sqrt(s2 / (2 * n))
