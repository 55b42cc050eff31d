"""Every shipped device card: well formed, every number cited, and the published values present."""

import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosim.nonlinearity import MAX_LABEL, a_from_label, pulse_response

CARDS = Path(__file__).resolve().parent.parent / "devices"
PATHS = sorted(CARDS.glob("*.toml"))

# What the sources print for each card: R_on = 1/g_max (ohm), on/off = g_max/g_min, states, labels, c2c.
PUBLISHED = {
    "ag_asi": dict(r_on=26e6, on_off=12.5, states=97, nl_ltp=2.40, nl_ltd=-4.88, c2c=0.035),
    "taox_hfox": dict(r_on=100e3, on_off=10.0, states=128, nl_ltp=0.04, nl_ltd=-0.63, c2c=0.037),
    "pcmo": dict(r_on=23e6, on_off=6.84, states=50, nl_ltp=3.68, nl_ltd=-6.76, c2c=0.01),
    "alox_hfo2": dict(r_on=16.9e3, on_off=4.43, states=40, nl_ltp=1.94, nl_ltd=-0.61, c2c=0.05),
    "gst_pcm": dict(r_on=40e3, on_off=12.5, states=16),
    "epiram": dict(r_on=81e3, on_off=50.2, states=64, nl_ltp=0.5, nl_ltd=-0.5, c2c=0.02),
    "hzo_fefet": dict(r_on=559.28e3, on_off=45.0, states=32, nl_ltp=1.75, nl_ltd=1.46, c2c=0.005),
    "taox_tio2": dict(r_on=5e6, on_off=2.0, states=102, nl_ltp=0.66, nl_ltd=-0.69, c2c=0.01),
    "ecram_liwo3": dict(r_on=500e6, on_off=40.0, states=1000),
}


def _load(path):
    with path.open("rb") as f:
        return tomllib.load(f)


def _numeric(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_required_cards_are_shipped():
    benchmark = {"ag_asi", "taox_hfox", "pcmo", "alox_hfo2", "gst_pcm", "epiram", "hzo_fefet"}
    names = {p.stem for p in PATHS}
    assert benchmark | {"ideal"} <= names
    extra = {_load(CARDS / f"{n}.toml")["technology"] for n in names - benchmark - {"ideal"}}
    assert "RRAM" in extra and extra & {"ECRAM", "FeFET"}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_card_is_well_formed_and_cited(path):
    card = _load(path)
    assert re.fullmatch(r"[a-z0-9_]+", path.stem)
    # file name = display name in lower case with punctuation dropped ("Ag:a-Si" -> ag_asi)
    assert re.sub(r"[^a-z0-9]", "", card["name"].lower()) == path.stem.replace("_", "")
    assert card["description"].strip() and card["technology"].strip()
    assert 0 < card["g_min"] < card["g_max"]
    assert isinstance(card["states"], int) and card["states"] >= 2
    for key in ("nl_ltp", "nl_ltd"):
        assert abs(card.get(key, 0.0)) < MAX_LABEL
    source = card["source"]
    for key, value in card.items():
        if _numeric(value) and key not in source:
            assert value == 0 and "default" in source, f"{key} = {value} cites no source"
    for key, text in source.items():
        assert isinstance(text, str) and len(text.strip()) > 10
        assert key == "default" or key in card, f"source.{key} cites a field the card does not set"


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_published_values_present(stem):
    card, pub = _load(CARDS / f"{stem}.toml"), PUBLISHED[stem]
    # conductances are written with 7 significant digits
    assert 1.0 / card["g_max"] == pytest.approx(pub["r_on"], rel=1e-6)
    assert card["g_max"] / card["g_min"] == pytest.approx(pub["on_off"], rel=1e-6)
    for key in ("states", "nl_ltp", "nl_ltd", "c2c"):
        assert card.get(key, 0) == pub.get(key, 0), key


def test_ideal_card_is_linear_and_clean():
    card = _load(CARDS / "ideal.toml")
    assert card["technology"] == "ideal"
    noisy = ("nl_ltp", "nl_ltd", "a_ltp", "a_ltd", "c2c", "read_noise", "g_min_dtod", "g_max_dtod", "nl_dtod",
             "step_dtod", "stuck_at_gmin", "stuck_at_gmax", "drift_nu")
    assert all(card.get(k, 0) == 0 for k in noisy)
    assert card["states"] - 1 >= 2**10  # finer than the 8-bit weights of typical studies


def test_pcm_card_drifts():
    card = _load(CARDS / "gst_pcm.toml")
    assert 0.05 <= card["drift_nu"] <= 0.11  # the published range for amorphous GST


def test_ag_asi_curve_is_neurosims_closed_form():
    # NeuroSim: A = getParamA(NL) * maxNumLevel, B = (Gmax - Gmin)/(1 - exp(-maxNumLevel/A)),
    # G(P) = B (1 - exp(-P/A)) + Gmin, with getParamA(2.40) = 0.499181 (formula.cpp) and maxNumLevel = 97.
    card = _load(CARDS / "ag_asi.toml")
    g_min, g_max, n = card["g_min"], card["g_max"], card["states"]
    big_a = 0.499181 * n
    b = (g_max - g_min) / (1 - math.exp(-n / big_a))
    p = np.arange(n + 1)
    neurosim = b * (1 - np.exp(-p / big_a)) + g_min
    ours = g_min + (g_max - g_min) * pulse_response(p, n, a_from_label(card["nl_ltp"]))
    # The table's 6 printed digits limit agreement to ~1e-6 of the range.
    assert np.allclose(ours, neurosim, rtol=0, atol=2e-6 * (g_max - g_min))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_device_model_loads_card_and_follows_closed_form(path):
    device = pytest.importorskip("neurosim.device")
    spec = device.load_card(path)
    card = _load(path)
    p_max = card["states"] - 1  # the device model's pulse count
    pulses = torch.arange(0, p_max + 1, dtype=torch.float64)
    label = card.get("nl_ltp", 0.0)
    a = math.inf if label == 0 else a_from_label(label)
    expected = card["g_min"] + (card["g_max"] - card["g_min"]) * pulse_response(pulses, p_max, a)
    got = spec.curve(pulses, "ltp").to(torch.float64)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * (card["g_max"] - card["g_min"]))
