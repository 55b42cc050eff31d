"""neurosim fit-device: data made by the device model from known parameters is fitted back within tolerances
derived from the fit's own standard errors; every shipped card survives export-as-table and fit-back; bad data
exits 2 with one line naming the row or column."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from neurosim.cli import main
from neurosim.device import DeviceArray, load_card, shipped_card_paths
from neurosim.fitting import card_table, fit_card, read_measurements, simulate_measurements, write_csv
from neurosim.nonlinearity import label_from_a

DEVICES, CYCLES, SEED, C2C = 6, 6, 3, 0.01


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Ag:a-Si with cycle-to-cycle noise and every device-to-device spread the fitter estimates."""
    spec = dataclasses.replace(load_card("ag_asi"), c2c=C2C, g_min_dtod=0.05, g_max_dtod=0.05, nl_dtod=0.3)
    path = tmp_path_factory.mktemp("fit") / "noisy.csv"
    write_csv(path, simulate_measurements(spec, DEVICES, CYCLES, SEED), "uS")
    truth = DeviceArray(spec, (DEVICES, 1), torch.Generator().manual_seed(SEED), dtype=torch.float64)
    fit = fit_card(read_measurements(path), str(path))
    return spec, truth, fit, path


def test_each_device_is_fitted_back_within_five_standard_errors(noisy):
    """The fit's standard errors come from the noise and the number of pulses (the Jacobian of the one-pulse
    map); each device's window and labels lie within 5 of them of the values the model drew for that device."""
    _, truth, fit, _ = noisy
    lo, hi = truth.g_min.reshape(-1).numpy(), truth.g_max.reshape(-1).numpy()
    labels = {p: label_from_a(getattr(truth, f"a_{p}").reshape(-1).numpy()) for p in ("ltp", "ltd")}
    for i, d in enumerate(fit.devices):
        f = fit.per_device[d]
        assert abs(f["lo"][0] - lo[i]) < 5 * f["lo"][1]
        assert abs(f["hi"][0] - hi[i]) < 5 * f["hi"][1]
        for p in ("ltp", "ltd"):
            assert abs(f["labels"][p][0] - labels[p][i]) < 5 * f["labels"][p][1]
    # the errors are small in absolute terms too: a fraction of a percent of the window, a tenth of a label
    span = truth.spec.g_max - truth.spec.g_min
    assert max(fit.per_device[d]["hi"][1] for d in fit.devices) < 0.005 * span
    assert max(fit.per_device[d]["labels"]["ltp"][1] for d in fit.devices) < 0.2


def test_the_card_takes_means_and_c2c_from_the_one_pulse_residuals(noisy):
    spec, truth, fit, path = noisy
    card = fit.card
    n = fit.c2c_residuals.size
    # sigma estimated from n Gaussian residuals: relative standard error 1/sqrt(2n)
    assert abs(card["c2c"] / C2C - 1) < 5 / math.sqrt(2 * n)
    assert card["states"] == spec.states and card["states_ltd"] == spec.states_ltd
    lo_se = max(fit.per_device[d]["lo"][1] for d in fit.devices)
    assert abs(card["g_min"] - float(truth.g_min.mean())) < 5 * lo_se
    true_ltp = label_from_a(truth.a_ltp.reshape(-1).numpy())
    assert abs(card["nl_ltp"] - true_ltp.mean()) < 5 * max(fit.per_device[d]["labels"]["ltp"][1]
                                                           for d in fit.devices) / math.sqrt(DEVICES)
    # spreads: the sample's own sigma of the drawn labels, within 5 standard errors of a sigma from 6 devices
    pooled = math.sqrt(0.5 * (np.var(true_ltp, ddof=1) + np.var(label_from_a(truth.a_ltd.reshape(-1).numpy()),
                                                                   ddof=1)))
    assert abs(card["nl_dtod"] - pooled) < 5 * pooled / math.sqrt(2 * (2 * DEVICES - 2))
    assert card["g_min_dtod"] > 0 and card["g_max_dtod"] > 0
    assert all(path.name in card["source"][k] for k in ("g_min", "nl_ltp", "c2c", "nl_dtod"))
    assert "R^2" in card["notes"] and "RMS error" in card["notes"]


@pytest.mark.parametrize("name", sorted(shipped_card_paths()))
def test_every_shipped_card_exported_as_a_table_is_fitted_back(name, tmp_path):
    """The nominal curves a card implies, fitted back: window, states and labels of the card itself (a
    mismatch between the fitter's model and the device model would show here)."""
    spec = load_card(name)
    path = tmp_path / f"{name}.csv"
    write_csv(path, card_table(spec), "S")
    card = fit_card(read_measurements(path), str(path)).card
    span = spec.g_max - spec.g_min
    assert abs(card["g_min"] - spec.g_min) < 1e-7 * span and abs(card["g_max"] - spec.g_max) < 1e-7 * span
    assert card["states"] == spec.states and card.get("states_ltd", spec.states) == (spec.states_ltd or spec.states)
    assert card["nl_ltp"] == pytest.approx(spec.label("ltp"), abs=1e-5)
    assert card["nl_ltd"] == pytest.approx(spec.label("ltd"), abs=1e-5)
    assert card["c2c"] < 1e-6


def test_the_command_writes_a_valid_card_and_a_plot(noisy, tmp_path, capsys):
    _, _, fit, path = noisy
    out, png = tmp_path / "card.toml", tmp_path / "fit.png"
    assert main(["fit-device", str(path), "-o", str(out), "--plot", str(png), "--name", "my device"]) == 0
    spec = load_card(out)
    assert spec.name == "my device" and spec.c2c == fit.card["c2c"] and spec.nl_ltp == fit.card["nl_ltp"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the unit from a flag instead of the header: the same card
    plain = tmp_path / "plain.csv"
    plain.write_text(path.read_text().replace("conductance_uS", "conductance"))
    out2 = tmp_path / "card2.toml"
    assert main(["fit-device", str(plain), "-o", str(out2), "--units", "uS", "--name", "my device"]) == 0
    assert load_card(out2).g_max == spec.g_max


GOOD = "device,cycle,polarity,pulse,conductance_uS\n" + "".join(
    f"d0,0,ltp,{k},{1 + k}\n" for k in range(5)) + "".join(f"d0,0,ltd,{k},{5 - k}\n" for k in range(5))


def _corrupt(line: int, column: int, value: str) -> str:
    rows = [r.split(",") for r in GOOD.strip().split("\n")]
    rows[line - 1][column] = value
    return "\n".join(",".join(r) for r in rows) + "\n"


@pytest.mark.parametrize(("text", "args", "names"), [
    (_corrupt(3, 4, "nan"), [], "row 3, column conductance_uS"),
    (_corrupt(4, 4, "-1"), [], "row 4, column conductance_uS"),
    (_corrupt(4, 4, ""), [], "row 4, column conductance_uS"),
    (_corrupt(5, 2, "sideways"), [], "row 5, column polarity"),
    (_corrupt(5, 3, "7"), [], "row 5, column pulse"),
    (_corrupt(5, 3, "1.5"), [], "row 5, column pulse"),
    ("".join(GOOD.splitlines(keepends=True)[:6]), [], "row 2, column polarity"),         # no depression
    (GOOD.replace("d0,0,ltp,3,4\nd0,0,ltp,4,5\n", ""), [], "row 2, column pulse"),      # 2 pulses
    (GOOD.replace(",1\nd0,0,ltp,1,2\n", ",5\nd0,0,ltp,1,2\n").replace("ltp,4,5", "ltp,4,1"), [],
     "row 2, column conductance_uS"),                                                     # goes down
    ("".join(ln if "ltp" not in ln else ln.rsplit(",", 1)[0] + ",3\n" for ln in GOOD.splitlines(keepends=True)),
     [], "row 2, column conductance_uS"),                                                 # zero width
    (GOOD.replace("conductance_uS", "conductance"), [], "column conductance"),           # no unit
    (GOOD, ["--units", "furlongs"], "units"),
    (GOOD.replace("cycle,", "run,"), [], "column cycle"),
])
def test_bad_data_exits_2_with_one_line_naming_the_row_or_column(text, args, names, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    assert main(["fit-device", str(path), "-o", str(tmp_path / "c.toml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err
    assert not (tmp_path / "c.toml").exists()


def test_the_good_corpus_itself_fits(tmp_path):
    path = tmp_path / "good.csv"
    path.write_text(GOOD)
    assert main(["fit-device", str(path), "-o", str(tmp_path / "c.toml")]) == 0
    assert load_card(tmp_path / "c.toml").g_max == pytest.approx(5e-6)


def test_the_shipped_example_is_what_its_script_makes_and_fits_to_the_shipped_card(tmp_path):
    import runpy
    from pathlib import Path

    from neurosim.config import load_toml

    folder = Path(__file__).resolve().parents[1] / "examples" / "byod"
    script = runpy.run_path(str(folder / "make_measured.py"))
    script["main"](tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_bytes() == (folder / "measured.csv").read_bytes()
    assert main(["fit-device", str(folder / "measured.csv"), "-o", str(tmp_path / "c.toml"),
                 "--name", "example (fitted)"]) == 0
    got, shipped = load_toml(tmp_path / "c.toml"), load_toml(folder / "fitted.toml")
    assert got.keys() == shipped.keys()
    for key, value in shipped.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6), key
        elif key != "notes":
            assert got[key] == value, key


def test_a_convex_curve_is_refused_and_ties_are_spread(tmp_path, capsys):
    from neurosim.fitting import _spread_ties, response

    k = np.arange(33)
    up = 1e-6 + 4e-6 * response(k / 32, -4.0)          # starts slowly: label about -4
    down = 5e-6 - 4e-6 * response(k / 32, 2.0)
    lines = ["cycle,polarity,pulse,conductance_S"] + [f"0,ltp,{i},{float(g)!r}" for i, g in enumerate(up)]
    lines += [f"0,ltd,{i},{float(g)!r}" for i, g in enumerate(down)]
    path = tmp_path / "convex.csv"
    path.write_text("\n".join(lines) + "\n")
    assert main(["fit-device", str(path), "-o", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "polarity ltp" in err[0] and "convex" in err[0]
    assert np.array_equal(_spread_ties(np.array([1.0, 2.0, 2.0, 2.0, 5.0, 6.0, 6.0])),
                          np.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.5, 6.0]))
    assert np.array_equal(_spread_ties(np.array([4.0, 3.0, 3.0, 1.0])), np.array([4.0, 3.0, 2.0, 1.0]))
