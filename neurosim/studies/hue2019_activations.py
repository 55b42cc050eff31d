"""Study: activation functions in a CNN, DAWNBench-style (Hue University Journal of Science, 2019).

The 21,840-weight LeNet-like network with ReLU, Tanh, SELU, PReLU, ELU and Leaky ReLU, trained by on-chip BP
on an ideal device and on a real card, beside the same network in plain torch started from the same weights,
batches and dropout masks (``torch_twin``). Per activation and platform: final test error, first epoch that
reaches the target accuracy, the time to reach it, total training time and inference time per sample (wall
time of the simulation or of torch; for the chip also the chip's own clock), mean ± std over seeds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from neurosim.analysis import plot_lines, runs_frame
from neurosim.runner import build_chip, load_chip
from neurosim.studies import _torch_twin as torch_twin
from neurosim.studies._activation_common import begin, cell, mean_std, run_points, write_table
from neurosim.training.base import make_engine

NAME = "hue2019_activations"
TITLE = "Activation functions in a CNN (ReLU, Tanh, SELU, PReLU, ELU, Leaky ReLU), DAWNBench-style, on the chip"
PAPER = ("Activation functions in convolutional neural networks, Hue University Journal of Science: Techniques "
         "and Technology, 2019 (Table 3, MNIST: test error from 1.41 % with PReLU to 2.09 % with Tanh)")
SCENARIOS = ["hue2019_activations.toml"]
RUNTIME = {"default": "2 min", "full": "6 min"}   # measured on 2 cores, quiet (docs/studies/README.md)

FUNCTIONS = ("relu", "tanh", "selu", "prelu", "elu", "leaky_relu")
# The paper's Table 3 (MNIST), the two numbers quoted in issue #15; the others are not reproduced here.
PAPER_ERROR = {"prelu": 1.41, "tanh": 2.09}
TARGET = 0.90   # DAWNBench's "time to accuracy": the first epoch whose test accuracy reaches this
# Published count of the network (conv 1->10 k5, conv 10->20 k5, 320->50, 50->10, with biases).
PAPER_PARAMETERS = 21_840

# size -> (overrides of the scenario, replaced grid axes, seeds)
SIZES: dict[str, tuple[dict[str, Any], dict[str, list], int]] = {
    "ci": ({"data.limit": 64, "training.epochs": 1},
           {"device.card": ["ideal"], "network.activation.function": ["relu", "prelu"],
            "network.activation.alpha": [0.01, 0.25]}, 1),
    "default": ({}, {}, 5),
    "full": ({"data.limit": 0, "training.epochs": 15}, {}, 5),
}


def parameter_count(network) -> dict[str, int]:
    """Weights and biases per analog layer (the crossbar's rows times columns) and trainable neuron parameters
    (a PReLU slope per layer)."""
    counts = {layer.name: layer.crossbar.in_features * layer.crossbar.out_features for layer in network.analog_layers}
    counts["neuron parameters"] = sum(p.numel() for layer in network.analog_layers
                                      for p in layer.activation.trainable_parameters())
    return counts


def _inference_times(network, x: torch.Tensor, repeats: int = 3) -> float:
    """Wall seconds per sample of the test set's forward pass (best of ``repeats``, eval mode)."""
    network.eval()
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(0, len(x), 512):
                network(x[i:i + 512])
            best = min(best, time.perf_counter() - start)
    network.train()
    return best / max(1, len(x))


def _chip_inference_time(network, samples: int) -> float:
    """The chip's own time per sample for a pipelined forward pass of ``samples`` samples (engine clock)."""
    engine = make_engine(network)

    def process():
        yield engine.forward(samples)

    engine.start(process())
    return engine.totals["time_s"] / samples


def _epochs_rows(frame: pd.DataFrame, platform: str, function: str, seed: int, times: dict[str, float]
                 ) -> list[dict[str, Any]]:
    rows = []
    for r in frame.sort_values("epoch").to_dict("records"):
        rows.append({"platform": platform, "function": function, "seed": seed, "epoch": int(r["epoch"]),
                     "test_accuracy": float(r["test_accuracy"]), "train_loss": float(r["train_loss"]),
                     "wall_time_s": float(r["wall_time_s"]), "sim_time_s": float(r.get("sim_time_s", np.nan)),
                     **times})
    return rows


# Torch twins: plain, and with the chip's input saturation whose error passes straight through (the chip's BP).
TWINS = {"torch": "none", "torch, inputs clipped (BP straight through)": "straight_through"}


def _twin_runs(points, log: Callable[[str], None]) -> pd.DataFrame:
    """Every ideal-device point again in plain torch: same initial weights, data, batches, dropout masks; once
    plain and once with the chip's input clipping (a diagnostic of that one difference)."""
    rows = []
    for point, (platform, clip) in ((p, t) for p in points for t in TWINS.items()):
        s = point.scenario
        chip = build_chip(s)
        model = torch_twin.twin(chip.network, input_clip=clip)
        shuffle = torch.Generator()
        shuffle.set_state(chip.trainer.shuffle_generator.get_state())
        t = s.training
        history = torch_twin.train(model, chip.data, shuffle, t.epochs, batch_size=t.batch_size,
                                   learning_rate=t.learning_rate, momentum=t.momentum, cost=t.cost,
                                   eval_batch_size=t.eval_batch_size)
        times = {"inference_s_per_sample": _inference_times(model, chip.data.x_test),
                 "chip_inference_s_per_sample": np.nan}
        frame = pd.DataFrame(history)
        frame["sim_time_s"] = np.nan
        rows += _epochs_rows(frame, platform, s.network.activation.function, s.seed, times)
        log(f"{platform} {point.name}: final test accuracy {history[-1]['test_accuracy']:.3f}")
    return pd.DataFrame(rows)


def _chip_runs(folder: Path, points) -> pd.DataFrame:
    metrics = runs_frame(folder)
    rows = []
    for point in points:
        path = folder / "points" / f"{point.name}.h5"
        chip = load_chip(path)
        times = {"inference_s_per_sample": _inference_times(chip.network, chip.data.x_test),
                 "chip_inference_s_per_sample": _chip_inference_time(chip.network, len(chip.data.x_test))}
        frame = metrics[metrics["point"] == path.name]
        s = point.scenario
        rows += _epochs_rows(frame, f"chip {s.device.card}", s.network.activation.function, s.seed, times)
    return pd.DataFrame(rows)


def dawnbench(epochs: pd.DataFrame, target: float = TARGET) -> pd.DataFrame:
    """Per platform and function, over seeds: final error, first epoch reaching ``target``, time to it (wall;
    chip clock where measured), total training time, inference time per sample. A seed that never reaches
    the target counts in 'reached', not in the epoch and time means."""
    out = []
    order = {f: i for i, f in enumerate(FUNCTIONS)}
    for (platform, function), group in epochs.groupby(["platform", "function"], sort=False):
        per_seed = []
        for _, run in group.groupby("seed"):
            run = run.sort_values("epoch")
            wall = run["wall_time_s"].cumsum().to_numpy()
            hit = np.flatnonzero(run["test_accuracy"].to_numpy() >= target)
            first = int(run["epoch"].iloc[hit[0]]) if len(hit) else np.nan
            per_seed.append({
                "error": 100 * (1 - run["test_accuracy"].iloc[-1]), "first": first,
                "wall_to": wall[hit[0]] if len(hit) else np.nan,
                "chip_to": run["sim_time_s"].iloc[hit[0]] if len(hit) else np.nan,
                "wall": wall[-1], "chip": run["sim_time_s"].iloc[-1],
                "inf": run["inference_s_per_sample"].iloc[0], "chip_inf": run["chip_inference_s_per_sample"].iloc[0]})
        s = pd.DataFrame(per_seed)

        def ms(col: str, scale: float = 1.0, fmt: str = ".3g", s=s) -> str:
            return cell(*mean_std(s[col] * scale)[:2], fmt)

        out.append({
            "activation": function, "platform": platform, "seeds": len(s),
            "final error (%)": ms("error", fmt=".2f"),
            "paper error (%), MNIST": PAPER_ERROR.get(function, "-"),
            f"reached {target:.0%}": f"{int(s['first'].notna().sum())}/{len(s)}",
            "first epoch at target": ms("first", fmt=".2g"),
            "wall time to target (s)": ms("wall_to"),
            "chip time to target (ms)": ms("chip_to", 1e3),
            "training wall time (s)": ms("wall"),
            "training chip time (ms)": ms("chip", 1e3),
            "inference wall (µs/sample)": ms("inf", 1e6),
            "inference chip (µs/sample)": ms("chip_inf", 1e6),
            "_order": (order.get(function, 99), not platform.startswith("torch"), platform)})
    table = pd.DataFrame(out).sort_values("_order", kind="stable").drop(columns="_order")
    return table.reset_index(drop=True)


def _failed_rows(the_plan, failed: dict[str, str]) -> pd.DataFrame:
    """One row per platform and function whose chip runs failed, with how many and why (first reason)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for p in the_plan.points:
        if p.name in failed:
            s = p.scenario
            groups.setdefault((s.network.activation.function, f"chip {s.device.card}"), []).append(failed[p.name])
    rows = [{"activation": fn, "platform": platform, "seeds": 0,
             "final error (%)": f"failed ({len(reasons)} of {the_plan.base.sweep.seeds} seeds): {reasons[0]}"}
            for (fn, platform), reasons in groups.items()]
    return pd.DataFrame(rows)


def curves(epochs: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per epoch, mean and std over seeds, per platform and function."""
    rows = []
    for (platform, function, epoch), g in epochs.groupby(["platform", "function", "epoch"], sort=False):
        m, s, n = mean_std(g["test_accuracy"])
        rows.append({"platform": platform, "function": function, "epoch": epoch, "test_accuracy_mean": m,
                     "test_accuracy_std": s, "seeds": n})
    return pd.DataFrame(rows)


def run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False,
        log: Callable[[str], None] | None = print) -> list[Path]:
    """Run the study at ``size`` ('ci', 'default', 'full') into ``out``; returns the tables and figures."""
    out, log = begin(out, size, log)
    sets, grid, seeds = SIZES[size]
    the_plan, folder, result = run_points(out, "chip", SCENARIOS[0], size, sets, grid, seeds, workers, progress, log)
    done = [p for p in the_plan.points if (folder / "points" / f"{p.name}.h5").exists()]
    chip = _chip_runs(folder, done)
    # every ideal-card point has its twins, also where the chip's run failed (the twin does not need it)
    twin = _twin_runs([p for p in the_plan.points if p.scenario.device.card == "ideal"], log)
    epochs = pd.concat([chip, twin], ignore_index=True)
    epochs.to_csv(out / "epochs.csv", index=False)

    paths = []
    table = dawnbench(epochs)
    failed = _failed_rows(the_plan, result.failed)
    if len(failed):
        table = pd.concat([table, failed], ignore_index=True)
        order = {f: i for i, f in enumerate(FUNCTIONS)}
        key = table.apply(lambda r: (order.get(r["activation"], 99), not str(r["platform"]).startswith("torch"),
                                     str(r["platform"])), axis=1)
        table = table.iloc[sorted(range(len(table)), key=lambda i: key.iloc[i])].reset_index(drop=True)
    counts = parameter_count(build_chip(the_plan.points[0].scenario).network)
    weights = sum(v for k, v in counts.items() if k != "neuron parameters")
    notes = [f"Mean ± sample std over seeds (ddof 1). Target accuracy {TARGET:.0%} on the test digits. Wall times "
             "are this machine's (a shared CPU: compare within a column, not across machines); chip times are the "
             "simulated chip's clock (engine). Parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
             + f"; weights and biases {weights:,} (paper: {PAPER_PARAMETERS:,}); PReLU adds one trainable slope "
             f"per hidden layer ({len(counts) - 2}). 'torch, inputs clipped': the torch twin with the chip's "
             "input saturation at ±1 before every layer, the error passed straight through as the chip's BP "
             "does."]
    paths += write_table(table, out, "dawnbench", TITLE, notes)
    curve = curves(epochs)
    curve.to_csv(out / "curves.csv", index=False)
    paths.append(out / "curves.csv")
    fig = out / "learning_curves.png"
    plot_lines(curve, "epoch", "test_accuracy_mean", group="platform", std="test_accuracy_std", panel="function",
               ylabel="test accuracy", title="LeNet-like CNN on digits 28x28: test accuracy per epoch, mean ± std "
               "over seeds", hlines={f"target {TARGET:.0%}": TARGET}, columns=3, out=fig)
    paths.append(fig)
    log(f"{NAME}: wrote " + ", ".join(str(p) for p in paths))
    return paths
