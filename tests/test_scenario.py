"""Scenario files: every shipped one loads and round-trips through its TOML text; equal settings are equal
objects; --set, links and derived fields do what docs/scenarios.md says; the docs are the generated ones."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.backend import derive_seed
from neurosim.cli import main
from neurosim.config import ConfigError, dump_toml, parse_literal, parse_sets
from neurosim.device import load_card, shipped_card_paths
from neurosim.engine import HardwareTable
from neurosim.scenario import (
    DERIVABLE,
    MARKER,
    STREAMS,
    Scenario,
    analog_layer_names,
    apply_sets,
    default_layer_schemes,
    load_scenario,
    loads_scenario,
    reference_markdown,
    resolve,
)
from neurosim.training import TrainerConfig
from neurosim.training.schemes import HybridTrainer

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))
VT = ROOT / "scenarios" / "variation_tolerance.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_one_scenario_per_scheme_and_the_demo_are_shipped():
    assert {p.stem for p in SCENARIOS} >= {"variation_tolerance", "bp", "dgc", "hybrid", "two_stage"}
    schemes = {load_scenario(p).training.scheme for p in SCENARIOS}
    assert schemes == {"bp", "dgc", "hybrid", "two_stage"}


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_shipped_scenario_round_trips_through_its_text(path):
    s = load_scenario(path)
    text = s.to_toml()
    again = loads_scenario(text)
    assert again == s and hash(again) == hash(s) and again.fingerprint() == s.fingerprint()
    assert again.to_toml() == text                     # a fixed point: writing is deterministic
    written = tomllib.loads(text)
    assert written["device"]["inline"]["g_max"] == s.card().g_max   # the card travels with the text
    assert written["device"]["inline"]["source"]                    # its citations too
    assert again.card() == s.card()


def test_the_text_is_self_contained(tmp_path, monkeypatch):
    """A run file's scenario loads anywhere: no card file, no relative path is needed."""
    cards = tmp_path / "cards"
    cards.mkdir()
    shutil.copy(shipped_card_paths()["taox_hfox"], cards / "mine.toml")
    path = write(tmp_path / "exp" / "s.toml", '[device]\ncard = "../cards/mine.toml"\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")   # relative paths are read from the scenario's folder, not from here
    s = load_scenario(path)
    assert s.card() == load_card(cards / "mine.toml")
    assert Path(s.device.card).is_absolute()
    text = s.to_toml()
    shutil.rmtree(cards)
    assert loads_scenario(text) == s


@pytest.mark.parametrize("card", sorted(shipped_card_paths()))
def test_every_shipped_card_is_written_inline_and_read_back(card):
    s = load_scenario_text(f'[device]\ncard = "{card}"\n')
    assert s.card() == load_card(card)
    assert loads_scenario(s.to_toml()) == s


def load_scenario_text(text: str, sets=None, base=None) -> Scenario:
    return loads_scenario(text, sets, source="test.toml", base=base)


def test_equal_settings_are_equal_however_written():
    a = load_scenario_text('[network]\nhidden = [64, 32]\n[training]\nlearning_rate = 1\n'
                           '[device.overrides]\nstep_dtod = 0\nc2c = 0.01\n')
    b = load_scenario_text('[device]\noverrides = {c2c = 0.01, step_dtod = 0.0}\n',
                           {"network.hidden": [64, 32], "training.learning_rate": 1.0})
    assert a == b and hash(a) == hash(b) and a.fingerprint() == b.fingerprint() and len({a, b}) == 1
    assert a.network.hidden == (64, 32) and isinstance(a.training.learning_rate, float)
    assert isinstance(a.device.overrides["step_dtod"], float)
    c = apply_sets(a, {"training.learning_rate": 0.5})
    assert c != a and c.fingerprint() != a.fingerprint()


def test_parse_sets_reads_toml_literals_and_bare_words():
    assert parse_sets(["device.overrides.step_dtod=0.05", "network.hidden=[64,32]", "training.scheme=dgc",
                       "data.path=data/x.npz", 'name="a b"', "output.checkpoint=false",
                       "network.crossbar={adc_bits = 6}", "seed = 7", "description=two words"]) == {
        "device.overrides.step_dtod": 0.05, "network.hidden": [64, 32], "training.scheme": "dgc",
        "data.path": "data/x.npz", "name": "a b", "output.checkpoint": False,
        "network.crossbar": {"adc_bits": 6}, "seed": 7, "description": "two words"}
    assert math.isnan(parse_literal("nan")) and parse_literal("1\ny = 2") == "1\ny = 2"
    for bad in (["variation"], ["=1"], ["a..b=1"], ["a b=1"], ["seed=1", "seed=2"]):
        with pytest.raises(ConfigError):
            parse_sets(bad)


def test_the_variation_link_is_the_demo_axis():
    """variation = σ sets the card's four spreads to σ and the circuits' gain σ and offset σ/2."""
    spec = load_card("ecram_liwo3")
    for level in (0, 0.1, 0.3):
        s = load_scenario(VT, {"variation": level})
        sigma = float(level)
        assert s.card() == dataclasses.replace(spec, g_min_dtod=sigma, g_max_dtod=sigma, nl_dtod=sigma,
                                               step_dtod=sigma)
        assert s.network.activation == ActivationConfig(function="sigmoid", gain_dtod=sigma, offset_dtod=sigma / 2,
                                                        derivative_gain_dtod=sigma,
                                                        derivative_offset_dtod=sigma / 2)
        assert s.network.output_activation == ActivationConfig(function="identity")
    s = load_scenario(VT)
    assert s.links["variation"].value == 0.1 and s.network.hidden == (16,)
    assert (s.training.learning_rate, s.training.momentum, s.training.epochs) == (1.0, 0.5, 5)
    assert load_scenario(VT, {"links.variation.value": 0.3}) == load_scenario(VT, {"variation": 0.3})


LINKED = """
[links.spread]
value = 0.2
fields = ["device.overrides.step_dtod", "network.activation.offset_dtod"]
scale = [1, 0.25]
"""


def test_a_link_sets_its_fields_and_refuses_competition():
    s = load_scenario_text(LINKED)
    assert s.device.overrides["step_dtod"] == 0.2 and s.network.activation.offset_dtod == 0.2 * 0.25
    t = apply_sets(s, {"spread": 0.4})
    assert t.card().step_dtod == 0.4 and t.network.activation.offset_dtod == 0.4 * 0.25
    # the same value written in the file is fine; another is refused, and so is --set of a linked field
    assert load_scenario_text(LINKED + "[network.activation]\noffset_dtod = 0.05\n") == s
    with pytest.raises(ConfigError, match=r"network\.activation\.offset_dtod' = 0\.1: is set by link 'spread'"):
        load_scenario_text(LINKED + "[network.activation]\noffset_dtod = 0.1\n")
    for key, value in (("device.overrides.step_dtod", 0.1), ("network.activation", {"function": "tanh"})):
        with pytest.raises(ConfigError, match="set by link 'spread'"):
            apply_sets(s, {key: value})
    with pytest.raises(ConfigError, match=r"links\.spread\.value' = -0\.1: sets (device|network)\."):
        apply_sets(s, {"spread": -0.1})


def test_a_link_that_names_the_card_reads_the_card_again():
    s = load_scenario_text('[links.dev]\nvalue = "ag_asi"\nfields = ["device.card"]\n')
    assert s.card() == load_card("ag_asi")
    for sets in ({"dev": "pcmo"}, {"links.dev.value": "pcmo"}, {"links.dev": {"value": "pcmo",
                                                                               "fields": ["device.card"]}}):
        t = loads_scenario(s.to_toml(), sets)
        assert t.device.card == "pcmo" and t.card() == load_card("pcmo")
        assert t.hardware.pulse_s == load_card("pcmo").pulse_width


def test_a_link_to_a_relative_path_round_trips(tmp_path):
    (tmp_path / "cards").mkdir()
    shutil.copy(shipped_card_paths()["pcmo"], tmp_path / "cards" / "p.toml")
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4))
    path = write(tmp_path / "s.toml", '[data]\nname = "npz"\n[links.dev]\nvalue = "cards/p.toml"\n'
                 'fields = ["device.card"]\n[links.file]\nvalue = "d.npz"\nfields = ["data.path"]\n')
    s = load_scenario(path)
    assert s.card() == load_card(tmp_path / "cards" / "p.toml")
    assert s.links["dev"].value == s.device.card == str(tmp_path / "cards" / "p.toml")
    assert s.links["file"].value == s.data.path == str(tmp_path / "d.npz")
    assert loads_scenario(s.to_toml()) == s
    np.savez(tmp_path / "e.npz", x=np.zeros((6, 8, 8), np.uint8), y=np.arange(6))
    assert apply_sets(s, {"file": "e.npz"}, base=tmp_path).data.path == str(tmp_path / "e.npz")
    # a link may switch a table's fields that its own checks tie together (npz needs a path)
    both = load_scenario(write(tmp_path / "t.toml", '[links.set]\nvalue = "npz"\nfields = ["data.name"]\n'
                                                    '[links.file]\nvalue = "d.npz"\nfields = ["data.path"]\n'))
    assert both.data.name == "npz"
    assert apply_sets(both, {"set": "digits", "file": ""}).data == load_scenario_text("").data


def test_a_link_without_scale_sets_any_value():
    s = load_scenario_text('[links.act]\nvalue = "tanh"\nfields = ["network.activation.function", '
                           '"network.output_activation.function"]\n')
    assert s.network.activation.function == s.network.output_activation.function == "tanh"
    t = apply_sets(s, {"act": "relu"})
    assert t.network.activation.function == t.network.output_activation.function == "relu"


@pytest.mark.parametrize("link,words", [
    ('value = 0.1\nfields = ["device.overrides.nope"]', "card's field"),
    ('value = 0.1\nfields = ["network.nope"]', "unknown field"),
    ('value = 0.1\nfields = ["links.x.value"]', "not links"),
    ('value = 0.1\nfields = ["seed", "seed"]', "twice"),
    ('value = 0.1\nfields = ["training.learning_rate"]\nscale = [1, 2]', "one factor per field"),
    ('value = "a"\nfields = ["name"]\nscale = [1]', "must be a number"),
    ('value = 0.1\nfields = []', "names no field"),
])
def test_bad_links_are_refused(link, words):
    with pytest.raises(ConfigError, match=words):
        load_scenario_text(f"[links.x]\n{link}\n")


def test_two_links_may_not_share_a_field():
    with pytest.raises(ConfigError, match=r"overlaps network\.activation"):
        load_scenario_text('[links.a]\nvalue = 0.1\nfields = ["network.activation.gain_dtod"]\n'
                           '[links.b]\nvalue = {gain_dtod = 0.1}\nfields = ["network.activation"]\n')


def test_hardware_pulses_follow_the_card_until_set():
    s = load_scenario_text('[device]\ncard = "ecram_liwo3"\n')
    card = s.card()
    expected = HardwareTable().resolve(card.pulse_width, card.pulse_voltage_ltp, card.pulse_voltage_ltd,
                                       card.g_min, card.g_max)
    assert (s.hardware.pulse_s, s.hardware.pulse_j) == (5e-9, expected.pulse_j) == (card.pulse_width,
                                                                                  4.0 * 1.025e-9 * 5e-9)
    assert {"hardware.pulse_s", "hardware.pulse_j", "device.inline"} <= set(s.derived)
    text = s.to_toml()
    # a run file's values are kept as written; a set derives them again from what it changed
    edited = loads_scenario(text.replace("pulse_s = 5e-09", "pulse_s = 7e-09"))
    assert edited.hardware.pulse_s == 7e-9
    moved = loads_scenario(text, {"device.overrides.pulse_width": 1e-8})
    assert moved.hardware.pulse_s == 1e-8 and moved.hardware.pulse_j == 2 * s.hardware.pulse_j
    other = loads_scenario(text, {"device.card": "pcmo"})
    assert other.card() == load_card("pcmo") and other.hardware.pulse_s == load_card("pcmo").pulse_width
    # set explicitly, a pulse field no longer follows the card
    fixed = load_scenario_text('[device]\ncard = "ecram_liwo3"\n[hardware]\npulse_s = 1e-6\n')
    assert "hardware.pulse_s" not in fixed.derived
    assert apply_sets(fixed, {"device.card": "pcmo"}).hardware.pulse_s == 1e-6


def test_derived_data_and_network_fields():
    s = load_scenario_text("")
    assert (s.data.size, s.data.channels, s.data.classes, s.network.dropout) == (8, 1, 10, 0.0)
    assert s.input_shape() == (1, 8, 8)
    lenet = load_scenario_text('[network]\narchitecture = "lenet"\n[data]\nsize = 28\n')
    assert lenet.network.dropout == 0.5 and lenet.input_shape() == (1, 28, 28)
    assert "data.size" not in lenet.derived
    hybrid = load_scenario_text('[training]\nscheme = "hybrid"\n[network]\nhidden = [16]\n')
    assert hybrid.training.hybrid.layer_schemes == ("dgc", "bp")
    deeper = apply_sets(loads_scenario(hybrid.to_toml()), {"network.hidden": [16, 8]})
    assert deeper.training.hybrid.layer_schemes == ("dgc", "bp", "bp")
    plain = apply_sets(hybrid, {"training.scheme": "bp"})
    assert plain.training.hybrid.layer_schemes == () and "training.hybrid.layer_schemes" not in plain.derived


@pytest.mark.parametrize("network", [NetworkConfig(hidden=()), NetworkConfig(hidden=(6,)),
                                     NetworkConfig(hidden=(6, 5, 4)), NetworkConfig(architecture="lenet")])
def test_layer_names_and_hybrid_defaults_match_the_built_network(network, spec_factory):
    """The loader counts layers and derives hybrid's schemes from the settings; the trainer from the network."""
    side = 28 if network.architecture == "lenet" else 4
    net = build_network(network, spec_factory(), (1, side, side), 10)
    assert analog_layer_names(network) == [layer.name for layer in net.analog_layers]
    trainer = SimpleNamespace(network=net, config=TrainerConfig(scheme="hybrid"))
    assert default_layer_schemes(network) == tuple(HybridTrainer.per_layer(trainer).values())


def test_an_inline_card_is_the_card_and_cites_its_numbers():
    card = ('[device]\ncard = "from a paper"\n[device.inline]\nname = "mine"\ng_min = 1e-6\ng_max = 1e-5\n'
            'states = 64\nc2c = 0.0\n[device.inline.source]\ng_min = "p. 1"\ng_max = "p. 2"\nstates = "p. 3"\n')
    s = load_scenario_text(card, {"device.overrides.c2c": 0.01})
    assert s.card().g_max == 1e-5 and s.card().c2c == 0.01 and "device.inline" not in s.derived
    assert loads_scenario(s.to_toml()) == s
    with pytest.raises(ConfigError, match=r"device\.inline\.g_max' = 1e-05: cites no source"):
        load_scenario_text(card.replace('g_max = "p. 2"\n', ""))
    with pytest.raises(ConfigError, match="written inline"):
        apply_sets(s, {"device.card": "ag_asi"})


def test_streams_are_named_independent_and_stable():
    s = load_scenario_text("seed = 3\n")
    seeds = [s.stream(n) for n in STREAMS]
    assert len(set(seeds)) == len(STREAMS) and seeds == [derive_seed(3, n) for n in STREAMS]
    assert load_scenario_text("seed = 0\n").stream("chip") == 8819125231018211805   # pinned: same seed, same chip
    assert all(apply_sets(s, {"seed": 4}).stream(n) != s.stream(n) for n in STREAMS)


def test_toml_writing_reads_back_exactly():
    data = {"s": 'quote " back \\ tab \t nl \n ctrl \x01 del \x7f é ✓', "trailing": "it's\nx'",
            "f": [5e-324, 1.7976931348623157e308, -0.0, 0.1 + 0.2, 1e-7], "i": [0, -(2**63)],
            "t": {"key with space": {"x": True}, "empty": {}}, "nested": [[1, 2], ["a"]]}
    assert tomllib.loads(dump_toml(data)) == data
    s = resolve(Scenario(description='a "quoted"\nline', name="x'y"))
    assert loads_scenario(s.to_toml()) == s


def test_a_null_that_toml_cannot_hold_is_named():
    s = resolve(Scenario(network=NetworkConfig(activation=ActivationConfig(epsilon=None))))
    with pytest.raises(ConfigError, match=r"network\.activation\.epsilon' = None"):
        s.to_toml()


def test_validate_prints_a_summary_and_the_resolved_text(capsys):
    assert main(["validate", str(VT), "--set", "variation=0.3"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "ecram_liwo3" in out and "variation = 0.3" in out and "64-16-10" in out
    assert main(["validate", str(VT), "--print"]) == 0
    assert loads_scenario(capsys.readouterr().out) == load_scenario(VT)


def test_the_docs_are_the_generated_reference():
    text = (ROOT / "docs" / "scenarios.md").read_text(encoding="utf-8")
    assert MARKER in text, "docs/scenarios.md lost its marker"
    assert text.split(MARKER)[1].strip() == reference_markdown().strip(), \
        "docs/scenarios.md is stale: run `python -m neurosim.scenario docs/scenarios.md`"
    head = text.split(MARKER)[0]
    assert all(f"`{d}`" in head for d in DERIVABLE), "a derived field is missing from the Derived fields table"
    # every field of every table is in the reference: a row, or a section of its own
    for table in (Scenario, NetworkConfig, ActivationConfig, TrainerConfig, HardwareTable):
        for f in dataclasses.fields(table):
            assert f"| `{f.name}` |" in text or f"### `{f.name}`" in text or f".{f.name}`" in text, f.name
