"""Validated settings: unknown, missing, mistyped and out-of-range fields are named; nested tables and dotted
overrides keep the full path of the field in the message."""

from __future__ import annotations

import pytest

from neurosim.architectures import NetworkConfig
from neurosim.config import ConfigError, build, load_toml, with_overrides
from neurosim.crossbar import CrossbarConfig
from neurosim.training import TrainerConfig


@pytest.mark.parametrize("data,field,words", [
    ({"tile_rows": 0}, "tile_rows", ">= 1"),
    ({"tile_rows": 2.5}, "tile_rows", "integer"),
    ({"adc_bits": True}, "adc_bits", "integer"),
    ({"mapping": "triple"}, "mapping", "one of"),
    ({"w_max": float("nan")}, "w_max", "finite"),
    ({"colour": 1}, "colour", "unknown field"),
])
def test_bad_values_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as e:
        build(CrossbarConfig, data, source="my.toml")
    assert str(e.value).startswith("my.toml: field '" + field) and words in str(e.value)


def test_nested_tables_report_the_dotted_path():
    with pytest.raises(ConfigError, match=r"field 'activation\.epsilon' = -1"):
        build(NetworkConfig, {"activation": {"epsilon": -1.0}})
    with pytest.raises(ConfigError, match=r"field 'crossbar' = 3: must be a table"):
        build(NetworkConfig, {"crossbar": 3})
    cfg = build(NetworkConfig, {"hidden": [8, 4], "crossbar": {"adc_bits": 6}, "activation": {"function": "tanh"}})
    assert cfg.crossbar.adc_bits == 6 and cfg.activation.function == "tanh"


def test_dotted_overrides_are_validated_again():
    cfg = build(TrainerConfig, {"scheme": "dgc"})
    new = with_overrides(cfg, {"dgc.mode": "linearized", "learning_rate": 0.05})
    assert new.dgc.mode == "linearized" and new.learning_rate == 0.05 and cfg.dgc.mode == "exact"
    with pytest.raises(ConfigError, match=r"dgc\.mode"):
        with_overrides(cfg, {"dgc.mode": "magic"})
    with pytest.raises(ConfigError, match="unknown field"):
        with_overrides(cfg, {"dgc.nope": 1})
    with pytest.raises(ConfigError, match="not a table"):
        with_overrides(cfg, {"epochs.x": 1})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_toml(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [1,\n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load_toml(bad)
    assert str(bad) in str(e.value)
