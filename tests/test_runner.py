"""The runner: a scenario becomes one run file; an interrupted run (an exception, or kill -9 even in the middle of a
write) resumes to the same numbers as an uninterrupted one, bit for bit on CPU; a trained chip reloads; the run and
show commands are thin and bad input is one line with exit 2."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import neurosim
from neurosim import chip_state
from neurosim.backend import fast_bfloat16
from neurosim.cli import main
from neurosim.crossbar import MIXED
from neurosim.store import RunFile, RunFileError
from tests.h5compare import differences, tree

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import this checkout's neurosim, whatever the environment has installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# Every scenario exercises a different part of the state a checkpoint must carry: drift (the clock), dropout,
# neuron and derivative-circuit noise, momentum (bp_drift); DGC's linearized draws and the clock off (hybrid);
# pulse perturbations with cycle-to-cycle noise (dgc); the switch of the neuron circuits to trained Taylor
# polynomials in the middle of the run (two_stage, interrupted in stage 2).
SCENARIOS = {
    "bp_drift": """
        seed = 7
        [data]
        limit = 96
        [device]
        card = "gst_pcm"
        [network]
        hidden = [8]
        dropout = 0.25
        [network.activation]
        noise = 0.02
        derivative_noise = 0.02
        gain_dtod = 0.1
        [training]
        scheme = "bp"
        epochs = 3
        learning_rate = 0.3
        momentum = 0.5
        [traces]
        weight_epochs = [1, -1]
        """,
    "hybrid": """
        seed = 8
        [data]
        limit = 96
        [device]
        card = "taox_hfox"
        [network]
        hidden = [8]
        [training]
        scheme = "hybrid"
        epochs = 3
        learning_rate = 0.3
        clock = false
        [training.dgc]
        mode = "linearized"
        """,
    "dgc": """
        seed = 9
        [data]
        limit = 64
        [device]
        card = "taox_hfox"
        [network]
        hidden = [6]
        [training]
        scheme = "dgc"
        epochs = 3
        learning_rate = 0.3
        [training.dgc]
        perturbation = "pulse"
        """,
    "two_stage": """
        seed = 10
        [data]
        limit = 96
        [device]
        card = "ecram_liwo3"
        [network]
        hidden = [8]
        [training]
        scheme = "two_stage"
        learning_rate = 0.3
        [training.two_stage]
        stage1_epochs = 1
        stage2_epochs = 2
        train_weights = true
        """,
}
# What differs between two runs of the same scenario: when they ran, how long they took, how often resumed.


def scenario(tmp_path: Path, name: str, text: str | None = None) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(text or SCENARIOS[name]))
    return path


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Each scenario run once without interruption: the reference."""
    folder = tmp_path_factory.mktemp("full")
    return {name: neurosim.run(scenario(folder, name), folder / f"{name}.h5") for name in SCENARIOS}


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def callback(row):
        if row["epoch"] == epoch:
            raise Stop
    return callback


@pytest.mark.parametrize(("name", "stop"), [("bp_drift", 1), ("hybrid", 2), ("dgc", 2), ("two_stage", 2)])
def test_an_interrupted_run_resumes_to_the_same_numbers_bit_for_bit(tmp_path, full_runs, name, stop):
    path, out = scenario(tmp_path, name), tmp_path / "run.h5"
    with pytest.raises(Stop):
        neurosim.run(path, out, on_epoch=stop_after(stop))
    assert not out.exists()                                   # an unfinished run never looks finished
    partial = RunFile(tmp_path / "run.h5.partial")
    assert not partial.complete and partial.epochs == stop and partial.checkpoint()["@epoch"] == stop
    resumed = neurosim.run(path, out)
    assert resumed.resumed_from == stop and resumed.complete and resumed.attrs["resumed"] == 1
    assert not (tmp_path / "run.h5.partial").exists()
    assert differences(tree(full_runs[name].path), tree(out)) == []
    # and the chips in memory: the resumed trainer carries on exactly as the uninterrupted one
    a, b = full_runs[name].network.analog_layers, resumed.network.analog_layers
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la.crossbar.plus.conductance(), lb.crossbar.plus.conductance())


def test_without_checkpoints_an_interrupted_run_starts_over_and_the_finished_file_keeps_the_chip(tmp_path,
                                                                                                   full_runs):
    path, out = scenario(tmp_path, "hybrid"), tmp_path / "run.h5"
    sets = {"output.checkpoint": False}
    with pytest.raises(Stop):
        neurosim.run(path, out, sets=sets, on_epoch=stop_after(2))
    partial = RunFile(tmp_path / "run.h5.partial")
    assert partial.epochs == 2 and not partial.has_checkpoint
    run = neurosim.run(path, out, sets=sets)
    assert run.resumed_from is None and run.checkpoint()["@epoch"] == 3
    # the same numbers as the run with checkpoints; only the scenario's text says otherwise
    assert sorted(differences(tree(full_runs["hybrid"].path), tree(out))) == ["/@scenario_sha256",
                                                                              "/@scenario_toml"]


def test_the_run_file_holds_what_the_issue_lists(full_runs):
    run = full_runs["bp_drift"]
    assert run.complete and run.epochs == 3 and run.seed == 7
    assert "gst_pcm" in run.scenario_toml and run.attrs["scenario_sha256"] and run.attrs["torch_version"]
    # the scenario leaves it 'auto': the file says what that was on this machine
    assert run.attrs["noise_variance_precision"] == (MIXED if fast_bfloat16("cpu") else "float32")
    for key in ("epoch", "stage", "train_loss", "test_accuracy", "sim_time_s", "energy_j", "pulses", "perturbations",
                "wall_time_s"):
        assert len(run.metrics[key]) == 3, key
    assert run.metrics["epoch"].tolist() == [1, 2, 3] and np.all(np.diff(run.metrics["sim_time_s"]) > 0)
    events = run.events
    assert set(events.dtype.names) == {"t_s", "duration_s", "op", "layer", "count", "energy_j"}
    assert math.isclose(events["energy_j"].sum(), run.final["energy_j"], rel_tol=1e-9)   # the whole trace is there
    assert run.trace_layers() == ["fc1", "fc2"]
    epochs, counts, attrs = run.trace("fc1", "histogram")
    assert epochs.tolist() == [0, 1, 2, 3] and attrs["units"] == "cells"
    assert np.all(counts.sum(axis=2) == 65 * 8)              # every cell of each array, drift included
    epochs, weights, _ = run.trace("fc1", "weights")
    assert epochs.tolist() == [1, 3] and weights.shape == (2, 65, 8)
    assert np.array_equal(weights[-1], run.network.analog_layers[0].crossbar.weights().numpy())
    epochs, pulses, _ = run.trace("fc2", "pulses")
    assert pulses[0] == 0 and np.all(np.diff(pulses) > 0)
    chip = run.checkpoint()
    assert chip["@epoch"] == 3 and chip["layers"]["fc1"]["arrays"]["plus"]["g"].shape == (65, 8)
    assert chip["layers"]["fc1"]["arrays"]["plus"]["drift_nu"] == np.float32(0.1)   # sampled parameters
    assert "fc1.neurons.noise@cpu" in chip["generators"] and "dropout1.dropout" in chip["generators"]
    two = full_runs["two_stage"]
    assert two.metrics["stage"].tolist() == ["stage1", "stage2", "stage2"]
    epochs, coefficients, _ = two.trace("fc1", "coefficients")
    assert epochs.tolist() == [2, 3] and not np.array_equal(coefficients[0], coefficients[1])   # trained


def test_nothing_in_a_run_file_is_a_python_object(full_runs):
    """Plain numbers, fixed-width bytes and text attributes only: no pickles, no object references."""
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            kinds = [obj.dtype] if obj.dtype.names is None else [obj.dtype[n] for n in obj.dtype.names]
            assert all(k.kind in "biufS" for k in kinds), name
        for key, value in obj.attrs.items():
            assert isinstance(value, str | bytes | np.generic | np.ndarray), (name, key)
            assert not (isinstance(value, np.ndarray) and value.dtype.kind == "O"), (name, key)
    for run in full_runs.values():
        with h5py.File(run.path) as f:
            visit("/", f)
            f.visititems(visit)


def test_every_random_stream_is_in_the_checkpoint(full_runs):
    for run in full_runs.values():
        assert chip_state.stray_generators(run.trainer) == []
    trainer = full_runs["bp_drift"].trainer
    assert {"trainer", "shuffle", "fc1.noise", "fc1.read_noise", "dropout1.dropout",
            "fc1.neurons.d_noise@cpu"} <= set(chip_state.generators(trainer))


def test_a_checkpoint_without_one_of_the_chips_streams_is_refused(tmp_path, full_runs):
    """A checkpoint that lacks a stream the chip draws from (one written before the read noise had its own
    stream) would continue with that stream as seeded: other numbers than the interrupted run. Refused."""
    out = tmp_path / "old.h5"
    out.write_bytes(full_runs["bp_drift"].path.read_bytes())
    with h5py.File(out, "r+") as f:
        del f["chip/generators/fc1.read_noise"]
    with pytest.raises(RunFileError, match=r"lacks the random stream.*fc1\.read_noise"):
        neurosim.load_chip(out)


def test_a_trained_chip_reloads_for_inference_and_further_training(tmp_path, full_runs):
    path = scenario(tmp_path, "bp_drift")
    neurosim.run(path, tmp_path / "two.h5", sets={"training.epochs": 2})
    chip = neurosim.load_chip(tmp_path / "two.h5")
    assert chip.epoch == 2 and chip.trainer.epoch == 2
    row = chip.trainer.run_epochs(1)[-1]               # one more epoch: the third epoch of the 3-epoch run
    full = full_runs["bp_drift"]
    assert {k: v for k, v in row.items() if k != "wall_time_s"} == \
        {k: v for k, v in full.trainer.history[-1].items() if k != "wall_time_s"}
    for a, b in zip(chip.network.analog_layers, full.network.analog_layers, strict=True):
        assert torch.equal(a.crossbar.plus.g, b.crossbar.plus.g) and torch.equal(a.crossbar.believed,
                                                                                 b.crossbar.believed)
    # inference without the data set: the same chip, the same random streams, the same outputs
    bare = neurosim.load_chip(full.path, data=False)
    assert bare.trainer is None and bare.data is None
    x = full.chip.data.x_test[:16]
    fresh = neurosim.load_chip(full.path)
    with torch.no_grad():
        assert torch.equal(bare.network(x), fresh.network(x))


def _wait_for_checkpoint(partial: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if RunFile(partial).epochs >= 1:
                return
        except (RunFileError, OSError):
            pass
        time.sleep(0.02)


def test_a_run_killed_by_sigkill_resumes_to_the_same_numbers(tmp_path, full_runs):
    """A real kill -9 of `neurosim run` once the first epoch is on disk, wherever the run then is (training,
    or in the middle of a commit): the rerun finishes it to the uninterrupted run's numbers."""
    path, out = scenario(tmp_path, "dgc"), tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "neurosim.cli", "run", str(path), "-o", str(out), "--quiet"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_checkpoint(tmp_path / "killed.h5.partial", proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert main(["run", str(path), "-o", str(out), "--quiet"]) == 0
    assert differences(tree(full_runs["dgc"].path), tree(out)) == []


KILL_INSIDE_A_COMMIT = """
import os, signal, sys
import neurosim
from neurosim import store

add = store.RunWriter._add
def add_then_die(f, commit, final):
    add(f, commit, final)
    if commit.metrics and len(commit.metrics["epoch"]) == 2:   # epoch 2 written to the temporary file
        os.kill(os.getpid(), signal.SIGKILL)
store.RunWriter._add = staticmethod(add_then_die)
neurosim.run(sys.argv[1], sys.argv[2])
"""


def test_a_kill_inside_a_commit_loses_only_that_epoch(tmp_path, full_runs):
    path, out = scenario(tmp_path, "two_stage"), tmp_path / "cut.h5"
    proc = subprocess.run([sys.executable, "-c", KILL_INSIDE_A_COMMIT, str(path), str(out)], cwd=tmp_path,
                          env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "cut.h5.tmp").exists() and not out.exists()   # the half-made commit was never renamed
    assert RunFile(tmp_path / "cut.h5.partial").epochs == 1
    run = neurosim.run(path, out)
    assert run.resumed_from == 1 and not (tmp_path / "cut.h5.tmp").exists()
    assert differences(tree(full_runs["two_stage"].path), tree(out)) == []


# ---- the commands ----------------------------------------------------------------------------------------------

def test_run_quiet_prints_nothing_and_a_rerun_redoes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = scenario(tmp_path, "hybrid")
    assert main(["run", str(path), "--quiet", "--set", "training.epochs=1"]) == 0
    assert capsys.readouterr() == ("", "")
    out = tmp_path / "hybrid.h5"                              # the scenario's name, in the current folder
    before = out.read_bytes()
    assert main(["run", str(path), "--set", "training.epochs=1"]) == 0
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and out.read_bytes() == before


def test_run_shows_progress_and_a_summary(tmp_path, capsys):
    path = scenario(tmp_path, "hybrid")
    assert main(["run", str(path), "-o", str(tmp_path / "p.h5"), "--set", "training.epochs=2"]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "step" in captured.err             # the bar, on stderr
    assert "2 epochs, test accuracy" in captured.out


def test_show_prints_the_settings_and_the_final_metrics(full_runs, capsys):
    assert main(["show", str(full_runs["bp_drift"].path)]) == 0
    out = capsys.readouterr().out
    final = full_runs["bp_drift"].final
    assert "(complete)" in out and "GST" in out and "mlp (8)" in out and "bp, 3 epochs" in out
    assert f"{final['test_accuracy']:.3f}" in out and "energy_j" in out and "seed" in out


@pytest.mark.parametrize("content", [None, b"not hdf5 at all", b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "empty_hdf5"])
def test_show_refuses_a_file_that_is_not_a_run_file_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.h5"
    if content == "empty_hdf5":
        h5py.File(path, "w").close()
    elif content is not None:
        path.write_bytes(content)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


def test_run_never_overwrites_what_is_there(tmp_path, capsys, full_runs):
    path = scenario(tmp_path, "hybrid")
    other = tmp_path / "notes.h5"
    other.write_text("my notes")
    assert main(["run", str(path), "-o", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.h5" in err[0] and other.read_text() == "my notes"
    finished = full_runs["dgc"].path                          # a finished run of another scenario
    before = finished.read_bytes()
    assert main(["run", str(path), "-o", str(finished), "--quiet"]) == 2
    assert "another run" in capsys.readouterr().err and finished.read_bytes() == before
    broken = tmp_path / "broken.h5.partial"                   # an unfinished run that no longer reads
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    assert main(["run", str(path), "-o", str(tmp_path / "broken.h5"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.h5.partial" in err[0] and broken.read_bytes()[8:] == bytes(100)


@pytest.mark.parametrize(("argv", "field"), [
    (["run", "nosuch.toml"], "nosuch.toml"),
    (["run", "{scenario}", "--set", "training.nosuch=1"], "nosuch"),
    (["run", "{scenario}", "--set", "oops"], "--set"),
    (["show", "nosuch.h5"], "nosuch.h5"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, field):
    monkeypatch.chdir(tmp_path)
    path = scenario(tmp_path, "hybrid")
    assert main([a.format(scenario=path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert not list(tmp_path.glob("*.h5*"))


def test_the_scenario_text_in_a_run_file_reloads_as_the_same_scenario(tmp_path):
    from neurosim.runner import identity, scenario_from_text, scenario_text
    from neurosim.scenario import load_scenario

    path = scenario(tmp_path, "bp_drift", SCENARIOS["bp_drift"] + textwrap.dedent("""
        [device.overrides]
        c2c = 0.02
        [hardware]
        adcs_per_tile = 4
        """))
    original = load_scenario(path)
    again = scenario_from_text(scenario_text(original), "run.h5")
    # equal settings (TOML has no tuples, so compare the texts rather than the objects)
    assert scenario_text(again) == scenario_text(original) and identity(again) == identity(original)
    assert again.card() == original.card() and again.network.activation == original.network.activation
    changed = load_scenario(path, {"training.learning_rate": 0.31})
    assert identity(changed) != identity(original)


def test_lazy_exports_keep_the_store_free_of_torch():
    code = "import sys, neurosim.store; assert 'torch' not in sys.modules; import neurosim; neurosim.open_run"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=ENV)
    from neurosim.runner import load_chip, run
    from neurosim.store import open_run

    assert (neurosim.open_run, neurosim.run, neurosim.load_chip) == (open_run, run, load_chip)


def test_a_run_into_a_folder_that_does_not_exist_yet_creates_it(tmp_path):
    from neurosim.cli import main

    scenario = tmp_path / "s.toml"
    scenario.write_text('[data]\nlimit = 40\n[network]\nhidden = [4]\n[training]\nepochs = 1\n')
    out = tmp_path / "new" / "deeper" / "run.h5"
    assert main(["run", str(scenario), "-o", str(out), "--quiet"]) == 0
    assert out.exists()
