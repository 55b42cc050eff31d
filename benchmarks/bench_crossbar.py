"""Cost of a crossbar read against a plain matrix product, and of a read with the exact wire-resistance solve.

One figure a line as ``name = value`` (lines starting with ``#`` are comments); every ratio is taken between
times measured in the same run, interleaved (each repeat times every contender once, so a disturbance from
another process hits all of them alike), after warm-up runs, as the median over the repeats.

  crossbar_read_vs_matmul                 Crossbar.read of a batch of 128 on one 256×256 tile, steady state
                                          (derived tensors cached), divided by torch.matmul (128,256)·(256,256)
  crossbar_read_after_program_vs_matmul   the same read right after a program_delta (the read rebuilds its
                                          cached tensors); only the read is timed
  transposed_read_vs_matmul               Crossbar.read_transposed of a batch of 128 (BP's backward read)
  nodal_solve_ms_N                        one read of one input vector (batch 1) of an N×N array with the exact
                                          nodal wire solve, right after a write: assembly and factorization of
                                          both devices of the differential pair included
  nodal_read_cached_ms_N                  the next read of the same array: factorizations cached, two
                                          triangular solves per device
The tile has every non-ideality on except wire resistance (in the nodal lines, wire resistance too): 8-bit
DAC and ADC, read noise, device-to-device spreads, faults, drift, cycle-to-cycle noise on programming.
The exact solver alone (factor, cached solve, CG approximation) is measured by benchmarks/bench_wires.py.

    python benchmarks/bench_crossbar.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from neurosim.backend import tune_allocator
from neurosim.config import with_overrides
from neurosim.crossbar import Crossbar, CrossbarConfig
from neurosim.device import DeviceSpec, load_card

# Every device non-ideality the card model has, at moderate values (Ag:a-Si already carries its nonlinearity
# and 3.5 % cycle-to-cycle noise).
NON_IDEAL = {"read_noise": 0.02, "g_min_dtod": 0.05, "g_max_dtod": 0.05, "nl_dtod": 0.05, "step_dtod": 0.05,
             "stuck_at_gmin": 0.002, "stuck_at_gmax": 0.002, "drift_nu": 0.01, "drift_nu_dtod": 0.1}


def device_spec() -> DeviceSpec:
    """Ag:a-Si with every non-ideality switched on (validated like a card file)."""
    return with_overrides(load_card("ag_asi"), NON_IDEAL, source="bench_crossbar")


def race(cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]], repeats: int,
         warmup: int = 3) -> dict[str, float]:
    """Median seconds of each case's timed call; a case is (untimed set-up or None, timed call). Cases are
    interleaved within every repeat."""
    for setup, fn in cases.values():
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, (setup, fn) in cases.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def tile_reads(repeats: int) -> None:
    spec = device_spec()
    cfg = CrossbarConfig(tile_rows=256, tile_cols=256, dac_bits=8, adc_bits=8, adc_range=12.0)
    bar = Crossbar(spec, 256, 256, cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(256, 256, generator=g) * 2 - 1) * 0.5
    bar.set_weights(w)
    bar.advance(100.0)                    # drift active: conductances decay from here on
    x = torch.rand(128, 256, generator=g)
    d = torch.randn(128, 256, generator=g)
    signs = torch.randint(0, 2, (256, 256), generator=g).float() * 2 - 1
    step = {"sign": 1.0}

    def program():
        # One pulse on every weight, alternating direction so the weights stay where they are on average.
        step["sign"] = -step["sign"]
        bar.program_delta(step["sign"] * bar.dw_pulse * signs)

    def warm():
        bar.read(x)                       # the cached tensors are current again after the program case

    t = race({
        "matmul": (None, lambda: torch.matmul(x, w)),
        "read": (warm, lambda: bar.read(x)),
        "read_after_program": (program, lambda: bar.read(x)),
        "transposed": (warm, lambda: bar.read_transposed(d)),
        "program": (None, program),
    }, repeats)
    print(f"# 256x256 tile, batch 128; spec {spec.name} with {NON_IDEAL}, dac/adc 8 bit")
    print(f"matmul_ms = {1e3 * t['matmul']:.4f}")
    print(f"crossbar_read_ms = {1e3 * t['read']:.4f}")
    print(f"crossbar_read_vs_matmul = {t['read'] / t['matmul']:.2f}")
    print(f"crossbar_read_after_program_vs_matmul = {t['read_after_program'] / t['matmul']:.2f}")
    print(f"transposed_read_vs_matmul = {t['transposed'] / t['matmul']:.2f}")
    print(f"program_delta_ms = {1e3 * t['program']:.4f}")


def nodal_reads(sizes: tuple[int, ...], repeats: int) -> None:
    spec = device_spec()
    print("# nodal: N×N array in one tile, r_wire = 1 ohm, batch 1; differential pair = two factorizations")
    for n in sizes:
        cfg = CrossbarConfig(tile_rows=n, tile_cols=n, dac_bits=8, adc_bits=8, adc_range=12.0,
                             wire_resistance="nodal", r_wire=1.0)
        bar = Crossbar(spec, n, n, cfg, seed=0)
        g = torch.Generator().manual_seed(n)
        w = (torch.rand(n, n, generator=g) * 2 - 1) * 0.5
        x = torch.rand(1, n, generator=g)
        # set_weights is a write: it invalidates the cached factorizations, so the next read factorizes.
        t = race({"first": (lambda w=w, bar=bar: bar.set_weights(w), lambda bar=bar, x=x: bar.read(x)),
                  "cached": (None, lambda bar=bar, x=x: bar.read(x))}, repeats, warmup=2)
        print(f"nodal_solve_ms_{n} = {1e3 * t['first']:.2f}")
        print(f"nodal_read_cached_ms_{n} = {1e3 * t['cached']:.3f}")


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as the neurosim command does: large temporaries are reused, not re-mapped
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisier figures)")
    p.add_argument("--repeats", type=int, default=0, help="repeats of every timing (0: 200, quick 30)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (30 if args.quick else 200)
    print(f"torch_threads = {torch.get_num_threads()}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f} (other processes on this machine disturb timings)")
    tile_reads(repeats)
    nodal_reads((32, 64, 128), max(3, repeats // 10))
    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
