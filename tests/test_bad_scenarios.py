"""A corpus of bad scenarios: each makes `neurosim validate` exit 2 with exactly one line on stderr that names the
file, the field and the value, without a traceback, and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from neurosim.cli import main

ROOT = Path(__file__).resolve().parents[1]
VT = (ROOT / "scenarios" / "variation_tolerance.toml").read_text(encoding="utf-8")

INLINE = ('[device.inline]\nname = "mine"\ng_min = 1e-6\ng_max = 1e-5\nstates = 64\n'
          '[device.inline.source]\ng_min = "p. 1"\ng_max = "p. 2"\nstates = "p. 3"\n')
BAD_CARD = 'name = "bad"\ng_min = 1e-6\ng_max = -1e-5\nstates = 64\n[source]\ng_min = "x"\ng_max = "x"\nstates = "x"\n'

# id -> (scenario text, extra files {name: text or None for a folder}, --set items, words the line must hold).
# The words name the field and the value as the message quotes them; the file is checked for every case.
CASES = {
    # wrong types
    "seed-string": ('seed = "zero"\n', {}, [], ["'seed'", "'zero'"]),
    "seed-negative": ("seed = -1\n", {}, [], ["'seed'", "-1", ">= 0"]),
    "seed-float": ("seed = 1.5\n", {}, [], ["'seed'", "1.5", "integer"]),
    "epochs-string": ('[training]\nepochs = "5"\n', {}, [], ["'training.epochs'", "'5'"]),
    "hidden-not-list": ("[network]\nhidden = 16\n", {}, [], ["'network.hidden'", "16", "list"]),
    "hidden-string-entry": ('[network]\nhidden = [16, "x"]\n', {}, [], ["'network.hidden'", "[16, 'x']", "integers"]),
    "bias-string": ('[network]\nbias = "yes"\n', {}, [], ["'network.bias'", "'yes'"]),
    "table-as-number": ("network = 3\n", {}, [], ["'network'", "= 3", "table"]),
    "overrides-as-number": ("[device]\noverrides = 3\n", {}, [], ["'device.overrides'", "= 3"]),
    "scheme-unknown": ('[training]\nscheme = "sgd"\n', {}, [], ["'training.scheme'", "'sgd'"]),
    "data-unknown": ('[data]\nname = "imagenet"\n', {}, [], ["'data.name'", "'imagenet'"]),
    "runtime-device": ('[runtime]\ndevice = "gpu"\n', {}, [], ["'runtime.device'", "'gpu'"]),
    "derived-not-derivable": ('derived = ["seed"]\n', {}, [], ["'derived'", "'seed'"]),
    # unknown keys at every level
    "unknown-top": ("colour = 1\n", {}, [], ["'colour'", "unknown"]),
    "unknown-runtime": ("[runtime]\nfoo = 1\n", {}, [], ["'runtime.foo'", "unknown"]),
    "unknown-data": ("[data]\nfoo = 1\n", {}, [], ["'data.foo'", "unknown"]),
    "unknown-device": ("[device]\nfoo = 1\n", {}, [], ["'device.foo'", "unknown"]),
    "unknown-override": ("[device.overrides]\nfoo = 1\n", {}, [], ["'device.overrides.foo'", "= 1"]),
    "unknown-inline": (INLINE.replace("states = 64\n", "states = 64\ncolour = 1\n"), {}, [],
                       ["'device.inline.colour'", "= 1", "unknown"]),
    "inline-source-number": (INLINE + "c2c = 1\n", {}, [], ["'device.inline.source.c2c'", "= 1", "citation"]),
    "unknown-network": ("[network]\nfoo = 1\n", {}, [], ["'network.foo'", "unknown"]),
    "unknown-activation": ("[network.activation]\nfoo = 1\n", {}, [], ["'network.activation.foo'", "unknown"]),
    "unknown-crossbar": ("[network.crossbar]\nfoo = 1\n", {}, [], ["'network.crossbar.foo'", "unknown"]),
    "unknown-training": ("[training]\nfoo = 1\n", {}, [], ["'training.foo'", "unknown"]),
    "unknown-dgc": ("[training.dgc]\nfoo = 1\n", {}, [], ["'training.dgc.foo'", "unknown"]),
    "unknown-two-stage": ("[training.two_stage]\nfoo = 1\n", {}, [], ["'training.two_stage.foo'", "unknown"]),
    "unknown-hardware": ("[hardware]\nfoo = 1\n", {}, [], ["'hardware.foo'", "unknown"]),
    "unknown-traces": ("[traces]\nfoo = 1\n", {}, [], ["'traces.foo'", "unknown"]),
    "unknown-output": ("[output]\nfoo = 1\n", {}, [], ["'output.foo'", "unknown"]),
    "unknown-link-key": ('[links.v]\nvalue = 1.0\nfields = ["seed"]\nfoo = 1\n', {}, [], ["'links.v.foo'"]),
    "unknown-set-key": ("", {}, ["training.nope=1"], ["'training.nope'", "= 1"]),
    "unknown-set-link": (VT, {}, ["variaton=0.3"], ["'variaton'", "0.3", "links: variation"]),
    # negative spreads
    "negative-override": ("[device.overrides]\nstep_dtod = -0.1\n", {}, [], ["'device.overrides.step_dtod'",
                                                                            "-0.1", ">= 0"]),
    "negative-circuit": ("[network.activation]\ngain_dtod = -0.2\n", {}, [],
                         ["'network.activation.gain_dtod'", "-0.2"]),
    "negative-link": (VT, {}, ["variation=-0.1"], ["'links.variation.value'", "-0.1", "must be >= 0"]),
    "negative-set": ("", {}, ["device.overrides.c2c=-1"], ["'device.overrides.c2c'", "-1"]),
    # NaN and inf
    "nan-rate": ("[training]\nlearning_rate = nan\n", {}, [], ["'training.learning_rate'", "nan"]),
    "inf-override": ("[device.overrides]\nc2c = inf\n", {}, [], ["'device.overrides.c2c'", "inf"]),
    "inf-range": ("[network.activation]\ninput_range = [-inf, 4.0]\n", {}, [],
                  ["'network.activation.input_range'", "[-inf, 4.0]"]),
    "inf-hardware": ("[hardware]\nread_s = inf\n", {}, [], ["'hardware.read_s'", "inf"]),
    "nan-link": ('[links.v]\nvalue = nan\nfields = ["training.momentum"]\nscale = [1]\n', {}, [],
                 ["'links.v.value'", "nan"]),
    "nan-set": ("", {}, ["training.momentum=nan"], ["'training.momentum'", "nan"]),
    "huge-int": ("[training]\nlearning_rate = 1" + "0" * 400 + "\n", {}, [], ["'training.learning_rate'", "inf"]),
    # the card
    "card-missing-name": ('[device]\ncard = "nosuch"\n', {}, [], ["'device.card'", "'nosuch'", "shipped"]),
    "card-missing-file": ('[device]\ncard = "cards/none.toml"\n', {}, [], ["'device.card'",
                                                                          "'cards/none.toml'", "no such"]),
    "card-bad-content": ('[device]\ncard = "card.toml"\n', {"card.toml": BAD_CARD}, [],
                         ["'device.card'", "'card.toml'", "card.toml: field 'g_max' = -1e-05"]),
    "card-is-folder": ('[device]\ncard = "cards/"\n', {"cards": None}, [], ["'device.card'", "'cards/'"]),
    "card-window-closed": ("[device.overrides]\ng_min = 1e-5\n", {}, [], ["'device.overrides'", "g_max"]),
    "inline-uncited": (INLINE.replace('g_max = "p. 2"\n', ""), {}, [], ["'device.inline.g_max'", "1e-05",
                                                                         "source"]),
    "inline-then-card": (INLINE, {}, ["device.card=ag_asi"], ["'device.card'", "'ag_asi'", "inline"]),
    # data files
    "npz-missing": ('[data]\nname = "npz"\npath = "none.npz"\n', {}, [], ["'data.path'", "none.npz", "no such"]),
    "mnist-missing": ('[data]\nname = "mnist"\npath = "no_such_folder"\n', {}, [],
                      ["'data.path'", "no_such_folder", "no such folder"]),
    "npz-is-folder": ('[data]\nname = "npz"\npath = "d"\n', {"d": None}, [], ["'data.path'", "is a folder"]),
    "mnist-needs-path": ('[data]\nname = "mnist"\n', {}, [], ["'data.path'", "''", "needs"]),
    "digits-with-path": ('[data]\npath = "x"\n', {}, [], ["'data.path'", "'x'", "reads no file"]),
    # architectures and data sizes
    "lenet-on-8x8": ('[network]\narchitecture = "lenet"\n', {}, [], ["'data.size'", "= 8", "28×28"]),
    "vgg11-on-28": ('[network]\narchitecture = "vgg11"\n[data]\nsize = 28\n', {}, [],
                    ["'data.size'", "= 28", "32×32"]),
    "hybrid-wrong-length": ('[training]\nscheme = "hybrid"\n[training.hybrid]\nlayer_schemes = ["dgc"]\n', {}, [],
                            ["'training.hybrid.layer_schemes'", "['dgc']", "fc1, fc2"]),
    "dgc-wires-pulse": ('[training]\nscheme = "dgc"\n[training.dgc]\nperturbation = "pulse"\n'
                        '[network.crossbar]\nwire_resistance = "nodal"\n', {}, [],
                        ["'training.dgc.perturbation'", "'pulse'"]),
    "two-stage-no-hidden": ('[training]\nscheme = "two_stage"\n[network]\nhidden = []\n', {}, [],
                            ["'training.scheme'", "'two_stage'"]),
    "weight-epoch-beyond": ("[traces]\nweight_epochs = [9]\n", {}, [], ["'traces.weight_epochs'", "[9]"]),
    # links
    "link-disagrees": (VT.replace('card = "ecram_liwo3"', 'card = "ecram_liwo3"\noverrides = {step_dtod = 0.2}'),
                       {}, [], ["'device.overrides.step_dtod'", "0.2", "link 'variation'"]),
    "set-linked-field": (VT, {}, ["network.activation.gain_dtod=0.2"], ["'network.activation.gain_dtod'", "0.2",
                                                                        "link 'variation'"]),
    "link-unknown-field": ('[links.v]\nvalue = 1.0\nfields = ["training.nope"]\n', {}, [],
                           ["'links.v.fields'", "'training.nope'"]),
    "links-overlap": ('[links.a]\nvalue = 1.0\nfields = ["training.momentum"]\n'
                      '[links.b]\nvalue = 0.5\nfields = ["training.momentum"]\n', {}, [],
                      ["'links.b.fields'", "'training.momentum'"]),
    # malformed input
    "set-without-equals": ("", {}, ["variation"], ["'--set'", "'variation'", "KEY=VALUE"]),
    "set-twice": ("", {}, ["seed=1", "seed=2"], ["'seed'", "= 2", "twice"]),
    "set-deeply-nested": ("", {}, ["seed=" + "[" * 5000], ["'seed'", "'[[[", "integer"]),
}

# Cases about the file itself: no field to name, the line names the file and what is wrong with it.
FILE_CASES = {
    "truncated": (b"[network\nhidden = [16,", ["not valid TOML", "line 1"]),
    "truncated-array": (b"[network]\nhidden = [16,", ["not valid TOML"]),
    "not-utf8": (b"name = \"\xff\xfe\"\n", ["cannot read", "utf-8"]),
    "directory": (None, ["cannot read", "Is a directory"]),
    "missing": (False, ["no such file"]),
    "deeply-nested": (("x = " + "[" * 5000 + "]" * 5000).encode(), ["nested too deeply"]),
}


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


def _one_line(capsys, argv: list[str], folder: Path) -> str:
    before = _listing(folder)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert _listing(folder) == before, "a refused scenario wrote something"
    return lines[0]


def test_the_corpus_is_large_enough():
    assert len(CASES) + len(FILE_CASES) >= 40


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_scenario_is_one_line_naming_file_field_and_value(case, tmp_path, capsys):
    text, files, sets, words = CASES[case]
    for name, content in files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(content, encoding="utf-8")
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    argv = ["validate", str(path)]
    for item in sets:
        argv += ["--set", item]
    line = _one_line(capsys, argv, tmp_path)
    assert line.startswith(f"neurosim validate: error: {path}: field '"), line
    for word in words:
        assert word in line, (word, line)


def test_a_file_name_too_long_is_one_line(tmp_path, capsys):
    path = tmp_path / ("y" * 300 + ".toml")
    line = _one_line(capsys, ["validate", str(path)], tmp_path)
    assert line.startswith(f"neurosim validate: error: {path}: file: cannot read"), line


def test_lenet_on_an_npz_file_reads_the_image_side_from_its_header(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    for side in (8, 28):
        np.savez(tmp_path / f"d{side}.npz", x=np.zeros((4, side, side), np.uint8), y=np.arange(4))
    text = '[network]\narchitecture = "lenet"\n[data]\nname = "npz"\npath = "d{}.npz"\n'
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(text.format(28), encoding="utf-8")
    bad.write_text(text.format(8), encoding="utf-8")
    assert main(["validate", str(good)]) == 0
    capsys.readouterr()
    line = _one_line(capsys, ["validate", str(bad)], tmp_path)
    assert "'data.size' = 8: lenet expects 28×28 inputs, npz gives 8×8" in line, line


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_broken_file_is_one_line_naming_it(case, tmp_path, capsys):
    content, words = FILE_CASES[case]
    path = tmp_path / "bad.toml"
    if content is None:
        path.mkdir()
    elif content is not False:
        path.write_bytes(content)
    line = _one_line(capsys, ["validate", str(path)], tmp_path)
    assert line.startswith(f"neurosim validate: error: {path}: file: "), line
    for word in words:
        assert word in line, (word, line)
