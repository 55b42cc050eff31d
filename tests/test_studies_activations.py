"""The activation studies (chen2020_taylor, pwl2023, hue2019_activations): their scenarios validate, each runs at
size 'ci' and writes tables whose content is checked, and the pieces they rest on (the plain-torch twin, the
shipped binary digits, the pre-activation record) do what they claim."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from neurosim.scenario import load_scenario
from neurosim.studies import _torch_twin as torch_twin
from neurosim.studies import chen2020_taylor, hue2019_activations, pwl2023
from neurosim.studies._activation_common import scenario_path
from neurosim.sweep import plan

STUDIES = (chen2020_taylor, pwl2023, hue2019_activations)


@pytest.mark.parametrize("study", STUDIES, ids=lambda m: m.NAME)
def test_interface_and_scenarios_validate(study):
    assert study.NAME and study.TITLE and study.PAPER
    assert study is hue2019_activations or "doi 10." in study.PAPER
    for name in study.SCENARIOS:
        path = scenario_path(name)
        if path.suffix == ".toml":
            load_scenario(path)                        # validates, card and data included
            assert len(plan(path).points) >= 5 * 2     # the default sweep: >= 5 seeds of >= 2 settings
            assert plan(path).base.sweep.seeds >= 5


def test_lenet_has_the_published_parameter_count():
    s = load_scenario(scenario_path("hue2019_activations.toml"))
    from neurosim.runner import build_chip

    counts = hue2019_activations.parameter_count(build_chip(s).network)
    assert counts == {"conv1": 260, "conv2": 5020, "fc1": 16050, "fc2": 510, "neuron parameters": 0}
    assert sum(v for k, v in counts.items() if k != "neuron parameters") == hue2019_activations.PAPER_PARAMETERS


def test_shipped_binary_digits_are_what_the_function_writes():
    with np.load(scenario_path("digits_3_8.npz")) as f:
        shipped = {k: f[k] for k in f.files}
    made = pwl2023.binary_digits()
    assert set(shipped) == {"x", "y"}
    for k in made:
        np.testing.assert_array_equal(shipped[k], made[k])
    assert sorted(np.unique(shipped["y"]).tolist()) == [0, 1] and shipped["x"].max() <= 1.0


def _twin_setup(function: str, dropout: float = 0.0):
    from neurosim.runner import build_chip

    s = load_scenario(scenario_path("hue2019_activations.toml"),
                      {"network.activation.function": function, "network.dropout": dropout, "data.limit": 64,
                       "network.activation.alpha": 0.25})
    return build_chip(s)


@pytest.mark.parametrize("function", ["tanh", "prelu", "elu", "selu"])
def test_twin_matches_the_ideal_chip_forward_and_gradient(function):
    """Ideal card, no noise, inputs inside the DAC range: the chip's output and its BP gradients equal the
    torch twin's to float32 rounding (the bias row is driven at input_max)."""
    from neurosim.training.bp import bp_gradients

    chip = _twin_setup(function)
    net, x, y = chip.network, chip.data.x_train[:16], chip.data.y_train[:16]
    model = torch_twin.twin(net)
    with torch.no_grad():
        a, b = net(x), model(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    loss = bp_gradients(net, x, y, "cross_entropy", net.analog_layers)
    ref = torch.nn.functional.cross_entropy(model(x), y)
    assert abs(loss - float(ref.detach())) < 1e-5
    mods = [m for m in model if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    grads = torch.autograd.grad(ref, [p for m in mods for p in (m.weight, m.bias)])
    for layer, gw, gb in zip(net.analog_layers, grads[0::2], grads[1::2], strict=True):
        g = layer.weight.grad
        w = gw.reshape(gw.shape[0], -1).T
        assert torch.allclose(g[:-1], w, atol=1e-6, rtol=1e-4)
        assert torch.allclose(g[-1], gb * layer.crossbar.config.input_max, atol=1e-6, rtol=1e-4)


def test_input_clip_forward_and_its_two_backwards():
    x = torch.tensor([-2.0, -0.5, 0.5, 3.0], requires_grad=True)
    for backward, expected in (("straight_through", [1.0, 1.0, 1.0, 1.0]), ("true", [0.0, 1.0, 1.0, 0.0])):
        clip = torch_twin.InputClip(-1.0, 1.0, backward)
        y = clip(x)
        assert y.tolist() == [-1.0, -0.5, 0.5, 1.0]
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.tolist() == expected
    with pytest.raises(ValueError, match="input_clip"):
        torch_twin.twin(_twin_setup("tanh").network, input_clip="sometimes")


def test_twin_dropout_masks_follow_the_chip():
    chip = _twin_setup("tanh", dropout=0.5)
    net = chip.network
    model = torch_twin.twin(net)
    ours = [m for m in model if isinstance(m, torch_twin.StepDropout)]
    theirs = [m for m in net.stages if isinstance(m, torch_twin.StepDropout)]
    assert len(ours) == len(theirs) == 2
    x = torch.ones(4, 20, 3, 3)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a(x if a.channels else x.reshape(4, -1)), b(x if b.channels else x.reshape(4, -1)))


def test_twin_training_is_repeatable():
    rows = []
    for _ in range(2):
        chip = _twin_setup("relu")
        model = torch_twin.twin(chip.network)
        shuffle = torch.Generator()
        shuffle.set_state(chip.trainer.shuffle_generator.get_state())
        rows.append(torch_twin.train(model, chip.data, shuffle, 1, batch_size=32, learning_rate=0.1,
                                     momentum=0.5))
    assert rows[0][0]["train_loss"] == rows[1][0]["train_loss"]
    assert rows[0][0]["test_accuracy"] == rows[1][0]["test_accuracy"]


def test_preactivations_record_what_each_layer_receives():
    chip = _twin_setup("tanh")
    net = chip.network
    x = chip.data.x_test[:8]
    dist = chen2020_taylor.preactivations(net, x)
    assert list(dist) == ["conv1", "conv2", "fc1"]
    # conv1 sees 8 images x 10 channels x 24 x 24 positions; its values are the crossbar's read
    assert dist["conv1"]["n"] == 8 * 10 * 24 * 24
    z = net.analog_layers[0].preactivation(x)
    np.testing.assert_allclose(np.sort(dist["conv1"]["u"]), np.sort(z.double().reshape(-1).numpy()), atol=1e-6)
    d = dist["fc1"]
    assert d["counts"].sum() + d["below"] + d["above"] == d["n"] == 8 * 50


def test_segment_table_keeps_the_bound_and_least_squares_needs_no_more_segments():
    seg = pwl2023.segment_table(["sigmoid", "tanh"], [1e-2, 1e-3], eval_points=20_003)
    assert (seg["max_error"] <= seg["epsilon"]).all() and (seg["derivative_max_error"] <= seg["epsilon"]).all()
    for (_, _), g in seg.groupby(["function", "epsilon"]):
        chord, ls = g[g.segmenter == "chord"].iloc[0], g[g.segmenter == "least_squares"].iloc[0]
        assert ls["segments"] <= chord["segments"] and ls["mean_error"] < chord["mean_error"]


def test_dawnbench_table_from_epochs():
    """The table's statistics against numbers worked out by hand (two seeds, one of which misses the target)."""
    rows = []
    for seed, accs in ((0, [0.5, 0.92, 0.95]), (1, [0.4, 0.8, 0.85])):
        for e, a in enumerate(accs, 1):
            rows.append({"platform": "torch", "function": "tanh", "seed": seed, "epoch": e, "test_accuracy": a,
                         "train_loss": 1.0, "wall_time_s": 2.0, "sim_time_s": math.nan,
                         "inference_s_per_sample": 1e-6 * (seed + 1), "chip_inference_s_per_sample": math.nan})
    t = hue2019_activations.dawnbench(pd.DataFrame(rows), target=0.9).iloc[0]
    assert t["seeds"] == 2 and t["reached 90%"] == "1/2"
    assert t["first epoch at target"] == "2"             # one seed: no spread
    assert t["wall time to target (s)"] == "4"
    assert t["training wall time (s)"] == "6 ± 0"
    assert t["final error (%)"] == f"{10.0:.2f} ± {math.sqrt(50):.2f}"    # errors 5 and 15
    assert t["inference wall (µs/sample)"] == f"1.5 ± {math.sqrt(0.5):.3g}"


# ---- each study at size 'ci' ------------------------------------------------------------------------------------

def _md(path):
    return path.read_text()


def test_chen2020_ci(tmp_path):
    paths = chen2020_taylor.run(tmp_path, size="ci", log=None)
    names = {p.name for p in paths}
    assert {"accuracy.md", "accuracy.csv", "series_error.md", "accuracy_vs_terms.png", "preactivations.png"} <= names
    acc = pd.read_csv(tmp_path / "accuracy.csv")
    assert acc["terms"].tolist() == [4] and (acc["seeds"] == 1).all()
    points = pd.read_csv(tmp_path / "points.csv")
    assert ((points[["exact", "fixed", "trained"]] >= 0) & (points[["exact", "fixed", "trained"]] <= 1)).all().all()
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert set(layers["layer"]) == {"conv1", "conv2", "fc1"}
    # the uniform series errors are those of the activation module: tanh, 4 terms, [-4, 4]: max 18.3
    assert "18.3" in _md(tmp_path / "series_error.md")
    assert "+2.24 % to +53.96 %" in _md(tmp_path / "accuracy.md")


def test_pwl2023_ci(tmp_path):
    paths = pwl2023.run(tmp_path, size="ci", log=None)
    names = {p.name for p in paths}
    assert {"segments.md", "segmenters.md", "mlp.md", "backward_times.md", "segments_vs_epsilon.png"} <= names
    mlp = pd.read_csv(tmp_path / "mlp.csv")
    assert mlp["realization"].tolist() == ["exact", "pwl ε=0.1, f′ fit", "pwl ε=0.01, f′ fit", "pwl ε=0.01, slope",
                                           "pwl ε=0.001, f′ fit"]
    times = pd.read_csv(tmp_path / "backward_times.csv")
    assert (times[times.realization == "exact"]["derivative_vs_exact"] == 1.0).all()
    runs = pd.read_csv(tmp_path / "mlp_runs.csv")
    assert runs["final_accuracy"].between(0, 1).all() and len(runs) == 5


def test_hue2019_ci(tmp_path):
    paths = hue2019_activations.run(tmp_path, size="ci", log=None)
    names = {p.name for p in paths}
    assert {"dawnbench.md", "dawnbench.csv", "learning_curves.png"} <= names
    table = pd.read_csv(tmp_path / "dawnbench.csv")
    clipped = "torch, inputs clipped (BP straight through)"
    assert table[["activation", "platform"]].values.tolist() == [
        ["relu", "torch"], ["relu", clipped], ["relu", "chip ideal"],
        ["prelu", "torch"], ["prelu", clipped], ["prelu", "chip ideal"]]
    assert "21,840" in _md(tmp_path / "dawnbench.md")
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert len(epochs) == 6 and epochs["test_accuracy"].between(0, 1).all()


# ---- the general figures the studies added to neurosim.analysis ---------------------------------------------------

def test_plot_lines_panels_lines_and_colours(tmp_path):
    from neurosim.analysis import InputError, plot_lines

    frame = pd.DataFrame({"x": [1, 2, 1, 2, 1, 2], "y": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "s": [0.01] * 6,
                          "g": ["a", "a", "b", "b", "a", "a"], "p": ["one", "one", "one", "one", "two", "two"]})
    fig = plot_lines(frame, "x", "y", group="g", std="s", panel="p", columns=1, hlines={"target": 0.5},
                     out=tmp_path / "f.png")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 and (tmp_path / "f.png").stat().st_size > 0
    first, second = visible
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["a", "b"]
    # group "a" has the same colour in both panels
    assert first.lines[0].get_color() == second.lines[0].get_color()
    np.testing.assert_array_equal(second.lines[0].get_ydata(), [0.5, 0.6])
    with pytest.raises(InputError, match="'nope'"):
        plot_lines(frame, "x", "nope")


def test_plot_histogram_curves(tmp_path):
    from neurosim.analysis import InputError, plot_histogram_curves

    edges = np.linspace(-1, 1, 5)
    fig = plot_histogram_curves([{"edges": edges, "counts": [1, 2, 3, 4], "title": "t",
                                  "curves": {"c": (np.array([-1.0, 1.0]), np.array([1.0, 2.0]))}}],
                                out=tmp_path / "h.png")
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_allclose(heights, np.array([1, 2, 3, 4]) / 10 / 0.5)   # a density: integrates to 1
    with pytest.raises(InputError):
        plot_histogram_curves([])
