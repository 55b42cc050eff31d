"""Run files (neurosim.store): the layout round-trips exactly, commits are atomic, bad files are one clear error."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from neurosim.engine import EVENT_DTYPE
from neurosim.store import (
    Commit,
    RunFile,
    RunFileError,
    RunWriter,
    metric_columns,
    metric_rows,
    open_run,
    read_tree,
    write_tree,
)

ROWS = [{"epoch": 1, "stage": "", "train_loss": 0.1 + 0.2, "test_accuracy": 1 / 3, "sim_time_s": 1e-300,
         "pulses": 2**62, "delta_pulses": 7, "schemes": {"fc1": "dgc", "fc2": "bp"}, "energy_j": math.nan},
        {"epoch": 2, "stage": "stage2", "train_loss": -0.0, "test_accuracy": 2 / 3, "sim_time_s": 5e-324,
         "pulses": 0, "delta_pulses": 0, "schemes": {"fc1": "bp", "fc2": "bp"}, "energy_j": 1.7976931348623157e308}]


def _events(n: int, t0: float = 0.0) -> np.ndarray:
    e = np.zeros(n, dtype=EVENT_DTYPE)
    e["t_s"] = t0 + np.arange(n) * 1e-7
    e["op"] = b"read"
    e["layer"] = b"fc1"
    e["count"] = np.arange(n)
    return e


def _attrs() -> dict:
    return {"neurosim_version": "0.1.0", "format": 1, "scenario_toml": "seed = 1\n", "seed": 1, "complete": False}


def _chip(epoch: int) -> dict:
    return {"@epoch": epoch, "layers": {"fc1": {"g": np.full((4, 3), epoch, np.float32), "@time_s": 0.5 * epoch}},
            "generators": {"trainer": {"state": np.arange(16, dtype=np.uint8), "@device": "cpu"}}}


def test_metrics_round_trip_exactly_with_their_types():
    columns = metric_columns(ROWS)
    assert columns["pulses"].dtype == np.int64 and columns["train_loss"].dtype == np.float64
    assert columns.mappings == ["schemes"]
    back = metric_rows(columns, columns.mappings)
    for row, original in zip(back, ROWS, strict=True):
        assert list(row) == list(original)
        for key, value in original.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(row[key])
            else:
                assert row[key] == value and type(row[key]) is type(value)
        assert math.copysign(1.0, back[1]["train_loss"]) == -1.0   # -0.0 stays -0.0
    with pytest.raises(ValueError, match="differ"):
        metric_columns([{"a": 1}, {"b": 2}])


def test_a_run_file_written_in_commits_reads_back(tmp_path):
    out = tmp_path / "r.h5"
    writer = RunWriter(out)
    writer.start(_attrs())
    assert not out.exists() and writer.partial.exists()
    edges = np.linspace(0, 1, 5)
    for epoch in (1, 2):
        writer.commit(Commit(metrics=metric_columns(ROWS[:epoch]), events=_events(3, epoch),
                             traces=[("fc1/histogram", epoch, np.array([[1, 2, 3, 4]]), {"units": "cells"}, False),
                                     ("fc1/weights", epoch, np.eye(3, dtype=np.float32), {"units": "1"}, True)],
                             fixed={"fc1/histogram_edges": (edges, {"units": "S"})},
                             chip=_chip(epoch), chip_static={"layers": {"fc1": {"g_min": np.float32(epoch)}}}))
        run = RunFile(writer.partial)
        assert not run.complete and run.epochs == epoch and run.event_count == 3 * epoch
    writer.commit(Commit(), final=True)
    assert out.exists() and not writer.partial.exists() and not writer.temporary.exists()
    run = open_run(out)
    assert run.complete and run.seed == 1 and run.scenario_toml == "seed = 1\n"
    assert run.history[1]["schemes"] == {"fc1": "bp", "fc2": "bp"} and run.final["epoch"] == 2
    assert list(run.metrics) == list(ROWS[0]) and run.metrics["stage"].tolist() == ["", "stage2"]
    assert run.events["t_s"].tolist() == [*_events(3, 1)["t_s"], *_events(3, 2)["t_s"]]
    epochs, values, attrs = run.trace("fc1", "histogram")
    assert epochs.tolist() == [1, 2] and values.shape == (2, 1, 4) and attrs["units"] == "cells"
    assert np.array_equal(run.trace_fixed("fc1", "histogram_edges"), edges)
    chip = run.checkpoint()
    assert chip["@epoch"] == 2 and np.all(chip["layers"]["fc1"]["g"] == 2)     # the last checkpoint
    assert chip["layers"]["fc1"]["g_min"] == 1                                  # written once
    assert chip["generators"]["trainer"]["@device"] == "cpu"
    with h5py.File(out) as f:                                                   # units for plain h5py readers
        assert f["metrics/sim_time_s"].attrs["units"] == "s" and f["metrics/energy_j"].attrs["units"] == "J"
        assert f["metrics/delta_pulses"].attrs["units"] == "pulses"


def test_a_checkpoint_overwrites_in_place_so_the_file_does_not_grow(tmp_path):
    writer = RunWriter(tmp_path / "r.h5")
    writer.start(_attrs())
    sizes = []
    for epoch in range(1, 6):
        chip = _chip(epoch)
        chip["layers"]["fc1"]["g"] = np.random.default_rng(epoch).random((200, 100), dtype=np.float32)
        writer.commit(Commit(metrics=metric_columns([{"epoch": e} for e in range(1, epoch + 1)]), chip=chip))
        sizes.append(writer.partial.stat().st_size)
    assert sizes[-1] == sizes[1]


def test_an_interrupted_commit_leaves_the_last_version_whole(tmp_path):
    writer = RunWriter(tmp_path / "r.h5")
    writer.start(_attrs())
    writer.commit(Commit(metrics=metric_columns(ROWS[:1]), events=_events(2), chip=_chip(1)))
    before = writer.partial.read_bytes()
    bad = {"@epoch": 2, "oops": np.array([object()], dtype=object)}   # refused halfway through the commit
    with pytest.raises(TypeError, match="cannot go into a run file"):
        writer.commit(Commit(metrics=metric_columns(ROWS), events=_events(2), chip=bad))
    assert writer.partial.read_bytes() == before and not writer.temporary.exists()
    # a temporary file left by a killed process is never taken for the run, and goes at the next commit
    writer.temporary.write_bytes(b"half a file")
    writer.commit(Commit(metrics=metric_columns(ROWS)))
    assert RunFile(writer.partial).epochs == 2 and not writer.temporary.exists()


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("epoch,acc\n1,0.5\n"), "not an HDF5 file"),
    (lambda p: h5py.File(p, "w").close(), "not a neurosim run file"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_a_file_that_is_not_a_run_file_is_one_error_naming_it(tmp_path, make, reason):
    path = tmp_path / "x.h5"
    make(path)
    with pytest.raises(RunFileError, match=reason) as e:
        RunFile(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_a_truncated_or_newer_run_file_is_refused(tmp_path):
    writer = RunWriter(tmp_path / "r.h5")
    writer.start(_attrs())
    writer.commit(Commit(metrics=metric_columns(ROWS), events=_events(5000)), final=True)
    data = (tmp_path / "r.h5").read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match=str(cut)):
        RunFile(cut).events  # noqa: B018 - reading is what fails
    with h5py.File(tmp_path / "r.h5", "a") as f:
        f.attrs["format"] = 99
    with pytest.raises(RunFileError, match="newer"):
        RunFile(tmp_path / "r.h5")


def test_missing_run_points_at_its_unfinished_partial(tmp_path):
    writer = RunWriter(tmp_path / "r.h5")
    writer.start(_attrs())
    with pytest.raises(RunFileError, match=r"unfinished run is in r\.h5\.partial"):
        RunFile(tmp_path / "r.h5")


def test_trees_keep_arrays_and_attributes_and_refuse_objects(tmp_path):
    tree = {"@name": "x", "@n": 3, "a": np.arange(3), "sub": {"@units": "S", "b": np.float32(2.5)}}
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_tree(f, tree)
        with pytest.raises(TypeError):
            write_tree(f, {"s": np.array(["text"])})
    with h5py.File(tmp_path / "t.h5") as f:
        back = read_tree(f)
    assert back["@name"] == "x" and back["@n"] == 3 and back["sub"]["@units"] == "S"
    assert np.array_equal(back["a"], np.arange(3)) and back["sub"]["b"] == np.float32(2.5)
