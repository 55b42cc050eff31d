"""Sweeps: the grid becomes points, every executor gives the serial sweep's numbers bit for bit, a sweep killed by
SIGKILL at any moment finishes on rerun without recomputing what was done, a worker that dies costs only its
point, and bad grids are one line with exit 2 and nothing written."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest

import neurosim.sweep
from neurosim.cli import main
from neurosim.config import ConfigError
from neurosim.store import RunFile, RunFileError
from neurosim.sweep import parse_grid, plan, read_summary, run_sweep, split_values
from tests.h5compare import differences, tree

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses (the CLI, spawned workers) import this checkout's neurosim and this test module.
# One torch thread, as in this process (conftest): the same arithmetic, and no contention on a small machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}

# Four small points (BP and DGC, two seeds), two epochs each: a checkpoint exists mid-point.
SMALL = """
    seed = 5
    [data]
    name = "digits"
    limit = 100
    [device]
    card = "taox_hfox"
    [network]
    hidden = [8]
    [training]
    scheme = "bp"
    epochs = 2
    learning_rate = 0.3
    [traces]
    histogram_bins = 8
    [sweep]
    grid = { "training.scheme" = ["bp", "dgc"] }
    seeds = 2
    """
# Six longer points (3 epochs on 320 training digits) for the kills.
KILLED = """
    seed = 11
    [data]
    name = "digits"
    limit = 400
    [device]
    card = "taox_hfox"
    [network]
    hidden = [8]
    [training]
    scheme = "bp"
    epochs = 3
    learning_rate = 0.3
    [traces]
    histogram_bins = 8
    [sweep]
    grid = { "training.scheme" = ["bp", "dgc", "hybrid"] }
    seeds = 2
    """
# What differs between two runs of one point: when, how long, how often resumed.


def scenario(folder: Path, text: str = SMALL, name: str = "small") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    return path


def summary_differences(a: Path, b: Path) -> list[str]:
    """Fields of /summary and root attributes of summary.h5 that differ, wall times aside."""
    ta, tb = read_summary(a), read_summary(b)
    out = [] if ta.dtype == tb.dtype and ta.shape == tb.shape else ["dtype or shape"]
    out += [n for n in ta.dtype.names if n != "wall_time_s" and ta[n].tobytes() != tb[n].tobytes()]
    with h5py.File(a / "summary.h5") as fa, h5py.File(b / "summary.h5") as fb:
        out += differences({k: v for k, v in fa.attrs.items()}, {k: v for k, v in fb.attrs.items()}, "@")
    return out


def point_files(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "points").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small sweep run serially in this process: what every other way of running it must give."""
    folder = tmp_path_factory.mktemp("reference")
    result = run_sweep(scenario(folder), folder / "out")
    assert result.complete and not result.failed
    return folder / "out"


def test_the_grid_expands_into_named_points_with_linked_keys_and_seeds(tmp_path):
    path = scenario(tmp_path, SMALL.replace('grid = { "training.scheme" = ["bp", "dgc"] }', textwrap.dedent("""\
        grid = { "training.scheme" = ["bp", "bp", "dgc"], "training.bp.backward" = ["transposed_read",
                 "digital_model", "transposed_read"], "training.learning_rate" = [0.3, 1] }
        linked = [["training.scheme", "training.bp.backward"]]""")))
    p = plan(path)
    assert p.axes == ("training.bp.backward", "training.learning_rate", "training.scheme")
    assert len(p.points) == 3 * 2 * 2   # the linked pair is one axis of 3, learning rate 2, seeds 2
    first = p.points[0]
    assert first.values == {"training.bp.backward": "transposed_read", "training.learning_rate": 0.3,
                            "training.scheme": "bp"}
    assert first.name == "backward=transposed_read_learning_rate=0.3_scheme=bp_seed=5"
    assert [pt.seed for pt in p.points[:2]] == [5, 6]
    # the values a point's scenario holds (1 -> 1.0), and the point is the run of exactly that scenario
    assert {pt.values["training.learning_rate"] for pt in p.points} == {0.3, 1.0}
    assert all(pt.scenario.training.scheme == pt.values["training.scheme"] and pt.scenario.seed == pt.seed
               for pt in p.points)
    assert {(pt.values["training.scheme"], pt.values["training.bp.backward"]) for pt in p.points} == {
        ("bp", "transposed_read"), ("bp", "digital_model"), ("dgc", "transposed_read")}
    assert len({pt.name for pt in p.points}) == len(p.points)
    # a point carries no [sweep] table: it is the run `neurosim run` makes of its settings
    assert all(pt.scenario.sweep.grid == {} for pt in p.points)
    # the command line replaces an axis of the table and adds others
    q = plan(path, grid={"training.learning_rate": [0.5], "network.hidden": [[4], [8, 4]]}, seeds=1)
    assert q.axes == ("network.hidden", "training.bp.backward", "training.learning_rate", "training.scheme")
    assert len(q.points) == 2 * 3 * 1 and {pt.values["network.hidden"] for pt in q.points} == {(4,), (8, 4)}
    assert q.points[0].name.startswith("hidden=4_backward=")


def test_names_stay_unique_and_safe_when_values_differ_only_in_unsafe_characters(tmp_path):
    path = scenario(tmp_path)
    p = plan(path, grid={"name": ["a b", "a-b", "A-B", "x/y"]}, seeds=1)
    names = [pt.name for pt in p.points]   # 4 names × 2 schemes of the file's grid
    assert len({n.lower() for n in names}) == 8   # unique even where case is not told apart
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+=-") for n in names)
    assert "name=x-y_scheme=bp_seed=5" in names   # no clash: no hash
    clashing = [n for n in names if n.lower().startswith("name=a-b_scheme=bp_")]
    assert len(clashing) == 3 and all(len(n) == len("name=a-b_scheme=bp_seed=5") + 9 for n in clashing)


def test_grid_values_are_toml_literals_split_on_commas_outside_brackets_and_quotes():
    assert split_values('0,0.1, [16, 8],"a,b", {a = 1, b = 2}') == ["0", "0.1", "[16, 8]", '"a,b"',
                                                                     "{a = 1, b = 2}"]
    assert parse_grid(["variation=0,0.1", "network.hidden=[8],[16,8]", "training.scheme=bp,dgc"]) == {
        "variation": [0, 0.1], "network.hidden": [[8], [16, 8]], "training.scheme": ["bp", "dgc"]}
    assert parse_grid(["variation="]) == {"variation": []}   # refused by the plan: no value
    with pytest.raises(ConfigError):
        parse_grid(["variation"])


def test_the_summary_holds_one_row_per_point_with_the_contracts_columns(reference):
    table = read_summary(reference)
    p = plan(reference / "sweep.toml")
    assert table.dtype.names == ("point", "training.scheme", "seed", "final_test_accuracy", "best_test_accuracy",
                                 "final_train_loss", "sim_time_s", "energy_j", "pulses", "perturbations", "epochs",
                                 "wall_time_s", "status")
    assert [r.decode() for r in table["point"]] == [pt.name + ".h5" for pt in p.points] == point_files(reference)
    for row, pt in zip(table, p.points, strict=True):
        run = RunFile(reference / "points" / row["point"].decode())
        m = run.metrics
        assert row["training.scheme"].decode() == run.attrs["scheme"] == pt.values["training.scheme"]
        assert row["seed"] == run.seed == pt.seed
        assert row["final_test_accuracy"] == m["test_accuracy"][-1] and row["epochs"] == len(m["epoch"]) == 2
        assert row["best_test_accuracy"] == m["test_accuracy"].max()
        assert row["final_train_loss"] == m["train_loss"][-1]
        assert (row["sim_time_s"], row["energy_j"]) == (m["sim_time_s"][-1], m["energy_j"][-1]) and row["energy_j"] > 0
        assert (row["pulses"], row["perturbations"]) == (m["pulses"][-1], m["perturbations"][-1])
        assert row["wall_time_s"] == m["wall_time_s"].sum() and row["status"] == b"done"
        assert (row["perturbations"] > 0) == (pt.values["training.scheme"] == "dgc")
    with h5py.File(reference / "summary.h5") as f:
        attrs = dict(f.attrs)
    assert attrs["complete"] and attrs["points_done"] == attrs["points_total"] == 4 and attrs["seeds"] == 2
    assert json.loads(attrs["grid_json"]) == {"training.scheme": ["bp", "dgc"]}
    assert "[sweep]" in attrs["base_scenario_toml"] and attrs["neurosim_version"]
    with open(reference / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(table.dtype.names) and len(rows) == len(table)
    for row, r in zip(rows, table, strict=True):
        assert row["point"] == r["point"].decode() and int(row["seed"]) == r["seed"]
        assert float(row["final_test_accuracy"]) == r["final_test_accuracy"]   # repr: every bit kept
        assert float(row["energy_j"]) == r["energy_j"]


def test_a_dask_local_cluster_with_2_workers_gives_the_serial_sweep_bit_for_bit(tmp_path, reference):
    """Results travel back from the workers (no shared folder is assumed); every point file and the summary
    equal the serial sweep's, wall times and dates aside."""
    out = tmp_path / "dask"
    result = run_sweep(scenario(tmp_path), out, workers=2)
    assert result.complete and not result.failed and sorted(result.ran) == sorted(r[:-3] for r in
                                                                                   point_files(reference))
    assert point_files(out) == point_files(reference)
    assert summary_differences(out, reference) == []
    for name in point_files(reference):
        assert differences(tree(out / "points" / name), tree(reference / "points" / name)) == [], name
    assert not any(p.name.endswith((".partial", ".tmp")) for p in out.rglob("*"))


def test_the_same_sweep_twice_gives_identical_datasets_and_a_rerun_redoes_nothing(tmp_path, reference):
    out = tmp_path / "again"
    run_sweep(scenario(tmp_path), out)
    assert summary_differences(out, reference) == []
    for name in point_files(reference):
        assert differences(tree(out / "points" / name), tree(reference / "points" / name)) == [], name
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    again = run_sweep(scenario(tmp_path), out)
    assert again.ran == [] and again.complete
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == stamps


def die_once(task):
    """The worker running the point named in NEUROSIM_TEST_DIE_POINT dies (os._exit) the first time, after
    the point's first epoch is committed; workers import this module by name."""
    from neurosim import runner

    marker = Path(os.environ["NEUROSIM_TEST_DIE_MARKER"])
    if task["name"] == os.environ["NEUROSIM_TEST_DIE_POINT"] and not marker.exists():
        marker.touch()
        commit_epoch = runner._Recorder.epoch

        def epoch_then_die(self, row):
            commit_epoch(self, row)
            os._exit(1)

        runner._Recorder.epoch = epoch_then_die
    real = getattr(neurosim.sweep, "_run_point", neurosim.sweep.run_point)   # a worker's module is not patched
    return real(task)


@pytest.mark.parametrize("executor", ["dask", "processes"])
def test_a_worker_that_dies_costs_only_its_point_which_is_retried(tmp_path, reference, monkeypatch, executor):
    """A worker process dies in the middle of a point (after its first epoch): the point runs again (Dask's
    scheduler, or a new process pool) and the sweep equals the serial one; the others are not lost."""
    marker = tmp_path / "died"
    victim = plan(scenario(tmp_path)).points[2].name
    monkeypatch.setenv("NEUROSIM_TEST_DIE_MARKER", str(marker))
    monkeypatch.setenv("NEUROSIM_TEST_DIE_POINT", victim)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])
    monkeypatch.setattr(neurosim.sweep, "_run_point", neurosim.sweep.run_point, raising=False)
    monkeypatch.setattr(neurosim.sweep, "run_point", die_once)
    out = tmp_path / executor
    result = run_sweep(scenario(tmp_path), out, workers=2, executor=executor)
    assert marker.exists(), "the worker did not die: nothing was tested"
    assert result.complete and not result.failed
    assert summary_differences(out, reference) == []
    victim_file = out / "points" / f"{victim}.h5"
    assert RunFile(victim_file).attrs["resumed"] == 1   # from the checkpoint its dead worker left
    assert differences(tree(victim_file), tree(reference / "points" / f"{victim}.h5")) == []


def _complete_files(folder: Path) -> dict[str, int]:
    """Finished point files and their modification times (ns)."""
    out = {}
    for p in (folder / "points").glob("*.h5"):
        out[p.name] = p.stat().st_mtime_ns
    return out


def _wait(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if predicate():
                return True
        except (RunFileError, OSError):
            pass
        time.sleep(0.01)
    return False


def _state(folder: Path) -> dict[str, int]:
    """Every file of the points folder and its modification time: what changes as a sweep works."""
    if not (folder / "points").exists():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in (folder / "points").iterdir()}


def _a_checkpointed_partial(folder: Path) -> bool:
    return any(RunFile(p).epochs >= 1 for p in (folder / "points").glob("*.h5.partial"))


def test_a_sweep_killed_by_sigkill_at_random_moments_finishes_on_rerun(tmp_path):
    """`neurosim sweep` killed with SIGKILL: first in the middle of a point (a checkpoint on disk), then at
    random moments; the rerun skips finished points (their files untouched), resumes the killed point from its
    checkpoint, and ends with every point exactly once, every file readable, the numbers of an uninterrupted
    sweep."""
    path = scenario(tmp_path, KILLED, "killed")
    full = tmp_path / "full"
    run_sweep(path, full)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "neurosim.cli", "sweep", str(path), "-o", str(out), "--quiet"]
    rng = random.Random(2026)
    kept: dict[str, int] = {}
    resumed_from_checkpoint: set[str] = set()
    kills = 0
    for _ in range(4):   # until one kill caught a checkpointed point, then one at a random moment
        if resumed_from_checkpoint and kills >= 2:
            break
        before = _state(out)
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if not resumed_from_checkpoint:   # in the middle of a point, after its first epoch's checkpoint
                _wait(lambda: _a_checkpointed_partial(out), proc)
            else:                             # anywhere, once this run is under way
                _wait(lambda before=before: _state(out) != before, proc)
                time.sleep(rng.uniform(0.0, 0.8))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            _, err = proc.communicate()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
        # what the kill left: finished files keep their times from now on; checkpointed partials resume
        done = _complete_files(out)
        assert all(kept[n] == t for n, t in done.items() if n in kept)
        kept.update(done)
        for p in (out / "points").glob("*.h5.partial"):
            with contextlib.suppress(RunFileError):
                if RunFile(p).epochs >= 1:
                    resumed_from_checkpoint.add(p.name.removesuffix(".partial"))
        # a killed sweep keeps a valid summary of what finished (all of it, but for a point whose file was
        # renamed into place in the instant before the kill)
        listed = {r.decode() for r in read_summary(out)["point"]}
        assert listed <= set(kept) and len(set(kept) - listed) <= 1
    assert kills >= 1 and resumed_from_checkpoint
    assert main(["sweep", str(path), "-o", str(out), "--quiet"]) == 0
    assert point_files(out) == point_files(full)   # each point once, nothing left over
    for name in point_files(full):
        run = RunFile(out / "points" / name)
        assert run.complete
        if name in kept:
            assert (out / "points" / name).stat().st_mtime_ns == kept[name], f"{name} was recomputed"
        if name in resumed_from_checkpoint:
            assert run.attrs["resumed"] >= 1
        assert differences(tree(out / "points" / name), tree(full / "points" / name)) == [], name
    assert summary_differences(out, full) == []


@pytest.mark.parametrize(("args", "field"), [
    (["--grid", "nosuch.field=1,2"], "--grid nosuch.field"),
    (["--grid", "variation=0,1"], "--grid variation"),                 # no link of that name here
    (["--grid", "training.epochs="], "--grid training.epochs"),         # an empty list
    (["--grid", "training.epochs=1,two"], "--grid training.epochs"),    # a value of the wrong type
    (["--grid", "training.learning_rate=0.1,-1"], "--grid training.learning_rate"),   # out of range
    (["--grid", "training.scheme=bp,sgd"], "--grid training.scheme"),
    (["--grid", "training.epochs=1,1.0"], "--grid training.epochs"),    # one value twice
    (["--grid", "seed=1,2"], "--grid seed"),
    (["--grid", "training.epochs"], "--grid"),
    (["--seeds", "0"], "--seeds"),
    (["--executor", "processes", "--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
])
def test_bad_grids_are_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, args, field):
    path = scenario(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("neurosim sweep: error:") and field in err, err
    assert not out.exists()


def test_a_scheduler_that_does_not_answer_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(neurosim.sweep, "SCHEDULER_TIMEOUT_S", 1.0)
    silent = socket.socket()   # accepts connections, never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        out = tmp_path / "out"
        t0 = time.monotonic()
        assert main(["sweep", str(scenario(tmp_path)), "-o", str(out), "--scheduler", address]) == 2
        assert time.monotonic() - t0 < 20
    finally:
        silent.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--scheduler" in err and address in err, err
    assert not out.exists()


def test_two_sweeps_into_one_folder_are_refused_in_one_line(tmp_path, capsys, reference):
    path = scenario(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    for args, what in ((["--grid", "training.scheme=bp,hybrid"], "sweep.grid.training.scheme"),
                       (["--seeds", "3"], "sweep.seeds"),
                       (["--set", "training.epochs=3"], "training.epochs")):
        assert main(["sweep", str(path), "-o", str(reference), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(reference) in err and "another sweep" in err and what in err, err
    # a folder that is not a sweep's
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["sweep", str(path), "-o", str(other)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == stamps
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_the_command_prints_progress_and_a_line_and_dry_run_writes_nothing(tmp_path, capsys):
    path = scenario(tmp_path)
    out = tmp_path / "out"
    assert main(["sweep", str(path), "-o", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == [pt.name for pt in plan(path).points] and not out.exists()
    assert main(["sweep", str(path), "-o", str(out), "--grid", "training.scheme=bp", "--seeds", "1"]) == 0
    captured = capsys.readouterr()
    assert "1 of 1 points done" in captured.out and "1/1" in captured.err and "left=0" in captured.err   # the bar
    assert point_files(out) == ["scheme=bp_seed=5.h5"]


class _FakePool:
    """A process pool in which the first task finishes at once and the second's worker then dies: the pool is
    broken by the time the executor submits the third (the race between a result and a death)."""

    def __init__(self, breaks: bool):
        from concurrent.futures import Future

        self.Future, self.breaks, self.futures = Future, breaks, []

    def submit(self, fn, task):
        from concurrent.futures.process import BrokenProcessPool

        if self.breaks and len(self.futures) == 2:
            for f in self.futures:
                if not f.done():
                    f.set_exception(BrokenProcessPool("a worker died"))
            raise BrokenProcessPool("a worker died")
        f = self.Future()
        if not self.breaks or not self.futures:
            f.set_result({"name": task["name"]})
        self.futures.append(f)
        return f

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_a_pool_broken_between_a_result_and_the_next_submit_retries_the_points(monkeypatch):
    """A worker that dies while another point's result is being recorded breaks the pool before the next
    submit: the executor must treat that like any death (run the dead worker's point again on a new pool),
    not raise."""
    pools = iter([_FakePool(breaks=True), _FakePool(breaks=False)])
    executor = neurosim.sweep._Processes(2)
    monkeypatch.setattr(executor, "_pool", lambda: next(pools))
    tasks = [{"name": n} for n in "abcd"]
    results = dict((task["name"], result) for task, result in executor.run(tasks))
    assert results == {n: {"name": n} for n in "abcd"}
