"""Cost of the exact wire-resistance solve and error of the fast approximation; one `name = value` a line.

Tile: G uniform in [1e-6, 1e-4] S, inputs uniform in [0, 0.2] V, r_row = r_col = r (ohm per cell pitch),
seed 0. Times are the median of several repeats, in milliseconds, on the CPU this runs on, with one torch
thread by default (SuperLU is single-threaded too; on a shared 2-core machine two OpenMP threads made the
approximation's times swing by 100x): `--threads N` to change.
  nodal_solve_ms_N      one read of one input vector from scratch: assembly, factorization, solve (r = 1 ohm)
  nodal_factor_ms_N     NodalSolver(G, r, r) alone (assembly + factorization)
  nodal_cached_ms_N     one input vector through an existing solver (two triangular solves)
  nodal_batch64_ms_N    one read of a batch of 64 from scratch (compare with approx_ms_N)
  nodal_unknowns_N, nodal_lu_nnz_N   size of the linear system and of its sparse factors
  approx_ms_N           approximate_read of a batch of 64, default settings, r = 1 ohm
  ideal_err_N_r         max |exact - Gᵀ·V| / max |Gᵀ·V|: how much the wires matter
  approx_err_N_r        max |approximate - exact| / max |Gᵀ·V| at default settings; approx_steps_N_r: CG steps
  approx2_err_N_r       the same with only two CG steps

Differential pairs wired as on a chip (`pair` section, `--pairs`): an N x N weight tile of pairs centred in the
window [1e-6, 1e-4] S, weights uniform in [-1, 1] (G± = g_mid ± w·span/4), every row at the full 0.2 V.
  pair_row_drop_{indep,shared}_N_r   largest row IR drop, (V − u at the row's far end)/V: each device in its own
                                     N x N tile (the model before 2026-12-01) and G⁺, G⁻ side by side on the rows
  pair_out_err_{indep,shared}_N_r    max |I⁺ − I⁻ − V·(G⁺ − G⁻)| / max |V·(G⁺ − G⁻)|: what the wires do to the output
  pair_approx_err_N_r                max |approximate − exact| / max |V·G| (physical columns), default settings
  perturbed_nodal_ms_N               NodalSolver.read_perturbed of every weight (P = N², batch 32), cached solver
  perturbed_approx_ms_N              approximate_read_perturbed of the same
  perturbed_approx_err_N_r           max |Δ_approx − Δ_exact| / max |Δ_exact| of those changes (Δ: output change)
  nodal_pair_factor_ms_N             NodalSolver of the pair tile (one R x 2N network), against
  nodal_two_factors_ms_N             two NodalSolvers of N x N (the independent tiles it replaces)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import numpy as np
import torch

from neurosim.backend import tune_allocator
from neurosim.wires import NodalSolver, _cg_solve, approximate_read, approximate_read_perturbed, nodal_read


def _cg_read(G, V, r_row, r_col, iterations, rtol):
    """Column currents and CG steps of one tile (the solver's iteration without chunking)."""
    x, steps = _cg_solve(G, V[:, :, None].expand(*V.shape, G.shape[1]), r_row, r_col, iterations, rtol)
    return (G * x).sum(1), steps


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(sizes=(32, 64, 128, 256), resistances=(0.1, 1.0, 10.0)) -> int:
    tune_allocator()  # as the neurosim command does: large temporaries are reused, not re-mapped
    rng = np.random.default_rng(0)
    print(f"torch_threads = {torch.get_num_threads()}")
    for N in sizes:
        G = rng.uniform(1e-6, 1e-4, (N, N))
        v1 = rng.uniform(0, 0.2, (1, N))
        Vb = rng.uniform(0, 0.2, (64, N))
        repeats = 5 if N <= 128 else 2
        nodal_read(G, v1, 1.0, 1.0)                              # warm-up
        one_shot = functools.partial(nodal_read, G, v1, 1.0, 1.0)
        print(f"nodal_solve_ms_{N} = {_median_ms(one_shot, repeats):.2f}")
        factor = functools.partial(NodalSolver, G, 1.0, 1.0)
        print(f"nodal_factor_ms_{N} = {_median_ms(factor, repeats):.2f}")
        solver = NodalSolver(G, 1.0, 1.0)
        cached = functools.partial(solver._solve, v1, False)
        print(f"nodal_cached_ms_{N} = {_median_ms(cached, 5 * repeats):.3f}")
        batch = functools.partial(nodal_read, G, Vb, 1.0, 1.0)
        print(f"nodal_batch64_ms_{N} = {_median_ms(batch, repeats):.2f}")
        print(f"nodal_unknowns_{N} = {solver.n_unknowns}")
        print(f"nodal_lu_nnz_{N} = {solver._lu.L.nnz + solver._lu.U.nnz}")
        Gt, Vt = torch.from_numpy(G), torch.from_numpy(Vb)
        approx = functools.partial(approximate_read, Gt, Vt, 1.0, 1.0)
        approx()
        print(f"approx_ms_{N} = {_median_ms(approx, repeats):.2f}")
        scale = np.abs(Vb @ G).max()
        for r in resistances:
            exact = NodalSolver(G, r, r).read(Vb)
            approx, steps = _cg_read(Gt, Vt, r, r, 100, 1e-6)
            rough, _ = _cg_read(Gt, Vt, r, r, 2, 0.0)
            print(f"ideal_err_{N}_{r:g} = {np.abs(exact - Vb @ G).max() / scale:.2e}")
            print(f"approx_err_{N}_{r:g} = {np.abs(approx.numpy() - exact).max() / scale:.2e}")
            print(f"approx_steps_{N}_{r:g} = {steps}")
            print(f"approx2_err_{N}_{r:g} = {np.abs(rough.numpy() - exact).max() / scale:.2e}")
        sys.stdout.flush()
    return 0


def pairs(sizes=(32, 64), resistances=(1.0, 50.0)) -> int:
    """Differential pairs: row IR drop and output error with shared rows against independent tiles; the
    approximation on the paired layout; perturbed reads (see the module docstring)."""
    rng = np.random.default_rng(1)
    g_min, g_max = 1e-6, 1e-4
    mid, span = 0.5 * (g_min + g_max), g_max - g_min
    for N in sizes:
        w = rng.uniform(-1, 1, (N, N))
        G = np.stack([mid + w * span / 4, mid - w * span / 4], -1)
        V = np.full((1, N), 0.2)
        ideal = V @ (G[..., 0] - G[..., 1])
        for r in resistances:
            shared = NodalSolver(G, r, r)
            plus, minus = NodalSolver(G[..., 0], r, r), NodalSolver(G[..., 1], r, r)
            u_sh, _ = shared.node_voltages(V)
            u_p, _ = plus.node_voltages(V)
            u_m, _ = minus.node_voltages(V)
            drop_ind = max(float((0.2 - u_p[0, :, -1]).max()), float((0.2 - u_m[0, :, -1]).max())) / 0.2
            print(f"pair_row_drop_indep_{N}_{r:g} = {drop_ind:.3e}")
            print(f"pair_row_drop_shared_{N}_{r:g} = {float((0.2 - u_sh[0, :, -1]).max()) / 0.2:.3e}")
            scale = np.abs(ideal).max()
            indep = plus.read(V) - minus.read(V)
            print(f"pair_out_err_indep_{N}_{r:g} = {np.abs(indep - ideal).max() / scale:.3e}")
            print(f"pair_out_err_shared_{N}_{r:g} = {np.abs(shared.read(V) - ideal).max() / scale:.3e}")
        Vb = rng.uniform(0, 0.2, (32, N))
        phys_scale = np.abs(Vb @ G.reshape(N, 2 * N)).max()
        for r in (0.1, 1.0, 10.0):
            exact = NodalSolver(G, r, r)
            err = np.abs(approximate_read(G, Vb, r, r) - exact.read(Vb)).max() / phys_scale
            print(f"pair_approx_err_{N}_{r:g} = {err:.2e}")
        factor = functools.partial(NodalSolver, G, 1.0, 1.0)
        two = functools.partial(lambda g: (NodalSolver(g[..., 0], 1.0, 1.0), NodalSolver(g[..., 1], 1.0, 1.0)), G)
        print(f"nodal_pair_factor_ms_{N} = {_median_ms(factor, 3):.1f}")
        print(f"nodal_two_factors_ms_{N} = {_median_ms(two, 3):.1f}")
        rows, cols = np.divmod(np.arange(N * N), N)
        delta = np.stack([np.full(N * N, 0.02 * span), np.full(N * N, -0.02 * span)], 1)
        solver = NodalSolver(G, 1.0, 1.0)
        base = solver.read(Vb)
        t0 = time.perf_counter()
        exact = solver.read_perturbed(Vb, rows, cols, delta) - base
        print(f"perturbed_nodal_ms_{N} = {1e3 * (time.perf_counter() - t0):.0f}")
        t0 = time.perf_counter()
        approx = approximate_read_perturbed(G, Vb, rows, cols, delta, 1.0, 1.0)
        print(f"perturbed_approx_ms_{N} = {1e3 * (time.perf_counter() - t0):.0f}")
        print(f"perturbed_approx_err_{N}_1 = {np.abs(approx - base - exact).max() / np.abs(exact).max():.2e}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--pairs", action="store_true", help="only the differential-pair figures (32 and 64)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raise SystemExit(pairs() if args.pairs else main(sizes=tuple(args.sizes)) or pairs())
