"""Exact DGC against its arithmetic floor, and its memory.

One figure a line as ``name = value`` (lines starting with ``#`` are comments). Times are medians over
repeats after a warm-up; the exact measurement and its floor are interleaved within every repeat, so a
disturbance from another process hits both alike.

  dgc_exact_vs_floor[_<noise>_<mode>][_<widths>_b<batch>]
        the time of exact DGC's measurements (``dgc_batch.measure_costs``, the batched chip sequence with
        fresh noise in every layer for every measurement) over the time of the floor's arithmetic executed
        as tensor ops: the random numbers and multiply-adds the same measurements need at the least
        (docs/training.md, "Exact DGC's arithmetic floor"), for every analog layer of the network. Each
        layer is timed on its first --cycles cycles (all of them where it has fewer) and scaled to all of
        its cycles; the floor is timed on the same count. Without a suffix: 784-100-10 sigmoid MLP, batch
        32, every noise on (read noise 2 % in every crossbar, neuron noise 1 % in the hidden layers),
        temporary perturbations.
  dgc_exact_vs_floor_f32_draws
        the same with the floor's Gaussian numbers drawn by torch's generator in float32 (its cheapest), for
        comparison with the figures from before the read and neuron noise moved to Philox streams. The
        floor itself draws from a Philox stream (docs/random.md), as the measurements now do.
  dgc_exact_step_s_..., dgc_floor_step_s_...
        the two times, scaled to one whole DGC step (every weight of every layer).
  dgc_floor_draws_..., dgc_floor_macs_...
        the floor's count of Gaussian numbers and multiply-adds for one step.
  peak_rss_mb        peak resident memory of this process.
  dgc_peak_rss_mb_<widths>_b<batch>   (--memory) peak resident memory of a fresh process that runs exact DGC
        on every layer of that network for its first two batches of measurements (a batch's memory is the
        same for all of them), every noise on; the goal is < 2,000 MB at every size.

    python benchmarks/bench_dgc.py [--quick] [--sizes] [--memory] [--threads N] [--cycles N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.backend import tune_allocator
from neurosim.config import build, with_overrides
from neurosim.crossbar import CrossbarConfig
from neurosim.device import load_card
from neurosim.layers import AnalogLayer
from neurosim.random_streams import PhiloxStream
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import commit, measurement_precision, perturbation_plan
from neurosim.training.dgc_batch import CHUNK_ELEMENTS, _elements_per_measurement, has_noise, measure_costs

COST = "cross_entropy"
CROSSBAR = {"dac_bits": 8, "adc_bits": 8, "adc_range": 12.0}
NOISE = {  # (read noise of every crossbar, neuron noise of the hidden layers)
    "all": (0.02, 0.01),
    "neuron": (0.0, 0.01),      # the card as shipped (no read noise published for Ag:a-Si)
    "none": (0.0, 0.0),
}
MEMORY_SIZES = [((256, 128), 64), ((256, 128), 256), ((256, 128), 1024),
                ((1024, 512), 64), ((1024, 512), 256), ((1024, 512), 1024)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_net(hidden: tuple[int, ...], noise: str):
    read_noise, neuron_noise = NOISE[noise]
    spec = with_overrides(load_card("ag_asi"), {"read_noise": read_noise})
    act = ActivationConfig(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=neuron_noise)
    return build_network(NetworkConfig(hidden=hidden, activation=act, crossbar=CrossbarConfig(**CROSSBAR)), spec,
                         (1, 28, 28), 10, seed=0, derivative_circuits=False)


# ------------------------------------------------------------------------------------------------- the floor
def floor_terms(network, layer: AnalogLayer, cfg: DGCConfig, batch: int, residues: bool):
    """What one measurement of ``layer`` needs at the least: (Gaussian draws, [(kind, rows, inner, out)]) with
    kind "dense" (a product of inputs that differ from the base state's: rows·inner·out multiply-adds), "rank1"
    (an outer product: rows·out) or "column" (one column times the perturbed row's inputs: rows)."""
    layers = network.analog_layers
    k = layers.index(layer)
    fresh = cfg.lower_reads == "fresh" and any(has_noise(s) for s in layers[:k])
    draws, macs = 0, []
    confined = True   # the measurement's change so far is one column of the layer below's output
    for n, lay in enumerate(layers):
        cb = lay.crossbar
        rows = batch * lay.reads_per_sample
        out = cb.out_features
        read_noise = bool(cb.noise and cb.config.read_noise and cb.spec.read_noise > 0)
        products = 2 if read_noise else 1            # the signal, and the read noise's variance Σ x̂²G²
        if n < k and not fresh:
            continue                                 # read once per step, shared by every measurement
        draws += rows * out * ((cb.n_row_tiles if read_noise else 0) + (1 if lay.activation.config.noise else 0))
        inputs_shared = n == 0 or (n <= k and not fresh)
        if n < k:
            if not inputs_shared:
                macs += [("dense", rows, cb.in_features, out)] * products
        elif n == k:
            # One column changes by the perturbed row's input times Δw (and, pulse modes, the previous cycle's
            # restore error settles in its own column).
            macs += [("dense", rows, cb.in_features, out)] * products if not inputs_shared else \
                [("column", rows, 1, 1)] * products * (2 if residues else 1)
            confined = inputs_shared and not has_noise(lay)
        else:
            if confined and n == k + 1:
                macs += [("rank1", rows, 1, out)] * products * (2 if residues else 1)
            else:
                macs += [("dense", rows, cb.in_features, out)] * products
    return draws, macs


def floor_operands(draws: int, macs) -> tuple[int, dict]:
    """The batch size and the operands (allocated once, outside the timing) of the floor's products."""
    dtype = torch.float64
    per = max([draws] + [r * (i + o) for _, r, i, o in macs] + [1])
    chunk = max(1, CHUNK_ELEMENTS // per)
    operands = {}
    for kind, rows, inner, out in set(macs):
        if kind == "dense":
            operands[(kind, rows, inner, out)] = (torch.rand(chunk * rows, inner, dtype=dtype),
                                                  torch.rand(inner, out, dtype=dtype))
        elif kind == "rank1":
            operands[(kind, rows, inner, out)] = (torch.rand(chunk, rows, 1, dtype=dtype),
                                                  torch.rand(chunk, 1, out, dtype=dtype))
        else:
            operands[(kind, rows, inner, out)] = (torch.rand(chunk, rows, dtype=dtype),
                                                  torch.rand(chunk, 1, dtype=dtype))
    return chunk, operands


def run_floor(draws: int, macs, measurements: int, generator: torch.Generator | PhiloxStream, chunk: int,
              operands: dict, draw_dtype: torch.dtype = torch.float64) -> None:
    """Execute the floor's arithmetic for ``measurements`` measurements, in batches of bounded memory: the
    Gaussian numbers (float64, as the measurements draw them; from the Philox stream the read and neuron noise
    come from, or from a torch generator: ``generator``) and the products (float64)."""
    for start in range(0, measurements, chunk):
        P = min(chunk, measurements - start)
        if draws:
            if isinstance(generator, PhiloxStream):
                generator.normal(P * draws, dtype=draw_dtype)
            else:
                torch.randn(P * draws, generator=generator, dtype=draw_dtype)
        for kind, rows, inner, out in macs:
            a, b = operands[(kind, rows, inner, out)]
            if kind == "dense":
                torch.mm(a[: P * rows], b)
            elif kind == "rank1":
                torch.bmm(a[:P], b[:P])
            else:
                torch.mul(a[:P], b[:P])


def mac_count(macs) -> int:
    return sum(r * i * o for _, r, i, o in macs)


# ---------------------------------------------------------------------------------------------- the figures
def floor_figures(hidden: tuple[int, ...], batch: int, noise: str, mode: str, cycles: int, repeats: int,
                  suffix: str, f32: bool = False) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    net = make_net(hidden, noise)
    cfg = build(DGCConfig, {"perturbation": mode})
    gen = PhiloxStream(1, "cpu", "floor")   # the generator of the chip's read and neuron noise
    torch_gen = torch.Generator().manual_seed(1)
    t_exact, t_floor, t_floor32, total_draws, total_macs = 0.0, 0.0, 0.0, 0, 0
    for layer in net.analog_layers:
        plan = perturbation_plan(layer, cfg)
        commit(layer, plan)
        count = plan.cycles
        n = min(count, cycles)
        draws, macs = floor_terms(net, layer, cfg, batch, plan.inc_w is not None)
        total_draws += draws * count
        total_macs += mac_count(macs) * count

        def exact(layer=layer, plan=plan, n=n):
            with measurement_precision(net, torch.float64):
                measure_costs(net, layer, x, y, COST, cfg, plan, limit=n)

        chunk, operands = floor_operands(draws, macs)

        def floor(draws=draws, macs=macs, n=n, chunk=chunk, operands=operands):
            run_floor(draws, macs, n, gen, chunk, operands)

        def floor32(draws=draws, macs=macs, n=n, chunk=chunk, operands=operands):
            run_floor(draws, macs, n, torch_gen, chunk, operands, torch.float32)

        contenders = [exact, floor] + ([floor32] if draws and f32 else [])
        times = [[] for _ in contenders]
        for fn in contenders:
            fn()
        for _ in range(repeats):
            for fn, out in zip(contenders, times, strict=True):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        t_exact += statistics.median(times[0]) * count / n
        t_floor += statistics.median(times[1]) * count / n
        if len(times) == 3:
            t_floor32 += statistics.median(times[2]) * count / n
    print(f"dgc_exact_vs_floor{suffix} = {t_exact / t_floor:.2f}")
    if t_floor32:
        print(f"dgc_exact_vs_floor_f32_draws{suffix} = {t_exact / t_floor32:.2f}")
    print(f"dgc_exact_step_s{suffix} = {t_exact:.2f}")
    print(f"dgc_floor_step_s{suffix} = {t_floor:.2f}")
    print(f"dgc_floor_draws{suffix} = {total_draws:.4g}")
    print(f"dgc_floor_macs{suffix} = {total_macs:.4g}", flush=True)


def memory_run(hidden: tuple[int, ...], batch: int) -> None:
    """Exact DGC on every layer for two batches of measurements each; prints this process's peak memory."""
    tune_allocator()
    torch.manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    net = make_net(hidden, "all")
    cfg = build(DGCConfig, {})
    for layer in net.analog_layers:
        plan = perturbation_plan(layer, cfg)
        with measurement_precision(net, torch.float64):
            measure_costs(net, layer, x, y, COST, cfg, plan, limit=1)
            fresh = any(has_noise(s) for s in net.analog_layers[:net.analog_layers.index(layer)])
            chunk = max(1, CHUNK_ELEMENTS // _elements_per_measurement(net, layer, batch, fresh))
            measure_costs(net, layer, x, y, COST, cfg, plan, limit=2 * chunk)
    print(f"{peak_rss_mb():.0f}")


def memory_figures() -> None:
    for hidden, batch in MEMORY_SIZES:
        out = subprocess.run([sys.executable, __file__, "--memory-run", ",".join(map(str, hidden)), str(batch)],
                             capture_output=True, text=True, check=True)
        widths = "-".join(map(str, (784, *hidden, 10)))
        print(f"dgc_peak_rss_mb_{widths}_b{batch} = {out.stdout.strip().splitlines()[-1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cycles and repeats (a smoke run)")
    p.add_argument("--sizes", action="store_true", help="also 784-256-128-10 at batch 64")
    p.add_argument("--memory", action="store_true", help="peak memory at every size of issue 14's table")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--cycles", type=int, help="cycles timed per layer (default 4000, quick 1000)")
    p.add_argument("--memory-run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_run:
        memory_run(tuple(int(v) for v in args.memory_run[0].split(",")), int(args.memory_run[1]))
        return 0
    tune_allocator()
    cycles = args.cycles or (1000 if args.quick else 4000)
    repeats = 2 if args.quick else 3
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {cycles} cycles timed per layer")
    floor_figures((100,), 32, "all", "temporary", cycles, repeats, "", f32=True)
    for noise, mode in (("all", "pulse"), ("neuron", "temporary"), ("neuron", "pulse"), ("none", "temporary")):
        floor_figures((100,), 32, noise, mode, cycles, repeats, f"_{noise}_{mode}")
    if args.sizes:
        for noise, mode in (("all", "temporary"), ("all", "pulse")):
            floor_figures((256, 128), 64, noise, mode, max(1, cycles // 4), repeats,
                          f"_{noise}_{mode}_784-256-128-10_b64")
    if args.memory:
        memory_figures()
    print(f"peak_rss_mb = {peak_rss_mb():.0f}")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
