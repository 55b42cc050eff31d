"""The source studies (neurosim.studies): every study is discovered, its scenario files validate, and it runs
at size "ci" (a few steps) with tables and figures whose content is checked (rows, columns); the command lists
and runs them. A study added to the package joins the parametrized tests by discovery."""

from __future__ import annotations

import math
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
        assert module.TITLE and "doi" in module.PAPER.lower()
        assert module.SCENARIOS and all(isinstance(f, str) for f in module.SCENARIOS)
        assert callable(module.run)


@pytest.mark.parametrize(("name", "file"), SCENARIO_FILES)
def test_study_scenarios_validate(name, file):
    path = studies.scenario_path(file)
    assert path == ROOT / "scenarios" / "studies" / file   # installed as package data from the repository
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
