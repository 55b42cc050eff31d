"""Cards at the edges of what a card accepts, and every shipped card under every mapping and rounding: each either
simulates with finite numbers, conductances inside every cell's window, or is refused with exit 2 and one line
naming the field and the value. Generated over a grid, as aihwkit's tests are over its devices."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from neurosim.architectures import NetworkConfig, build_network
from neurosim.cli import main
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import Dataset
from neurosim.device import DeviceSpec, shipped_cards
from neurosim.nonlinearity import MAX_LABEL
from neurosim.training import TrainerConfig, make_trainer

NONLINEARITIES = [  # (nl_ltp, nl_ltd, nl_dtod)
    (10.0, -10.0, 0.0),          # both curves a step but for one pulse
    (0.0, 0.0, 10.0),            # a linear card whose cells bend either way, up to steps
    (-10.0, 10.0, 1.0),          # signs as published the other way round, with a spread
    (5.0, -9.9, 1.0),
]
STATES = [2, 1024]
WINDOWS = [(1e-15, 1e-14), (1e-3, 1.0), (1e-15, 1.0), (1e-6, 1.02e-6)]  # tiny, huge, 15 decades, 2 % wide
SPREADS = {
    "clean": {},
    "every spread at 1": {"g_min_dtod": 1.0, "g_max_dtod": 1.0, "step_dtod": 1.0, "drift_nu": 0.5,
                          "drift_nu_dtod": 1.0, "drift_t0": 1e-9, "c2c": 1.0, "read_noise": 0.2,
                          "stuck_at_gmin": 0.1, "stuck_at_gmax": 0.1},
}


def extreme_cards() -> list[tuple[str, dict]]:
    """Every nonlinearity × state count, each with both spread settings, the windows taken in turn."""
    cards = []
    for i, ((ltp, ltd, nl_dtod), states) in enumerate(itertools.product(NONLINEARITIES, STATES)):
        for j, (spread_name, spread) in enumerate(SPREADS.items()):
            g_min, g_max = WINDOWS[(i + j) % len(WINDOWS)]
            fields = {"name": "extreme", "g_min": g_min, "g_max": g_max, "states": states, "nl_ltp": ltp,
                      "nl_ltd": ltd, "nl_dtod": nl_dtod, **spread}
            cards.append((f"nl{ltp:g}/{ltd:g}±{nl_dtod:g}-{states}states-{g_min:g}..{g_max:g}S-{spread_name}",
                          fields))
    return cards


def tiny_data(n=8, features=6, classes=3) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 1, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, x, y, classes, "tiny")


def check_chip(net, where: str) -> None:
    """Every per-cell tensor finite; every conductance a cell holds inside its own window; reads non-negative."""
    for layer in net.analog_layers:
        cb = layer.crossbar
        for array in cb._arrays():
            for name, value in array.state_dict().items():
                if value.is_floating_point():
                    assert bool(torch.isfinite(value).all()), f"{where}: {layer.name}.{name} not finite"
            g = array.g
            assert bool((g >= array.g_min).all() and (g <= array.g_max).all()), f"{where}: {layer.name} window"
            now = array.conductance()
            assert bool(torch.isfinite(now).all() and (now >= 0).all()), f"{where}: {layer.name} drifted G"
            read = array.read()
            assert bool(torch.isfinite(read).all() and (read >= 0).all()), f"{where}: {layer.name} read"
        assert bool(torch.isfinite(cb.weights()).all() and torch.isfinite(cb.believed).all()), where


def exercise(spec: DeviceSpec, crossbar: CrossbarConfig, schemes=("bp", "dgc")) -> None:
    """Initialization, write-and-verify, a read, and one training step of each scheme, all finite."""
    data = tiny_data()
    net = build_network(NetworkConfig(hidden=(4,), crossbar=crossbar), spec, (1, 1, 6), 3, seed=0)
    check_chip(net, "init")
    g = torch.Generator().manual_seed(1)
    for layer in net.analog_layers:
        cb = layer.crossbar
        target = (torch.rand(cb.in_features, cb.out_features, generator=g) - 0.5) * cb.config.w_max
        stats = cb.write_verify(target, max_iterations=4)
        assert all(math.isfinite(v) for v in stats.values()), stats
    check_chip(net, "write_verify")
    out = net(data.x_train)
    assert bool(torch.isfinite(out).all()), "read"
    for scheme in schemes:
        trainer = make_trainer(net, data, build(TrainerConfig, {"scheme": scheme, "epochs": 1, "batch_size": 8}))
        row = trainer.fit()[-1]
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["energy_j"]), (scheme, row)
        check_chip(net, scheme)


@pytest.mark.parametrize("fields", [f for _, f in extreme_cards()], ids=[name for name, _ in extreme_cards()])
def test_extreme_card_simulates_with_finite_numbers(fields):
    spec = build(DeviceSpec, fields)
    exercise(spec, CrossbarConfig())


@pytest.mark.parametrize("name", sorted(shipped_cards()))
@pytest.mark.parametrize("mapping", ["differential", "reference"])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_shipped_card_programs_reads_and_trains_within_its_window(name, mapping, rounding):
    exercise(shipped_cards()[name], CrossbarConfig(mapping=mapping, rounding=rounding), schemes=("bp",))


GOOD = {"name": "mine", "g_min": 1e-6, "g_max": 1e-5, "states": 64}


@pytest.mark.parametrize("field,value", [
    ("nl_ltp", 10.2),                  # beyond a step response (MAX_LABEL = 10.10)
    ("nl_ltd", -MAX_LABEL),
    ("read_noise", 0.5),               # a Gaussian read would go below 0 S in 2 % of reads
    ("g_max", 10.0),                   # 10 S: no synaptic device
    ("g_min", 1e-20),
    ("states", 100_000),               # steps finer than float32 resolves in this window
    ("nl_dtod", -1.0),
    ("c2c", float("nan")),
])
def test_extreme_card_beyond_the_model_is_refused_in_one_line(tmp_path, capsys, field, value):
    fields = {**GOOD, field: value}
    with pytest.raises(ConfigError) as e:
        build(DeviceSpec, fields)
    assert e.value.field == field
    path = tmp_path / "card.toml"
    text = "\n".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in fields.items())
    path.write_text(text + '\n[source]\ndefault = "test"\n' +
                    "".join(f'{k} = "test"\n' for k in fields if k != "name"))
    assert main(["devices", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0]


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_neuron_gains_never_change_sign(sigma):
    """Gains of the neuron and derivative circuits are lognormal, mean 1, relative sigma ``sigma``: log g is
    N(−s²/2, s²) with s² = ln(1 + sigma²) (sample mean and std within 5 standard errors), every gain > 0."""
    from neurosim.activation import ActivationConfig, ActivationUnit

    n = 40_000
    cfg = ActivationConfig(function="identity", gain_dtod=sigma, derivative_gain_dtod=sigma, offset_dtod=sigma)
    unit = ActivationUnit(cfg, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = math.sqrt(math.log1p(sigma**2))
    for gains in (unit.gain, unit.derivative_gain):
        assert float(gains.min()) > 0
        log = gains.log()
        assert abs(float(log.mean()) + s * s / 2) < 5 * s / math.sqrt(n)
        assert abs(float(log.std()) - s) < 5 * s / math.sqrt(2 * (n - 1))
        assert abs(float(gains.mean()) - 1) < 5 * sigma / math.sqrt(n)
    assert float(unit.offset.min()) < 0 < float(unit.offset.max())  # offsets stay Gaussian, both signs
