"""The source studies (neurosim.studies): every study is discovered, its scenario files validate, and it runs
at size "ci" (a few steps) with tables and figures whose content is checked (rows, columns); the command lists
and runs them. A study added to the package joins the parametrized tests by discovery."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from neurosim import studies
from neurosim.cli import main
from neurosim.config import ConfigError
from neurosim.scenario import load_scenario
from neurosim.sweep import plan

ROOT = Path(__file__).resolve().parents[1]
STUDIES = studies.discover()
SCENARIO_FILES = sorted({(name, f) for name, m in STUDIES.items() for f in m.SCENARIOS})


@pytest.fixture(scope="session")
def ci_outputs(tmp_path_factory):
    """name -> (folder, paths) of the study run at size ci, run once per session on first use."""
    cache: dict[str, tuple[Path, list[Path]]] = {}

    def get(name: str) -> tuple[Path, list[Path]]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            paths = STUDIES[name].run(out, size="ci", workers=0, progress=False, log=lambda line: None)
            cache[name] = (out, paths)
        return cache[name]

    return get


def test_studies_are_discovered_with_their_interface():
    for name, module in STUDIES.items():
        assert name == module.NAME and module.__name__ == f"neurosim.studies.{name}"
        # a citation: its year, and its DOI where the paper has one (the Hue 2019 journal paper has none we know)
        assert module.TITLE and re.search(r"\b(19|20)\d\d\b", module.PAPER)
        assert "doi" in module.PAPER.lower() or "journal" in module.PAPER.lower()
        assert module.SCENARIOS and all(isinstance(f, str) for f in module.SCENARIOS)
        assert callable(module.run)


@pytest.mark.parametrize(("name", "file"), SCENARIO_FILES)
def test_study_scenarios_validate(name, file):
    path = studies.scenario_path(file)
    # installed as package data: the repository's file
    assert path.read_bytes() == (ROOT / "scenarios" / "studies" / file).read_bytes()
    if not file.endswith(".toml"):
        return   # a data file a scenario reads (pwl2023's binary digits): installed is all it needs to be
    scenario = load_scenario(path)
    assert scenario.name, f"{file}: give the scenario a name"
    plan(path)   # every point of its [sweep] table builds and validates


def _md_rows(path: Path) -> int:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, f"{path.name}: no table"
    return len(lines) - 2


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_runs_at_ci_size(name, ci_outputs):
    import matplotlib.image

    out, paths = ci_outputs(name)
    assert paths, f"{name} wrote nothing"
    suffixes = {p.suffix for p in paths}
    assert {".md", ".csv", ".png"} <= suffixes, f"{name}: wants tables (.md, .csv) and figures (.png)"
    for path in paths:
        assert path.exists() and path.stat().st_size > 0 and out in path.parents, path
        if path.suffix == ".md":
            assert _md_rows(path) >= 1
        elif path.suffix == ".csv":
            frame = pd.read_csv(path)
            assert len(frame) >= 1 and len(frame.columns) >= 2, path.name
        elif path.suffix == ".png":
            image = matplotlib.image.imread(path)
            assert image.shape[0] >= 200 and image.shape[1] >= 200, path.name


def test_study_command_lists_and_refuses(capsys):
    assert main(["study"]) == 0
    listed = capsys.readouterr().out
    for name, module in STUDIES.items():
        assert name in listed and module.TITLE in listed
    assert main(["study", "no_such_study"]) == 2
    assert "no_such_study" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        studies.check_size("huge")


def test_sweep_folders_of_sizes_do_not_collide(tmp_path):
    assert studies.sweep_folder(tmp_path, "mlp", "default") == tmp_path / "mlp"
    assert studies.sweep_folder(tmp_path, "mlp", "ci") == tmp_path / "mlp.ci"


def test_markdown_table_and_mean_std():
    frame = pd.DataFrame({"method": ["bp", "a|b"], "acc": [0.5, float("nan")]})
    text = studies.markdown_table(frame)
    assert text.splitlines() == ["| method | acc |", "|---|---:|", "| bp | 0.5 |", "| a\\|b | - |"]
    assert studies.mean_std(0.91234, 0.0123) == "0.912 ± 0.012"
    assert studies.mean_std(0.5, math.nan) == "0.500"
    assert studies.mean_std(math.nan, 0.1) == "-"


# ---- what each of these studies' tables must hold -----------------------------------------------------------

def test_kim2021_dgc_tables(ci_outputs):
    from neurosim.studies import kim2021_dgc

    out, _ = ci_outputs("kim2021_dgc")
    plan = kim2021_dgc.PLAN["ci"]
    acc = pd.read_csv(out / "mlp_accuracy.csv")
    methods = list(kim2021_dgc.METHODS.values())
    # every method at every level of each kind; sigma 0 (one chip) under both kinds, with the same numbers
    expected = {(k, s, m) for m in methods for k in kim2021_dgc.KINDS
                for s in {0.0, *plan["mlp"]["conductance"], *plan["mlp"][k]}}
    assert set(zip(acc["variation"], acc["sigma"], acc["method"], strict=True)) == expected
    assert (acc["seeds"] == plan["mlp"]["seeds"]).all()
    assert acc["accuracy_mean"].between(0, 1).all()
    zero = acc[acc["sigma"] == 0.0].pivot(index="method", columns="variation", values="accuracy_mean")
    assert (zero["conductance"] == zero["circuit"]).all()
    # the hybrid's saving is its perturbation count: DGC on fc1 (65 x 16 weights) of the 1210 of the MLP
    speed = pd.read_csv(out / "hybrid_speed.csv")
    mlp = speed[speed["network"] == "MLP 64-16-10"].iloc[0]
    assert mlp["hybrid / DGC cycles"] == pytest.approx(65 * 16 / (65 * 16 + 17 * 10), abs=5e-4)
    assert float(mlp["DGC cycles"]) == 1210 * plan["mlp"]["sets"]["data.limit"] // 32   # one step per 32 images
    cost = pd.read_csv(out / "cnn_cost.csv")
    dgc = cost[cost["method"] == "DGC"].iloc[0]
    assert float(dgc["perturbation cycles"]) == 21840   # one step, every weight of the LeNet-like CNN once
    assert set(cost["method"]) == {m for m in methods if m != "hybrid"}
    diffs = pd.read_csv(out / "mlp_differences.csv")
    assert {"variation", "σ", "comparison", "Δ accuracy"} <= set(diffs.columns)
    assert len(diffs) == 4 * 4   # DGC and hybrid against both BPs, at 2 kinds x 2 levels


def test_devices_compared_table(ci_outputs):
    from neurosim.device import shipped_card_paths

    out, _ = ci_outputs("devices_compared")
    table = pd.read_csv(out / "devices.csv")
    assert sorted(table["card"]) == sorted(shipped_card_paths())          # every shipped card, once
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["final_test_accuracy_mean"].is_monotonic_decreasing
    assert (table["sim_time_s_mean"] > 0).all() and (table["energy_j_mean"] > 0).all()
