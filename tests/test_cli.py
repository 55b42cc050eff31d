"""The neurosim command: every subcommand runs, and bad input is one line with exit status 2."""

from __future__ import annotations

import pytest

from neurosim.cli import main


def test_crossbar_command_reports_errors(capsys):
    assert main(["crossbar", "--device-card", "taox_hfox", "--rows", "32", "--cols", "16"]) == 0
    out = capsys.readouterr().out
    assert "write-and-verify" in out and "relative error" in out


@pytest.mark.parametrize("argv,field", [
    (["crossbar", "--device-card", "nosuch"], "nosuch"),
    (["crossbar", "--rows", "0"], "rows"),
    (["demo", "--levels", "-0.1"], "--levels"),
    (["demo", "--schemes", "sgd"], "--schemes"),
    (["demo", "--device", "cuda:9"] , "device"),
])
def test_bad_arguments_are_one_line(capsys, argv, field, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_demo_runs_a_tiny_grid(capsys):
    assert main(["demo", "--quick", "--levels", "0.2", "--schemes", "bp,dgc", "--epochs", "1", "--hidden", "4"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and out.count("0.20  ") == 2
