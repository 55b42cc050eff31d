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
from neurosim.wires import NodalSolver, _cg_read, approximate_read, nodal_read


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raise SystemExit(main(sizes=tuple(args.sizes)))
