"""Cost of Taylor and PWL neuron circuits against the exact torch functions, on one (256, 4096) tensor.

Prints one figure a line as ``name = value``:
- ``<f>_<mode>_fwd_ratio``: forward (no autograd graph) time / the exact torch function's forward time;
- ``<f>_<mode>_bwd_ratio``: backward time (``torch.autograd.grad`` of a recorded forward) / the exact
  function's autograd backward time. PWL here uses its own slope as derivative.
- ``<f>_<mode>_fwdbwd_ratio``: forward with autograd plus backward, against the same for the exact function
  (the custom units produce the derivative in the forward pass, so this is the fair total);
- ``pwl_derivative_bwd_ratio``: sigmoid PWL with the separate PWL fit of f' as BP derivative, backward time
  against autograd of the exact sigmoid (and ``..._fwdbwd_ratio`` for the total);
- ``peak_rss_mb``: the process's peak resident memory (resource.getrusage).
Where users feel these circuits, a hardware-BP epoch, ``benchmarks/bench_training.py`` prints
``bp_taylor_vs_exact`` and ``bp_pwl_vs_exact``.
Each time is the minimum over interleaved repetitions (the least disturbed run; shared machines are noisy).

    python benchmarks/bench_activation.py [--repeats 40] [--threads N] [--device cpu|cuda] [--epsilon 0.01]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from neurosim.activation import ActivationConfig, ActivationUnit, exact
from neurosim.backend import tune_allocator


def _clock(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _race(fns: dict[str, callable], repeats: int, device: torch.device) -> dict[str, float]:
    """Minimum time of each function, the functions interleaved so a disturbance hits all alike."""
    for fn in fns.values():
        fn()
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], _clock(fn, device))
    return best


def _timers(forward, x: torch.Tensor, g: torch.Tensor):
    """(forward without graph, backward only, forward with graph + backward) callables for ``forward``."""
    xr = x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            forward(x)

    recorded = {}

    def record():
        recorded["y"] = forward(xr)

    def bwd():
        torch.autograd.grad(recorded["y"], xr, g, retain_graph=True)

    def both():
        torch.autograd.grad(forward(xr), xr, g)

    return fwd, record, bwd, both


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as the neurosim command does: large temporaries are reused, not re-mapped
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--terms", type=int, default=4)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(256, 4096, generator=gen)).to(device)
    g = torch.randn(256, 4096, generator=gen).to(device)
    print(f"device = {device}")
    print(f"threads = {torch.get_num_threads()}")
    print(f"shape = {tuple(x.shape)}")
    print(f"taylor_terms = {args.terms}")
    print(f"pwl_epsilon = {args.epsilon}")

    cases = {}
    for fname in ("sigmoid", "tanh"):
        cases[f"{fname}_exact"] = lambda t, f=fname: exact(f, t)
        units = {
            "taylor": ActivationConfig(function=fname, mode="taylor", terms=args.terms),
            "pwl": ActivationConfig(function=fname, mode="pwl", epsilon=args.epsilon, derivative="slope"),
        }
        for mode, cfg in units.items():
            unit = ActivationUnit(cfg, x.shape[1], device=device)
            if mode == "pwl":
                print(f"{fname}_pwl_segments = {unit.info['segments']}")
            cases[f"{fname}_{mode}"] = unit
    fit = ActivationUnit(ActivationConfig(function="sigmoid", mode="pwl", epsilon=args.epsilon, derivative="fit"),
                         x.shape[1], device=device)
    print(f"sigmoid_pwl_derivative_segments = {fit.info['derivative_segments']}")
    cases["sigmoid_pwlfit"] = fit

    timers = {name: _timers(fn, x, g) for name, fn in cases.items()}
    fwd = _race({k: t[0] for k, t in timers.items()}, args.repeats, device)
    for t in timers.values():
        t[1]()
    bwd = _race({k: t[2] for k, t in timers.items()}, args.repeats, device)
    both = _race({k: t[3] for k, t in timers.items()}, args.repeats, device)

    for fname in ("sigmoid", "tanh"):
        ref = f"{fname}_exact"
        print(f"{fname}_exact_fwd_ms = {1e3 * fwd[ref]:.3f}")
        print(f"{fname}_exact_bwd_ms = {1e3 * bwd[ref]:.3f}")
        for mode in ("taylor", "pwl"):
            k = f"{fname}_{mode}"
            print(f"{k}_fwd_ratio = {fwd[k] / fwd[ref]:.2f}")
            print(f"{k}_bwd_ratio = {bwd[k] / bwd[ref]:.2f}")
            print(f"{k}_fwdbwd_ratio = {both[k] / both[ref]:.2f}")
    print(f"pwl_derivative_bwd_ratio = {bwd['sigmoid_pwlfit'] / bwd['sigmoid_exact']:.2f}")
    print(f"pwl_derivative_fwdbwd_ratio = {both['sigmoid_pwlfit'] / both['sigmoid_exact']:.2f}")
    print(f"peak_rss_mb = {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
