"""Cost of Philox draws (neurosim.random_streams) against torch's CPU generator, and of the fused read epilogue.

One figure a line as ``name = value`` (lines starting with ``#`` are comments). Contenders of one line are timed
interleaved (each repeat times every contender once, so a disturbance from another process hits all alike), after
warm-up, as the median over the repeats.

  {philox,torch}_{normal,uniform}_ns_N_tK  ns per number for a call of N numbers at K torch threads (torch:
                                           torch.randn / torch.rand with a generator, mt19937)
  epilogue_{fused,philox_torch,randn_torch}_ms_TxBxC_tK  the crossbar read's epilogue at (T, B, C), keep = C:
                                           noisy_adc_sum; the same composition in torch ops with z from the
                                           stream; the composition with torch.randn (what it replaces)
  mixed_matmul_normal_ratio_tK             time of (matmul then 1e6 Philox normals) over the two timed alone:
                                           1.0 if numba's and torch's thread pools do not get in each other's way
  compile_cold_s, compile_warm_s           first draws of every kind plus an epilogue in a fresh process, with an
                                           empty numba cache and then with the cache it left

    python benchmarks/bench_random.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from neurosim.random_streams import PhiloxStream, noisy_adc_sum, sqrt_rn


def race(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each case, interleaved within every repeat."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def draw_line(n: int, threads: int, repeats: int) -> None:
    s = PhiloxStream(0, "cpu", "bench")
    g = torch.Generator().manual_seed(0)
    out = torch.empty(n)
    t = race({"philox_normal": lambda: s.normal_(out), "torch_normal": lambda: out.normal_(generator=g),
              "philox_uniform": lambda: s.uniform_(out), "torch_uniform": lambda: out.uniform_(generator=g)},
             repeats)
    for k, v in t.items():
        print(f"{k}_ns_{n:.0e}_t{threads} = {v / n * 1e9:.3f}".replace("+0", ""))


def draws(sizes: list[int], repeats: int) -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in sizes:
            draw_line(n, threads, repeats)


def epilogue_line(shape: tuple[int, int, int], threads: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(1)
    part = torch.randn(shape, generator=g) * 20
    var = torch.rand(shape, generator=g)
    s = PhiloxStream(0, "cpu", "epilogue")

    def composed(z: torch.Tensor) -> torch.Tensor:
        x = torch.round(torch.clamp(part + 0.5 * torch.sqrt(var) * z, -127.0, 127.0))
        return x.sum(0)

    t = race({"fused": lambda: noisy_adc_sum(part, var, 0.5, 127.0, shape[2], s),
              "philox_torch": lambda: composed(s.normal(shape)),
              "randn_torch": lambda: composed(torch.randn(shape, generator=g))}, repeats)
    name = "x".join(map(str, shape)) + f"_t{threads}"
    for k, v in t.items():
        print(f"epilogue_{k}_ms_{name} = {v * 1e3:.3f}")
    print(f"epilogue_fused_speedup_vs_randn_{name} = {t['randn_torch'] / t['fused']:.2f}")


def epilogues(shapes: list[tuple[int, int, int]], repeats: int) -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shape in shapes:
            epilogue_line(shape, threads, repeats)
    # the note in docs: torch.sqrt is not correctly rounded on this CPU build
    x = torch.rand(1_000_000) * 10
    print(f"torch_sqrt_not_rounded_fraction = {(torch.sqrt(x) != sqrt_rn(x)).double().mean().item():.3f}")


def mixed_line(threads: int, repeats: int) -> None:
    a = torch.randn(1024, 1024)
    s = PhiloxStream(0, "cpu", "mixed")
    out = torch.empty(1_000_000)

    def both() -> None:
        torch.mm(a, a)
        s.normal_(out)
    t = race({"mm": lambda: torch.mm(a, a), "normal": lambda: s.normal_(out), "both": both}, repeats)
    print(f"mixed_matmul_normal_ratio_t{threads} = {t['both'] / (t['mm'] + t['normal']):.3f}")


def mixed(repeats: int) -> None:
    for threads in (1, 2):
        torch.set_num_threads(threads)
        mixed_line(threads, repeats)


_FIRST_USE = """
import time, torch
t0 = time.perf_counter()
from neurosim.random_streams import PhiloxStream, noisy_adc_sum
s = PhiloxStream(0, "cpu", "x")
for n in (10, 100_000):
    s.normal(n); s.uniform(n); s.words(n)
noisy_adc_sum(torch.zeros(2, 64, 64), torch.ones(2, 64, 64), 1.0, 7.0, 64, s)
noisy_adc_sum(torch.zeros(2, 64, 64), torch.ones(2, 64, 64).bfloat16(), 1.0, 7.0, 64, s)
print(time.perf_counter() - t0)
"""


def compile_times() -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold", "warm"):
            r = subprocess.run([sys.executable, "-c", _FIRST_USE], env=env, capture_output=True, text=True,
                               check=True)
            print(f"compile_{label}_s = {float(r.stdout.strip().splitlines()[-1]):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke test)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    repeats = 3 if args.quick else args.repeats
    sizes = [100_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    shapes = [(3, 64, 256)] if args.quick else [(3, 64, 256), (3, 1024, 1024), (4, 1024, 512)]
    print(f"# {os.cpu_count()} CPUs visible; torch {torch.__version__}")
    draws(sizes, repeats)
    epilogues(shapes, repeats)
    mixed(repeats)
    compile_times()


if __name__ == "__main__":
    main()
