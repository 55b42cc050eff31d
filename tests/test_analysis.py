"""Analysis: run files and sweep folders as DataFrames, export, plots and ``neurosim show DIR``.

The sweep folders here are written by the tests themselves, per the sweep's contract (DIR/points/*.h5,
DIR/summary.h5 with a compound /summary and DIR/summary.csv): real point runs of a tiny scenario for the
joins, and summaries with chosen numbers for exact statistics and figure content."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

import neurosim
from neurosim import analysis
from neurosim.cli import main
from neurosim.config import ConfigError
from neurosim.store import RunFile

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

TINY = """
name = "tiny_analysis"
description = "a 64-8-10 MLP on 100 digits, for the analysis tests"
seed = 3
[data]
limit = 100
[device]
card = "ecram_liwo3"
[network]
hidden = [8]
[training]
scheme = "bp"
epochs = 2
learning_rate = 0.5
[traces]
weight_epochs = [0, -1]
[links.variation]
value = 0.0
fields = ["device.overrides.g_min_dtod", "device.overrides.g_max_dtod"]
"""
FIXED = analysis.SUMMARY_FIELDS
PNG = b"\x89PNG\r\n\x1a\n"


# ---- writing sweep folders per the contract -------------------------------------------------------------------

def write_summary(folder: Path, rows: list[dict], grid: dict, seeds: list[int], base_toml: str = TINY,
                  h5: bool = True, csv: bool = True) -> None:
    """summary.h5 (compound /summary, text as fixed-length bytes, root attributes) and summary.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    if csv:
        frame.to_csv(folder / "summary.csv", index=False)
    if h5:
        fields, columns = [], {}
        for name in frame.columns:
            values = frame[name].to_numpy()
            if values.dtype.kind in "OUS":
                encoded = np.array([str(v).encode() for v in values])
                columns[name] = encoded
                fields.append((name, f"S{max(1, encoded.dtype.itemsize)}"))
            else:
                columns[name] = values
                fields.append((name, values.dtype))
        table = np.empty(len(frame), dtype=fields)
        for name, values in columns.items():
            table[name] = values
        with h5py.File(folder / "summary.h5", "w") as f:
            f.create_dataset("summary", data=table)
            f.attrs["neurosim_version"] = neurosim.__version__
            f.attrs["base_scenario_toml"] = base_toml
            f.attrs["grid_json"] = json.dumps(grid)
            f.attrs["seeds"] = np.asarray(seeds)


def summary_row(path: Path, **swept) -> dict:
    """One summary row from a point's run file, as the sweep computes it."""
    f = RunFile(path)
    m = f.metrics
    return {"point": path.name, **swept, "seed": f.seed, "final_test_accuracy": m["test_accuracy"][-1],
            "best_test_accuracy": m["test_accuracy"].max(), "final_train_loss": m["train_loss"][-1],
            "sim_time_s": m["sim_time_s"][-1], "energy_j": m["energy_j"][-1], "pulses": m["pulses"][-1],
            "perturbations": m["perturbations"][-1], "epochs": f.epochs, "wall_time_s": m["wall_time_s"].sum(),
            "status": "complete"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.toml").write_text(textwrap.dedent(TINY))
    return folder / "tiny.toml"


@pytest.fixture(scope="module")
def run_file(tiny) -> Path:
    return neurosim.run(tiny, tiny.with_name("tiny.h5")).path


@pytest.fixture(scope="module")
def real_sweep(tiny) -> Path:
    """Four points: variation 0 and 0.2, seeds 1 and 2, one epoch each."""
    folder = tiny.parent / "real_sweep"
    (folder / "points").mkdir(parents=True)
    rows = []
    for variation in (0.0, 0.2):
        for seed in (1, 2):
            out = folder / "points" / f"variation={variation}_seed={seed}.h5"
            neurosim.run(tiny, out, sets={"variation": variation, "seed": seed, "training.epochs": 1})
            rows.append(summary_row(out, variation=variation))
    write_summary(folder, rows, {"variation": [0.0, 0.2]}, [1, 2])
    (folder / "points" / "pending.h5.partial").write_bytes(b"")   # an unfinished point is not a run file yet
    return folder


VARIATIONS = (10.0, 0.0, 2.0, 0.5)   # written out of order: numeric order differs from text order (10 < 2)
SCHEMES = ("dgc", "bp")
SEEDS = (0, 1, 2)


def synthetic_rows(backward: bool = False) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    combos = [(v, s, b) for v in VARIATIONS for s in SCHEMES for b in (("transposed_read", "digital") if backward
                                                                        else (None,))]
    for v, s, b in combos:
        for seed in SEEDS:
            acc = 0.9 - 0.03 * v - (0.1 if s == "dgc" else 0.0) + 0.02 * rng.standard_normal()
            row = {"point": f"v{v}_{s}_{b}_{seed}.h5", "variation": v, "training.scheme": s}
            if backward:
                row["training.bp.backward"] = b
            row.update({"seed": seed, "final_test_accuracy": acc, "best_test_accuracy": acc + 0.01,
                        "final_train_loss": 1.0 + v + rng.random(), "sim_time_s": 10.0 ** (1 + (s == "dgc")) *
                        (1 + 0.1 * rng.random()), "energy_j": 1e-6 * (1 + rng.random()),
                        "pulses": int(rng.integers(1000, 2000)), "perturbations": 0, "epochs": 3,
                        "wall_time_s": rng.random(), "status": "complete"})
            rows.append(row)
    # a point that failed after one epoch: its partial numbers must not enter the means
    rows.append({**rows[0], "point": "failed.h5", "seed": 3, "final_test_accuracy": 0.0, "sim_time_s": 1e9,
                 "status": "failed"})
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("synthetic")
    rows = synthetic_rows()
    write_summary(folder, rows, {"variation": sorted(VARIATIONS), "training.scheme": list(SCHEMES)}, list(SEEDS))
    return folder, pd.DataFrame(rows)


def expected_stats(rows: pd.DataFrame, keys: list[str], stat: str) -> pd.DataFrame:
    done = rows[rows["status"] == "complete"]
    return done.groupby(keys)[stat].agg(mean="mean", std=lambda x: np.std(x, ddof=1), n="count").reset_index()


# ---- runs ---------------------------------------------------------------------------------------------------

def test_runs_frame_is_one_row_per_run_and_epoch_with_the_files_numbers(run_file, real_sweep):
    f = RunFile(run_file)
    frame = analysis.runs_frame(run_file)
    assert len(frame) == 2 and list(frame.columns[:4]) == ["run", "name", "seed", "complete"]
    assert (frame["run"] == "tiny.h5").all() and (frame["seed"] == 3).all() and (frame["name"] == "tiny_analysis").all()
    for key, column in f.metrics.items():
        assert frame[key].tolist() == column.tolist(), key   # exact, text decoded
    assert frame["schemes"].tolist() == ["fc1=bp;fc2=bp"] * 2
    # several files: concatenated, one block per file
    points = sorted((real_sweep / "points").glob("*.h5"))
    both = analysis.runs_frame([run_file, points[0]])
    assert both["run"].tolist() == ["tiny.h5", "tiny.h5", points[0].name]


def test_runs_frame_of_a_sweep_folder_joins_each_points_swept_values(real_sweep):
    frame = analysis.runs_frame(real_sweep)
    assert len(frame) == 4 and list(frame.columns[:2]) == ["point", "variation"]   # the partial point is left out
    for row in frame.to_dict("records"):
        assert row["variation"] == float(row["point"].split("_")[0].split("=")[1])
        assert row["seed"] == int(row["point"].removesuffix(".h5").split("=")[-1])
        assert row["test_accuracy"] == RunFile(real_sweep / "points" / row["point"]).metrics["test_accuracy"][-1]
    # different seeds and variations are different runs (a join on the wrong key would repeat one run's numbers)
    assert frame["train_loss"].nunique() == 4


def test_events_frame_has_every_event_and_its_epoch_by_energy(run_file):
    f = RunFile(run_file)
    events = analysis.events_frame(run_file)
    raw = f.events
    assert list(events.columns) == list(analysis.EVENT_COLUMNS) and len(events) == len(raw) > 0
    assert events["op"].tolist() == [op.decode() for op in raw["op"]]
    assert events["t_s"].to_numpy().tobytes() == raw["t_s"].tobytes()
    m = f.metrics
    per_epoch = events.groupby("epoch")["energy_j"].sum()
    assert per_epoch.index.tolist() == [1, 2]
    np.testing.assert_allclose(per_epoch.to_numpy(), m["delta_energy_j"], rtol=1e-12)
    # every event of epoch e starts before the clock's end of epoch e, and after the end of epoch e - 1
    ends = dict(zip(m["epoch"], m["sim_time_s"], strict=True))
    assert all(events.loc[events.epoch == e, "t_s"].max() < ends[e] for e in (1, 2))
    assert events.loc[events.epoch == 2, "t_s"].min() >= ends[1]


def test_events_whose_energy_does_not_match_keep_no_epoch(run_file, tmp_path):
    copy = tmp_path / "tampered.h5"
    copy.write_bytes(run_file.read_bytes())
    with h5py.File(copy, "a") as f:
        f["metrics/energy_j"][0] *= 1.5   # epoch 1's energy no longer matches its events
    with pytest.warns(UserWarning, match="epoch is left empty"):
        events = analysis.events_frame(copy)
    assert events["epoch"].isna().all() and len(events) == RunFile(copy).event_count


def test_traces_frame_is_long_and_exact(run_file):
    f = RunFile(run_file)
    frame = analysis.traces_frame(run_file)
    assert list(frame.columns) == list(analysis.TRACE_COLUMNS)
    hist = frame[(frame.layer == "fc1") & (frame.series == "histogram")]
    epochs, counts, _ = f.trace("fc1", "histogram")
    assert len(hist) == counts.size and (hist["units"] == "cells").all()
    edges = f.trace_fixed("fc1", "histogram_edges")
    for e_i, epoch in enumerate(epochs):
        for a_i, array in enumerate(("plus", "minus")):
            part = hist[(hist.epoch == epoch) & (hist.array == array)].sort_values("i")
            assert part["value"].tolist() == counts[e_i, a_i].tolist()
            assert part["value"].sum() == 65 * 8                            # every cell of the 65x8 layer
            assert part["bin_low"].tolist() == edges[:-1].tolist() and part["bin_high"].tolist() == edges[1:].tolist()
    weights = frame[(frame.layer == "fc2") & (frame.series == "weights")]
    w_epochs, w, _ = f.trace("fc2", "weights")
    assert w.shape[1:] == (9, 10) and len(weights) == w.size
    for e_i, epoch in enumerate(w_epochs):
        part = weights[weights.epoch == epoch]
        grid = np.full((9, 10), np.nan)
        grid[part["i"].to_numpy(), part["j"].to_numpy()] = part["value"].to_numpy()
        assert np.array_equal(grid, w[e_i].astype(np.float64))
    pulses = frame[(frame.layer == "fc1") & (frame.series == "pulses")]
    assert pulses["value"].tolist() == f.trace("fc1", "pulses")[1].tolist()
    only = analysis.traces_frame(run_file, series=["pulses"])
    assert set(only["series"]) == {"pulses"} and len(only) == 6


# ---- sweeps -------------------------------------------------------------------------------------------------

def test_sweep_frame_reads_summary_h5_and_falls_back_to_csv(synthetic, tmp_path):
    folder, rows = synthetic
    frame = analysis.sweep_frame(folder)
    assert list(frame.columns) == list(rows.columns)
    assert frame["training.scheme"].tolist() == rows["training.scheme"].tolist()   # bytes decoded
    assert frame["final_test_accuracy"].tolist() == rows["final_test_accuracy"].tolist()
    assert frame.attrs["grid"] == {"variation": sorted(VARIATIONS), "training.scheme": list(SCHEMES)}
    assert analysis.swept_keys(frame) == ["variation", "training.scheme"]
    csv_only = tmp_path / "csv_only"
    write_summary(csv_only, synthetic_rows(), {}, [], h5=False)
    from_csv = analysis.sweep_frame(csv_only)
    pd.testing.assert_frame_equal(from_csv, frame, check_dtype=False, check_exact=False, rtol=1e-15)
    # without the grid, the swept keys are the columns outside the contract's fixed list
    assert analysis.swept_keys(from_csv) == ["variation", "training.scheme"]


def test_summary_table_is_mean_and_std_over_seeds_sorted_by_the_axes(synthetic):
    folder, rows = synthetic
    table = analysis.summary_table(folder)
    keys = ["variation", "training.scheme"]
    # numeric axis by value, then the scheme by name: 0 < 0.5 < 2 < 10 (as text 10 would come before 2)
    assert table["variation"].tolist() == [0.0, 0.0, 0.5, 0.5, 2.0, 2.0, 10.0, 10.0]
    assert table["training.scheme"].tolist() == ["bp", "dgc"] * 4
    for stat in ("final_test_accuracy", "sim_time_s", "pulses"):
        expected = expected_stats(rows, keys, stat).sort_values(keys).reset_index(drop=True)
        np.testing.assert_allclose(table[f"{stat}_mean"], expected["mean"], rtol=1e-12)
        np.testing.assert_allclose(table[f"{stat}_std"], expected["std"], rtol=1e-12)
    # the failed point (variation 10, dgc) is counted, not averaged: its 0.0 and 1e9 s are nowhere in the means
    failed = table[(table.variation == 10.0) & (table["training.scheme"] == "dgc")].iloc[0]
    assert failed["n"] == 3 and failed["points"] == 4 and failed["status"] == "3 complete, 1 failed"
    assert table["sim_time_s_mean"].max() < 1e3
    assert (table.drop(failed.name)["status"] == "3 complete").all()


def test_summary_table_with_one_seed_has_no_spread(tmp_path):
    rows = [r for r in synthetic_rows() if r["seed"] == 0]
    write_summary(tmp_path, rows, {"variation": [], "training.scheme": []}, [0])
    table = analysis.summary_table(tmp_path)
    assert (table["n"] == 1).all() and table["final_test_accuracy_std"].isna().all()
    assert table["final_test_accuracy_mean"].notna().all()


def test_show_prints_the_summary_sorted_with_mean_and_std(synthetic, capsys):
    folder, rows = synthetic
    assert main(["show", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "final test acc" in line)
    body = lines[header + 1:header + 9]
    assert [line.split()[0] for line in body] == ["0", "0", "0.5", "0.5", "2", "2", "10", "10"]
    assert [line.split()[1] for line in body] == ["bp", "dgc"] * 4
    expected = expected_stats(rows, ["variation", "training.scheme"], "final_test_accuracy")
    first = expected[(expected.variation == 0.0) & (expected["training.scheme"] == "bp")].iloc[0]
    assert f"{first['mean']:.3f} ± {first['std']:.3f}" in body[0]
    assert "tiny_analysis" in out and "24 complete, 1 failed" in out


# ---- plots --------------------------------------------------------------------------------------------------

def errorbars(ax):
    """(label, x, y, half-lengths of the error bars) of each errorbar line on ``ax``."""
    out = []
    for container in ax.containers:
        line, _, (bars, *_) = container.lines[0], container.lines[1], container.lines[2]
        segments = bars.get_segments()
        half = np.array([(s[1][1] - s[0][1]) / 2 for s in segments])
        out.append((container.get_label(), line.get_xdata(), line.get_ydata(), half))
    return out


def test_plot_of_a_sweep_shows_mean_and_std_per_scheme_against_the_axis(synthetic, tmp_path):
    folder, rows = synthetic
    fig = analysis.plot(folder, tmp_path / "sweep.png")
    acc, other = fig.axes
    assert acc.get_xlabel() == "variation" and "accuracy" in acc.get_ylabel() and "fraction" in acc.get_ylabel()
    assert other.get_ylabel() == "chip time (s)" and other.get_yscale() == "log"
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["bp", "dgc"]
    assert acc.get_legend().get_title().get_text() == "training.scheme"
    assert "tiny_analysis" in fig._suptitle.get_text()
    expected = expected_stats(rows, ["training.scheme", "variation"], "final_test_accuracy")
    lines = errorbars(acc)
    assert len(lines) == 2
    for label, x, y, half in lines:
        mine = expected[expected["training.scheme"] == label].sort_values("variation")
        assert list(x) == [0.0, 0.5, 2.0, 10.0]
        np.testing.assert_allclose(y, mine["mean"], rtol=1e-12)
        np.testing.assert_allclose(half, mine["std"], rtol=1e-9)
    times = expected_stats(rows, ["training.scheme", "variation"], "sim_time_s")
    for label, _, y, _ in errorbars(other):
        np.testing.assert_allclose(y, times[times["training.scheme"] == label].sort_values("variation")["mean"])
    data = (tmp_path / "sweep.png").read_bytes()
    assert data.startswith(PNG) and matplotlib.image.imread(tmp_path / "sweep.png").ndim == 3
    energy = analysis.plot(folder, tmp_path / "sweep.svg", second="energy")
    assert energy.axes[1].get_ylabel() == "chip energy (J)" and energy.axes[1].get_yscale() == "linear"
    assert ET.parse(tmp_path / "sweep.svg").getroot().tag.endswith("svg")


def test_plot_labels_lines_by_the_combination_of_the_other_swept_keys(tmp_path):
    rows = synthetic_rows(backward=True)
    write_summary(tmp_path, rows, {"variation": [], "training.scheme": [], "training.bp.backward": []}, [0, 1, 2])
    fig = analysis.plot(tmp_path)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["bp / digital", "bp / transposed_read", "dgc / digital",
                                                          "dgc / transposed_read"]
    assert legend.get_title().get_text() == "training.scheme / training.bp.backward"
    assert len(fig.axes[0].containers) == 4


def test_plot_of_a_sweep_without_a_numeric_axis_puts_the_first_key_on_x(tmp_path):
    rows = [r for r in synthetic_rows() if r["variation"] == 0.0]
    for r in rows:
        del r["variation"]
    write_summary(tmp_path, rows, {"training.scheme": []}, [0, 1, 2])
    fig = analysis.plot(tmp_path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "training.scheme" and [t.get_text() for t in ax.get_xticklabels()] == ["bp", "dgc"]
    ((label, x, _, _),) = errorbars(ax)
    assert label == "mean over seeds" and list(x) == [0, 1]


def test_plot_of_a_run_has_learning_curves_time_and_energy(run_file, tmp_path):
    f = RunFile(run_file)
    fig = analysis.plot(run_file, tmp_path / "run.svg")
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy (fraction)", "train loss (cross-entropy, nats)",
                                                "chip time, cumulative (s)", "chip energy, cumulative (J)"]
    assert all(ax.get_xlabel() == "epoch" for ax in axes)
    m = f.metrics
    for ax, key in zip(axes, ("test_accuracy", "train_loss", "sim_time_s", "energy_j"), strict=True):
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == m[key].tolist()
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["tiny"]
    title = fig._suptitle.get_text()
    assert "tiny_analysis" in title and "ECRAM LiWO3" in title and "seed 3" in title
    assert ET.parse(tmp_path / "run.svg").getroot().tag.endswith("svg")


def test_plot_of_several_runs_draws_a_line_each(run_file, real_sweep):
    points = sorted((real_sweep / "points").glob("*.h5"))[:2]
    fig = analysis.plot([run_file, *points])
    assert len(fig.axes[0].get_lines()) == 3
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["tiny", points[0].stem, points[1].stem]


# ---- export -------------------------------------------------------------------------------------------------

def test_export_of_a_run_writes_csv_tables_equal_to_the_frames(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", str(run_file), "--format", "csv", "-o", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["events.csv", "metrics.csv", "runs.csv", "traces.csv"]
    assert capsys.readouterr().out.count(str(out)) == 4
    # pandas 3 reads floats back exactly by default; pandas 2's default parser is off by an ulp in ~30 % of cases
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    metrics = pd.read_csv(out / "metrics.csv", **exact)
    frame = analysis.runs_frame(run_file)
    for key in ("test_accuracy", "train_loss", "sim_time_s", "energy_j", "pulse_rate"):   # CSV round-trips floats
        assert metrics[key].tolist() == frame[key].tolist(), key
    events = pd.read_csv(out / "events.csv")
    assert len(events) == RunFile(run_file).event_count and events["op"].iloc[0] == "read"
    traces = pd.read_csv(out / "traces.csv")
    assert len(traces) == len(analysis.traces_frame(run_file))
    runs = pd.read_csv(out / "runs.csv")
    assert runs["seed"].tolist() == [3] and "scenario_toml" not in runs.columns


def test_export_of_a_sweep_adds_the_summary_and_labels_rows_by_point(real_sweep, tmp_path):
    files = analysis.export(real_sweep, tmp_path, "csv", series=())
    assert sorted(p.name for p in files) == ["events.csv", "metrics.csv", "runs.csv", "summary.csv",
                                             "summary_table.csv"]
    table = pd.read_csv(tmp_path / "summary_table.csv")
    assert table["variation"].tolist() == [0.0, 0.2] and table["n"].tolist() == [2, 2]
    events = pd.read_csv(tmp_path / "events.csv")
    assert events["point"].nunique() == 4
    for point, part in events.groupby("point"):
        assert part["energy_j"].sum() == pytest.approx(RunFile(real_sweep / "points" / point).metrics["energy_j"][-1],
                                                       rel=1e-12)


def test_export_to_parquet_where_pyarrow_is_installed(run_file, tmp_path):
    pytest.importorskip("pyarrow")
    analysis.export(run_file, tmp_path, "parquet")
    events = pd.read_parquet(tmp_path / "events.parquet")
    pd.testing.assert_frame_equal(events, analysis.events_frame(run_file), check_dtype=False)
    assert pd.read_parquet(tmp_path / "metrics.parquet")["epoch"].tolist() == [1, 2]


def test_parquet_without_pyarrow_is_refused_with_a_clear_line(run_file, tmp_path, monkeypatch):
    real = analysis.importlib.util.find_spec
    monkeypatch.setattr(analysis.importlib.util, "find_spec", lambda name: None if name == "pyarrow" else real(name))
    with pytest.raises(ConfigError, match="pyarrow"):
        analysis.export(run_file, tmp_path, "parquet")
    assert not list(tmp_path.iterdir())


# ---- bad input ----------------------------------------------------------------------------------------------

def bad_inputs(tmp_path: Path, run_file: Path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    broken = tmp_path / "broken_sweep"
    broken.mkdir()
    (broken / "summary.h5").write_text("garbage")
    return [
        (["show", str(empty)], str(empty)),
        (["plot", str(empty), "-o", str(tmp_path / "f.png")], str(empty)),
        (["export", str(empty), "-o", str(tmp_path / "x")], str(empty)),
        (["export", str(text), "-o", str(tmp_path / "x")], str(text)),
        (["plot", str(text), "-o", str(tmp_path / "f.png")], str(text)),
        (["export", str(run_file), "--format", "xlsx", "-o", str(tmp_path / "x")], "xlsx"),
        (["plot", str(run_file), "-o", str(tmp_path / "f.jpg")], "f.jpg"),
        (["plot", str(broken), "-o", str(tmp_path / "f.png")], "summary.h5 unreadable"),
        (["plot", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "f.png")], "missing.h5"),
    ]


def test_bad_input_is_one_line_naming_the_path_and_exit_2(run_file, tmp_path, capsys):
    for argv, named in bad_inputs(tmp_path, run_file):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], (argv, err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "f.png").exists()


def test_analysis_reads_and_plots_without_importing_torch(run_file, synthetic, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from neurosim import analysis
        analysis.runs_frame({str(run_file)!r}); analysis.events_frame({str(run_file)!r})
        analysis.traces_frame({str(run_file)!r}); analysis.summary_table({str(synthetic[0])!r})
        analysis.plot({str(run_file)!r}, {str(tmp_path / 'a.png')!r})
        analysis.plot({str(synthetic[0])!r}, {str(tmp_path / 'b.png')!r})
        analysis.export({str(run_file)!r}, {str(tmp_path / 'e')!r})
        assert "torch" not in sys.modules and "neurosim.training" not in sys.modules, "torch imported"
        """)
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
