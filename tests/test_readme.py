"""README's Quick start is what users and CI run: exactly two commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "neurosim sweep scenarios/variation_tolerance.toml" in main_job and "pytest" in tests
    for command in commands:
        assert "-c constraints.txt" in command  # never an unpinned torch on a CPU machine
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_the_python_example_runs_as_written_and_learns(tmp_path, monkeypatch):
    """README's scenario and Python example, executed as they stand: DGC on the TaOx/HfOx card learns the digits
    (chance is 0.10; the run is seeded, so the figure the README quotes is the one it prints), the run file is
    there, and the chip reloads."""
    text = (ROOT / "README.md").read_text()
    (toml,) = [block for block in re.findall(r"```toml\n(.*?)```", text, flags=re.S) if "[training]" in block]
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "neurosim.run(" in block]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dgc.toml").write_text(toml)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    accuracy = namespace["run"].final["test_accuracy"]
    assert accuracy >= 0.75
    quoted = re.search(r"# (0\.\d+) after 3 epochs", code)
    assert quoted and abs(float(quoted.group(1)) - accuracy) < 0.005
    assert (tmp_path / "dgc.h5").exists() and namespace["chip"].epoch == 3
