"""Cost of on-chip training: batched against sequential DGC, linearized against exact DGC, hardware BP against
plain torch, and the hardware clock's overhead.

One figure a line as ``name = value`` (lines starting with ``#`` are comments). Times are medians over
repeats after a warm-up run; contenders whose ratio is reported are interleaved within each repeat, so a
disturbance from another process hits both alike.

  dgc_batched_vs_loop       one DGC step of a 784-100-10 MLP at batch 32, every weight of every layer:
                            the sequential per-weight loop (dgc_sequential: program one cell, measure the cost,
                            restore) timed on a random subset of weights, scaled per layer to all of them,
                            divided by the batched exact mode (dgc_exact). Noise-free chip (no read noise,
                            no cycle-to-cycle noise, neuron circuits without noise; mismatch and d2d spreads on),
                            so both give the same gradient: dgc_loop_max_abs_diff checks it on the subset.
  dgc_linearized_s          the same step in linearized mode (its ratio to exact is printed as a comment: retired
                            as a goal, the mode's worth is its validity envelope).
  dgc_exact_noisy_<mode>_s  one exact DGC step of the same network on the ag_asi card as it is (read and
                            cycle-to-cycle noise) with 1 % neuron noise, perturbation 'temporary' or 'pulse':
                            fresh reads of the layers below for every measurement.
  bp_vs_digital             one hardware-BP epoch (Trainer.run_epochs(1): training and the test evaluation)
                            of a 784-256-128-10 sigmoid MLP at batch 64 on 10,000 samples of MNIST shape,
                            every device and circuit non-ideality on except the exact wire solve, clock on,
                            divided by the same network in plain torch (Linear + Sigmoid, SGD, batch 64, same
                            tensors, same test evaluation). bp_vs_digital_train_only leaves the evaluations out.
  bp_floor_vs_digital       what the arithmetic of the physics costs on its own: the hardware-BP step's matrix
                            products (operand shapes and dtypes recorded from one real step) and the same count
                            of random numbers (one call each for torch's Gaussian and uniform ones, one fill of
                            the read noise's Philox Gaussians), nothing else, over
                            the plain-torch step (both per training step; bp_floor_step_ms is its time). The
                            periphery (DAC and ADC, mismatch, derivative circuits, pulse programming, the
                            controller's bookkeeping) has to fit in bp_vs_digital_train_only − this.
  engine_overhead           (t_clock_on − t_clock_off) / t_clock_off for that hardware-BP epoch, the median of
                            the per-round ratios (the two settings alternate which runs first).
  engine_overhead_direct    the engine's own time per epoch (the same engine calls in a simpy process without
                            tensor work, engine_epoch_ms) over the clock-off epoch: the same quantity, measured
                            without the noise of subtracting two epoch timings.
  bp_<mode>_vs_exact        (mode taylor, pwl) the hardware-BP epoch of that network with its neuron circuits
                            realized as a Taylor polynomial (4 terms) or PWL segments (eps 0.01, derivative
                            'fit'), over the same epoch with exact neurons, interleaved.
  peak_rss_mb               the process's peak resident memory at the end (resource.getrusage).

With --sizes the BP figures are taken per network and batch instead, as the issue on speed at scale asks:
4,000 training and 1,000 test samples of MNIST shape, the same non-ideal chip, clock on, and for each size
bp_vs_digital_<widths>_b<batch> (epochs with the test evaluation), bp_vs_digital_train_only_<...>,
bp_floor_vs_digital_<...> and the epoch times. SIZES is 'all' (784-256-128-10 and 784-1024-512-10 at batch 64,
256 and 1024) or a comma-separated list such as 784-256-128-10_b64,784-1024-512-10_b1024.

    python benchmarks/bench_training.py [--quick] [--only dgc|bp] [--sizes SIZES] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.backend import tune_allocator
from neurosim.config import build, with_overrides
from neurosim.crossbar import CrossbarConfig
from neurosim.data import DataConfig, load
from neurosim.device import load_card
from neurosim.random_streams import PhiloxStream
from neurosim.training import TrainerConfig, make_engine, make_trainer
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import dgc_exact, dgc_linearized_layers, dgc_sequential

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_crossbar import device_spec  # the same non-ideal device as the crossbar figures

COST = "cross_entropy"
CROSSBAR = {"dac_bits": 8, "adc_bits": 8, "adc_range": 12.0}
# BP updates of lr·g are mostly below one pulse (2/96 of w_max on Ag:a-Si): stochastic rounding lets the
# network learn (deterministic rounding would leave nearly every weight unprogrammed and train nothing).
BP_CROSSBAR = {**CROSSBAR, "rounding": "stochastic"}
# The neuron circuits of the BP figures: mismatch and noise in the forward and in the derivative circuits.
BP_ACTIVATION = ActivationConfig(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01,
                                 derivative_gain_dtod=0.05, derivative_offset_dtod=0.02, derivative_noise=0.01)


def clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- DGC
def dgc_figures(x: torch.Tensor, y: torch.Tensor, subset: int, repeats: int) -> None:
    # Noise-free chip: d2d spreads and neuron mismatch are sampled once and so are deterministic; no read
    # noise, no cycle-to-cycle noise, no neuron noise.
    spec = with_overrides(load_card("ag_asi"), {"c2c": 0.0, "read_noise": 0.0, "g_min_dtod": 0.05,
                                                "g_max_dtod": 0.05, "nl_dtod": 0.05, "step_dtod": 0.05})
    act = ActivationConfig(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02)
    net = build_network(NetworkConfig(hidden=(100,), activation=act, crossbar=CrossbarConfig(**CROSSBAR)), spec,
                        tuple(x.shape[1:]), 10, seed=0, derivative_circuits=False)
    layers = net.analog_layers
    cfg = DGCConfig()
    lin_cfg = build(DGCConfig, {"mode": "linearized"})
    gen = torch.Generator().manual_seed(0)

    # The subset: split over the layers in proportion to their weights (at least 10 each), drawn at random.
    sizes = [layer.crossbar.in_features * layer.crossbar.out_features for layer in layers]
    total = sum(sizes)
    picks = []
    for layer, n in zip(layers, sizes, strict=True):
        k = min(n, max(10, round(subset * n / total)))
        flat = torch.randperm(n, generator=gen)[:k]
        outs = layer.crossbar.out_features
        picks.append([(int(f) // outs, int(f) % outs) for f in flat])

    batched: dict[str, torch.Tensor] = {}

    def exact_step():
        for layer in layers:
            batched[layer.name] = dgc_exact(net, layer, x, y, COST, cfg)[0]

    def linearized_step():
        # As the trainer does it: one autograd pass and one noise estimate serve every layer of the step.
        dgc_linearized_layers(net, layers, x, y, COST, lin_cfg)

    dgc_exact(net, layers[-1], x, y, COST, cfg)    # warm-up (the small layer: the same code paths)
    linearized_step()
    t_exact, t_lin = [], []
    for _ in range(repeats):
        t_exact.append(clock(exact_step))
        t_lin.append(clock(linearized_step))
    t_exact, t_lin = statistics.median(t_exact), statistics.median(t_lin)

    # What a loop could not go below: one noise-free measurement (a forward pass of the batch) per weight.
    forward = []
    with torch.no_grad():
        for _ in range(5 + 20):
            forward.append(clock(lambda: net(x)))
    t_forward = statistics.median(forward[5:])

    # The loop: per weight, scaled to every weight of its layer. Its first call is the warm-up.
    dgc_sequential(net, layers[-1], x, y, COST, cfg, weights=picks[-1][:2])
    t_loop, diff, scale = 0.0, 0.0, 0.0
    for layer, pick, n in zip(layers, picks, sizes, strict=True):
        t0 = time.perf_counter()
        loop, _ = dgc_sequential(net, layer, x, y, COST, cfg, weights=pick)
        t_loop += (time.perf_counter() - t0) * n / len(pick)
        idx = torch.tensor(pick)
        a, b = loop[idx[:, 0], idx[:, 1]], batched[layer.name][idx[:, 0], idx[:, 1]]
        diff = max(diff, float((a - b).abs().max()))
        scale = max(scale, float(b.abs().max()))
    print(f"# DGC: 784-100-10 sigmoid MLP, batch 32, {total} weights, forward difference, 1-pulse perturbation;"
          f" loop timed on {sum(map(len, picks))} random weights ({', '.join(map(str, map(len, picks)))} per "
          f"layer) and scaled per layer")
    print(f"dgc_exact_s = {t_exact:.3f}")
    print(f"dgc_linearized_s = {t_lin:.4f}")
    print(f"dgc_loop_s_scaled = {t_loop:.1f}")
    print(f"dgc_loop_ms_per_weight = {1e3 * t_loop / total:.3f}")
    print(f"dgc_batched_vs_loop = {t_loop / t_exact:.1f}")
    print(f"dgc_forward_ms = {1e3 * t_forward:.3f}")
    print(f"dgc_batched_vs_forward_floor = {t_forward * total / t_exact:.1f}")
    # Retired as a goal (issue 14): the linearized mode's worth is its validity, not its speed; kept as a comment.
    print(f"# linearized step over exact: {t_exact / t_lin:.1f}x faster")
    print(f"dgc_loop_max_abs_diff = {diff:.3g}")
    print(f"# largest |gradient| on the subset: {scale:.3g}")
    noisy_chip_figures(x, y, repeats)


def noisy_chip_figures(x: torch.Tensor, y: torch.Tensor, repeats: int) -> None:
    """Exact DGC of the same network on the card as it is (read noise, cycle-to-cycle noise) with 1 % neuron
    noise: every measurement re-reads the layers below (the chip's sequence); per perturbation mode."""
    spec = load_card("ag_asi")
    act = ActivationConfig(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01)
    for mode in ("temporary", "pulse"):
        net = build_network(NetworkConfig(hidden=(100,), activation=act, crossbar=CrossbarConfig(**CROSSBAR)),
                            spec, tuple(x.shape[1:]), 10, seed=0, derivative_circuits=False)
        cfg = build(DGCConfig, {"perturbation": mode})

        def step(net=net, cfg=cfg):
            for layer in net.analog_layers:
                dgc_exact(net, layer, x, y, COST, cfg)

        step()
        print(f"dgc_exact_noisy_{mode}_s = {statistics.median(clock(step) for _ in range(max(1, repeats))):.3f}")


# ----------------------------------------------------------------------------------------------------- BP
def digital_epoch(model: nn.Module, opt: torch.optim.Optimizer, data, batch: int, shuffle: torch.Generator,
                  times: dict[str, list[float]]) -> None:
    """One epoch in plain torch, shaped like Trainer.run_epochs: shuffled batches, then a test evaluation."""
    t0 = time.perf_counter()
    order = torch.randperm(len(data.x_train), generator=shuffle)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    t1 = time.perf_counter()
    with torch.no_grad():
        correct = sum(int((model(data.x_test[i:i + 512]).argmax(1) == data.y_test[i:i + 512]).sum())
                      for i in range(0, len(data.x_test), 512))
    t2 = time.perf_counter()
    times["digital"].append(t2 - t0)
    times["digital_train"].append(t1 - t0)
    times["digital_accuracy"].append(correct / len(data.x_test))


class _StepRecorder(TorchDispatchMode):
    """Records the matrix products (operand shapes) and the random numbers (how many) of what runs under it."""

    PRODUCTS: ClassVar[dict[str, int]] = {"mm": 2, "bmm": 2, "addmm": 3}

    def __init__(self):
        super().__init__()
        self.products: list[tuple[str, list[tuple[int, ...]]]] = []
        self.draws = {"normal": 0, "uniform": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.PRODUCTS:
            self.products.append((name, [(tuple(a.shape), a.dtype) for a in args[:self.PRODUCTS[name]]]))
        elif name in ("randn", "normal_", "normal"):
            self.draws["normal"] += out.numel()
        elif name in ("rand", "uniform_"):
            self.draws["uniform"] += out.numel()
        return out


def floor_step(net_cfg, spec, data, batch: int):
    """A function doing one hardware-BP step's matrix products (shapes and dtypes: the read noise's variance
    products may be bfloat16) and random draws and nothing else, recorded from one real step (gradients and the
    update of every layer) of a fresh copy of the benchmark's network."""
    net = build_network(net_cfg, spec, data.image_shape, data.classes, seed=1)
    trainer = make_trainer(net, data, build(TrainerConfig, {"scheme": "bp", "batch_size": batch}), seed=1)
    x, y, layers = data.x_train[:batch], data.y_train[:batch], net.analog_layers
    trainer.bp_gradients(x, y, layers)   # warm-up: the read caches are built once, not every step
    trainer.update_layers(layers, [layer.weight.grad for layer in layers])
    recorder = _StepRecorder()
    take = PhiloxStream._take

    def counted(stream, n):   # the read noise's Philox draws (fused into the ADC: no torch operation to see)
        recorder.draws["philox"] += n
        return take(stream, n)

    recorder.draws["philox"] = 0
    PhiloxStream._take = counted
    try:
        with recorder:
            trainer.bp_gradients(x, y, layers)
            trainer.update_layers(layers, [layer.weight.grad for layer in layers])
    finally:
        PhiloxStream._take = take
    gen = torch.Generator().manual_seed(0)
    operands = [(getattr(torch, name), [torch.rand(s, generator=gen).to(dtype) for s, dtype in shapes])
                for name, shapes in recorder.products]
    normal, uniform, philox = recorder.draws["normal"], recorder.draws["uniform"], recorder.draws["philox"]
    stream = PhiloxStream(0, "cpu", "floor")
    buffer = torch.empty(philox)

    def step():
        for fn, args in operands:
            fn(*args)
        torch.randn(normal, generator=gen)
        torch.rand(uniform, generator=gen)
        stream.normal_(buffer)

    return step, recorder


def engine_epoch(network, steps: int, repeats: int = 5) -> float:
    """Seconds the clock alone costs in one BP epoch: the engine calls a BP step issues (forward pass,
    transposed backward pass, outer products, programming of every layer in parallel), ``steps`` times, in a
    simpy process with no tensor work. Pure Python, so far less disturbed by other processes than the
    difference of two epoch timings."""
    names = [layer.name for layer in network.analog_layers]

    def process(engine):
        for _ in range(steps):
            yield engine.forward(64)
            yield engine.backward(64, names, transposed=True)
            yield engine.digital("outer_product", 64 * 235_146)
            yield engine.parallel(*[engine.program(name, 500, 40) for name in names])
        engine.mark_epoch(1)

    times = []
    for _ in range(repeats + 1):
        engine = make_engine(network, enabled=True)
        times.append(clock(lambda engine=engine: engine.start(process(engine))))
    return statistics.median(times[1:])


def bp_figures(data, repeats: int) -> None:
    spec = device_spec()
    net_cfg = NetworkConfig(hidden=(256, 128), activation=BP_ACTIVATION, crossbar=CrossbarConfig(**BP_CROSSBAR))
    trainers = {}
    for clock_on in (True, False):
        net = build_network(net_cfg, spec, data.image_shape, data.classes, seed=0)
        cfg = build(TrainerConfig, {"scheme": "bp", "epochs": 1, "batch_size": 64, "clock": clock_on})
        trainers["on" if clock_on else "off"] = make_trainer(net, data, cfg, seed=0)

    floor, recorded = floor_step(net_cfg, spec, data, 64)
    steps = -(-len(data.x_train) // 64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.Sigmoid(), nn.Linear(256, 128), nn.Sigmoid(),
                          nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shuffle = torch.Generator().manual_seed(0)

    times: dict[str, list[float]] = {"on": [], "off": [], "on_train": [], "off_train": [], "digital": [],
                                     "digital_train": [], "digital_accuracy": [], "floor": []}
    for r in range(repeats + 1):                   # the first round is the warm-up
        # Alternate which clock setting goes first, so an order effect cancels in the median.
        for key in (("on", "off") if r % 2 else ("off", "on")):
            trainer = trainers[key]
            t = clock(lambda trainer=trainer: trainer.run_epochs(1))
            times[key].append(t)
            times[f"{key}_train"].append(trainer.history[-1]["wall_time_s"])
        digital_epoch(model, opt, data, 64, shuffle, times)
        times["floor"].append(clock(lambda: [floor() for _ in range(steps)]))
        if r == 0:
            times = {k: [] for k in times}
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = statistics.median((on - off) / off for on, off in zip(times["on"], times["off"], strict=True))
    engine_s = engine_epoch(trainers["on"].network, steps)
    row = trainers["on"].history[-1]
    print(f"# BP: 784-256-128-10 sigmoid MLP, batch 64, {len(data.x_train)} training and {len(data.x_test)} "
          f"test samples, median of {repeats} epochs after one warm-up epoch")
    print(f"bp_epoch_s = {med['on']:.3f}")
    print(f"bp_epoch_clock_off_s = {med['off']:.3f}")
    print(f"digital_epoch_s = {med['digital']:.4f}")
    print(f"bp_vs_digital = {med['on'] / med['digital']:.1f}")
    print(f"bp_vs_digital_train_only = {med['on_train'] / med['digital_train']:.1f}")
    print(f"# floor: {len(recorded.products)} matrix products "
          f"({sum(math.prod(s[-2][0]) * s[-1][0][-1] for _, s in recorded.products) / 1e6:.1f} M "
          f"multiply-adds), {recorded.draws['normal']:,} Gaussian and {recorded.draws['uniform']:,} uniform "
          f"numbers from torch and {recorded.draws['philox']:,} Philox Gaussians (read noise) a step")
    print(f"bp_floor_step_ms = {1e3 * med['floor'] / steps:.3f}")
    print(f"digital_step_ms = {1e3 * med['digital_train'] / steps:.3f}")
    print(f"bp_floor_vs_digital = {med['floor'] / med['digital_train']:.2f}")
    print(f"engine_overhead = {overhead:.3f}")
    print(f"engine_epoch_ms = {1e3 * engine_s:.2f}")
    print(f"engine_overhead_direct = {engine_s / med['off']:.4f}")
    print(f"# last clock-on epoch: test accuracy {row['test_accuracy']:.3f} (plain torch "
          f"{times['digital_accuracy'][-1]:.3f}), simulated {row['delta_sim_time_s']:.4g} s, "
          f"{row['delta_energy_j']:.4g} J, {row['delta_pulses']:.0f} pulses")


SIZES = tuple(f"{w}_b{b}" for w in ("784-256-128-10", "784-1024-512-10") for b in (64, 256, 1024))


def parse_size(text: str) -> tuple[tuple[int, ...], int]:
    """'784-256-128-10_b64' -> ((784, 256, 128, 10), 64)."""
    try:
        widths, batch = text.strip().split("_b")
        return tuple(int(w) for w in widths.split("-")), int(batch)
    except ValueError:
        raise SystemExit(f"--sizes: {text!r} is not WIDTHS_bBATCH, e.g. 784-256-128-10_b64") from None


def bp_contender(net_cfg, spec, data, batch: int):
    """A hardware-BP trainer (clock on) of the benchmark's chip for ``net_cfg`` at ``batch``."""
    net = build_network(net_cfg, spec, data.image_shape, data.classes, seed=0)
    return make_trainer(net, data, build(TrainerConfig, {"scheme": "bp", "epochs": 1, "batch_size": batch}), seed=0)


def size_figures(data, size: str, repeats: int) -> None:
    """bp_vs_digital and bp_floor_vs_digital of one network and batch (contenders interleaved per round)."""
    widths, batch = parse_size(size)
    if widths[0] != math.prod(data.image_shape) or widths[-1] != data.classes:
        raise SystemExit(f"--sizes: {size}: the data are {math.prod(data.image_shape)} inputs and "
                         f"{data.classes} classes")
    spec = device_spec()
    net_cfg = NetworkConfig(hidden=widths[1:-1], activation=BP_ACTIVATION, crossbar=CrossbarConfig(**BP_CROSSBAR))
    trainer = bp_contender(net_cfg, spec, data, batch)
    floor, _ = floor_step(net_cfg, spec, data, batch)
    steps = -(-len(data.x_train) // batch)
    torch.manual_seed(0)
    stages: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        stages += [nn.Linear(a, b)] + ([nn.Sigmoid()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*stages)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shuffle = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"bp": [], "bp_train": [], "digital": [], "digital_train": [],
                                     "digital_accuracy": [], "floor": []}
    r = 0
    while r <= repeats:                            # the first round is the warm-up
        start = time.perf_counter()
        times["bp"].append(clock(lambda: trainer.run_epochs(1)))
        times["bp_train"].append(trainer.history[-1]["wall_time_s"])
        digital_epoch(model, opt, data, batch, shuffle, times)
        times["floor"].append(clock(lambda: [floor() for _ in range(steps)]))
        if r == 0:
            times = {k: [] for k in times}
            repeats = rounds_for(time.perf_counter() - start, repeats)
        r += 1
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        """The median over rounds of each round's ratio: a round times the contenders back to back, so a slow
        phase of a shared machine (seconds long, ±30 % here) slows both sides of its ratio alike."""
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"# {size}: {len(data.x_train)} training and {len(data.x_test)} test samples, {repeats} rounds after "
          f"a warm-up round; test accuracy {trainer.history[-1]['test_accuracy']:.3f} "
          f"(plain torch {times['digital_accuracy'][-1]:.3f})")
    print(f"bp_epoch_s_{size} = {med['bp']:.3f}")
    print(f"digital_epoch_s_{size} = {med['digital']:.4f}")
    print(f"bp_vs_digital_{size} = {paired('bp', 'digital'):.2f}")
    print(f"bp_vs_digital_medians_{size} = {med['bp'] / med['digital']:.2f}")
    print(f"bp_vs_digital_train_only_{size} = {paired('bp_train', 'digital_train'):.2f}")
    print(f"bp_floor_vs_digital_{size} = {paired('floor', 'digital_train'):.2f}")
    sys.stdout.flush()


ROUND_BUDGET_S = 8.0     # seconds of rounds a size's figures may take: more rounds where they are short
NEURON_BUDGET_S = 30.0   # the neuron figures' (their rounds' ratios spread more: 0.76-1.27 in one run)
MAX_ROUNDS = 25


def rounds_for(warmup_s: float, least: int, budget_s: float = ROUND_BUDGET_S) -> int:
    """Rounds of a paired figure: as many as fit in ``budget_s`` at the warm-up round's pace, at least
    ``least`` and at most MAX_ROUNDS (with --quick, ``least`` itself). One round's ratio varies by ±20 % on a
    shared machine (bp_vs_digital 2.1-3.5 within one run, a neuron ratio 0.76-1.27), and the median of n
    rounds by about 1/√n of that: measured, 9 rounds of bp_vs_digital gave medians 2.60-2.84 in three
    back-to-back runs, 5-9 rounds of bp_taylor_vs_exact 0.97-1.14, 25 rounds 1.02."""
    if least <= 1:
        return least
    return max(least, min(MAX_ROUNDS, int(budget_s / max(warmup_s, 1e-3))))


def neuron_figures(data, repeats: int) -> None:
    """A BP epoch with Taylor and with PWL neuron circuits over the same epoch with exact ones (interleaved)."""
    spec = device_spec()
    trainers = {}
    for mode, extra in (("exact", {}), ("taylor", {"terms": 4}), ("pwl", {"epsilon": 0.01, "derivative": "fit"})):
        act = dataclasses.replace(BP_ACTIVATION, mode=mode, **extra)
        net_cfg = NetworkConfig(hidden=(256, 128), activation=act, crossbar=CrossbarConfig(**BP_CROSSBAR))
        trainers[mode] = bp_contender(net_cfg, spec, data, 64)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    r = 0
    while r <= repeats:
        start = time.perf_counter()
        for mode, trainer in (list(trainers.items()) if r % 2 else list(trainers.items())[::-1]):
            trainer.run_epochs(1)
            times[mode].append(trainer.history[-1]["wall_time_s"])
        if r == 0:
            times = {k: [] for k in times}
            repeats = rounds_for(time.perf_counter() - start, repeats, NEURON_BUDGET_S)
        r += 1
    print(f"# neuron circuits: 784-256-128-10, batch 64, training part of the epoch, {repeats} rounds (order "
          "alternating), the median of the rounds' ratios")
    for mode in ("taylor", "pwl"):
        ratio = statistics.median(t / e for t, e in zip(times[mode], times["exact"], strict=True))
        print(f"bp_{mode}_vs_exact = {ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as the neurosim command does: large temporaries are reused, not re-mapped
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, a smaller loop subset and 2,000 BP "
                   "training samples (a smoke run; ratios noisier)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--only", choices=("dgc", "bp"), help="run one group of figures")
    p.add_argument("--sizes", help="BP figures per network and batch instead: 'all' or WIDTHS_bBATCH,... "
                   "(e.g. 784-1024-512-10_b256); 4,000 training samples")
    p.add_argument("--neurons", action="store_true", help="with --sizes: also the Taylor/PWL-over-exact epochs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch_threads = {torch.get_num_threads()}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (other processes on this machine disturb timings)")
    if args.sizes:
        sizes = SIZES if args.sizes == "all" else [t for t in args.sizes.split(",") if t]
        for size in sizes:
            parse_size(size)
        data = load(DataConfig(name="synthetic", size=28, samples=5000, test_fraction=0.2), seed=0)
        for size in sizes:
            size_figures(data, size, repeats=1 if args.quick else 9)   # at least 9 rounds (rounds_for)
        if args.neurons:
            neuron_figures(data, repeats=1 if args.quick else 5)
        return finish()
    samples = 2500 if args.quick else 12500        # test_fraction 0.2: 2,000 or 10,000 training samples
    data = load(DataConfig(name="synthetic", size=28, samples=samples, test_fraction=0.2), seed=0)
    if args.only != "bp":
        dgc_figures(data.x_train[:32], data.y_train[:32], subset=50 if args.quick else 200,
                    repeats=1 if args.quick else 3)
        sys.stdout.flush()
    if args.only != "dgc":
        bp_figures(data, repeats=2 if args.quick else 6)
        neuron_figures(data, repeats=1 if args.quick else 3)
    return finish()


def finish() -> int:
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print(f"peak_rss_mb = {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
