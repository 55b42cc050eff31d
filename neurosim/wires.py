"""Wire resistance in a crossbar read: the exact nodal solve (scipy sparse) and a fast torch approximation.

The circuit (see docs/wires.md): cell (i, j) of an R x C tile joins row node (i, j) and column node (i, j).
Row i is driven at its left end by an ideal source through one segment r_row; row nodes are chained by r_row.
Column j ends at the bottom in a virtual ground (a transimpedance amplifier held at 0 V) through one segment
r_col; column nodes are chained by r_col. The output is the current into each virtual ground; with zero wire
resistance it is exactly I = Gᵀ·V. The transposed read swaps the roles of the two peripheries (columns driven
at their bottom ends, rows sensed at their left ends) on the very same network, so one factorization serves
both directions, and by reciprocity the transposed read is exactly the transpose of the forward linear map.
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from neurosim.config import ConfigError

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["NodalSolver", "approximate_read", "approximate_read_transposed", "nodal_read"]


# --------------------------------------------------------------------------------------- BLAS threads
_blas_controller = None


def _one_blas_thread():
    """A context holding OpenBLAS to one thread: SuperLU calls it on tiny blocks, and with more threads a
    64-column solve ran up to 10x slower (threads spinning on a shared 2-core machine)."""
    global _blas_controller
    try:
        if _blas_controller is None:
            import threadpoolctl  # shipped with scikit-learn, a dependency

            _blas_controller = threadpoolctl.ThreadpoolController()
        return _blas_controller.limit(limits=1, user_api="blas")
    except ImportError:
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- checks
def _resistance(value: float, name: str) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise ConfigError(name, value, "must be a number of ohms") from None
    if not np.isfinite(r) or r < 0:
        raise ConfigError(name, value, "must be a finite resistance >= 0 ohm")
    return r


def _float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _conductances(G: ArrayLike) -> np.ndarray:
    """G as a float64 numpy array, refused unless 2-D, finite and non-negative."""
    g = _float64(G)
    if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
        raise ConfigError("G", f"shape {tuple(g.shape)}", "must be a non-empty 2-D (rows, columns) array")
    if not np.all(np.isfinite(g)):
        raise ConfigError("G", "non-finite entries", "conductances must be finite")
    if np.any(g < 0):
        raise ConfigError("G", float(g.min()), "conductances must be >= 0 S")
    return g


def _voltages(V: ArrayLike, n: int, what: str) -> tuple[np.ndarray, bool]:
    """V as a float64 (B, n) numpy array, and whether the caller passed a single 1-D vector."""
    v = _float64(V)
    single = v.ndim == 1
    if single:
        v = v[None, :]
    if v.ndim != 2 or v.shape[1] != n:
        raise ConfigError("V", f"shape {tuple(np.shape(V))}", f"must be (batch, {n}): one voltage per {what}")
    if not np.all(np.isfinite(v)):
        raise ConfigError("V", "non-finite entries", "voltages must be finite")
    return v, single


# ------------------------------------------------------------------------------------------ exact solve
class NodalSolver:
    """Exact read of one tile with wire resistance; factorization cached for a given G.

    Unknowns are the node voltages that are not pinned: 2·R·C with both resistances > 0, R·C when one is 0
    (those wires are equipotential and merge with their driver or virtual ground), none when both are 0.
    The reduced Laplacian is symmetric positive definite; it is factorized once by SuperLU and every read,
    in either direction, is a pair of triangular solves with the whole batch as right-hand sides.

    Torch inputs give torch outputs (device and dtype of ``V``), differentiable with respect to ``V`` and to
    ``G`` when ``G`` was a tensor that requires grad: by reciprocity the gradient of a read is the read in the
    other direction, and dℓ/dG[i, j] = -Σ_batch ΔV_read[i, j]·ΔV_adjoint[i, j] (voltages across the cell).
    """

    def __init__(self, G: ArrayLike, r_row: float, r_col: float):
        self.r_row = _resistance(r_row, "r_row")
        self.r_col = _resistance(r_col, "r_col")
        g = _conductances(G)
        self._G_tensor = G if isinstance(G, torch.Tensor) else None
        self.shape = R, C = g.shape
        n_row_free = R * C if self.r_row > 0 else 0
        n_col_free = R * C if self.r_col > 0 else 0
        nf = n_row_free + n_col_free
        self.n_unknowns = nf
        # Port indices follow the free nodes: row drivers nf..nf+R-1, column ends nf+R..nf+R+C-1.
        row_port = nf + np.arange(R)
        col_port = nf + R + np.arange(C)
        # Free nodes are numbered cell by cell (row node, then column node): SuperLU's minimum-degree
        # ordering breaks ties by this numbering, and this one gave 26 % less fill than all row nodes first.
        k = np.arange(R * C).reshape(R, C)
        step = 2 if nf == 2 * R * C else 1
        u = step * k if self.r_row > 0 else np.repeat(row_port[:, None], C, axis=1)
        w = step * k + (step - 1) if self.r_col > 0 else np.repeat(col_port[None, :], R, axis=0)
        self._u, self._w = u, w
        a, b, cond = [u.ravel()], [w.ravel()], [g.ravel()]           # the cells
        if self.r_row > 0:                                            # driver segment, then the row chain
            a += [row_port, u[:, :-1].ravel()]
            b += [u[:, 0], u[:, 1:].ravel()]
            cond.append(np.full(R + R * (C - 1), 1.0 / self.r_row))
        if self.r_col > 0:                                            # column chain, then the sensing segment
            a += [w[:-1, :].ravel(), w[-1, :]]
            b += [w[1:, :].ravel(), col_port]
            cond.append(np.full((R - 1) * C + C, 1.0 / self.r_col))
        a, b, cond = np.concatenate(a), np.concatenate(b), np.concatenate(cond)
        n = nf + R + C
        lap = sp.coo_matrix((np.concatenate([cond, cond, -cond, -cond]),
                             (np.concatenate([a, b, a, b]), np.concatenate([a, b, b, a]))),
                            shape=(n, n)).tocsc()
        self._L_fp = lap[:nf, nf:].tocsr()
        self._L_pf = lap[nf:, :nf].tocsr()
        self._L_pp = lap[nf:, nf:].toarray()
        self._lu = None
        self._M: np.ndarray | None = None
        if nf:
            # SPD matrix: a symmetric fill-reducing ordering and no pivoting keep the factors sparse.
            with _one_blas_thread():
                self._lu = spla.splu(lap[:nf, :nf].tocsc(), permc_spec="MMD_AT_PLUS_A",
                                     diag_pivot_thresh=0.0, options={"SymmetricMode": True})

    # -------------------------------------------------------------------------------- numpy core
    def _solve(self, v: np.ndarray, transposed: bool, nodes: bool = False):
        """Sensed currents (B, C) or (B, R) for drive voltages v; with ``nodes``, also the row-node and
        column-node voltages (B, R, C) each."""
        R, C = self.shape
        B = v.shape[0]
        xp = np.zeros((R + C, B))
        if transposed:
            xp[R:] = v.T
        else:
            xp[:R] = v.T
        if self._lu is not None:
            with _one_blas_thread():
                xf = self._lu.solve(np.asfortranarray(-(self._L_fp @ xp)))
            xf = xf.reshape(self.n_unknowns, B)
            injected = self._L_pf @ xf + self._L_pp @ xp
        else:
            xf = np.zeros((0, B))
            injected = self._L_pp @ xp
        sensed = -injected[:R] if transposed else -injected[R:]
        if not nodes:
            return sensed.T
        full = np.concatenate([xf, xp])
        u = full[self._u.ravel()].T.reshape(B, R, C)
        w = full[self._w.ravel()].T.reshape(B, R, C)
        return sensed.T, u, w

    def _apply(self, v: np.ndarray, transposed: bool) -> np.ndarray:
        """Sensed currents, through the cached effective matrix once a batch makes it worth building: it
        costs min(R, C) solves, no more than solving that batch directly, and every later read is a matmul."""
        if self._M is None and v.shape[0] >= min(self.shape):
            self._effective()
        if self._M is not None:
            return v @ self._M.T if transposed else v @ self._M
        return self._solve(v, transposed)

    def _effective(self) -> np.ndarray:
        if self._M is None:
            R, C = self.shape
            self._M = self._solve(np.eye(R), False) if R <= C else self._solve(np.eye(C), True).T
        return self._M

    def _read(self, V: ArrayLike, transposed: bool) -> ArrayLike:
        R, C = self.shape
        n, what = (C, "column") if transposed else (R, "row")
        v, single = _voltages(V, n, what)
        if not isinstance(V, torch.Tensor):
            out = self._apply(v, transposed)
            return out[0] if single else out
        G = self._G_tensor
        needs_grad = torch.is_grad_enabled() and (
            V.requires_grad or (G is not None and G.requires_grad))
        if needs_grad:
            Vb = V[None, :] if single else V
            Gt = G if G is not None else torch.empty(0)
            out = _NodalRead.apply(Vb, Gt, self, transposed)
        else:
            out = torch.from_numpy(self._apply(v, transposed)).to(V.device, V.dtype)
        return out[0] if single else out

    # -------------------------------------------------------------------------------------- API
    def read(self, V: ArrayLike) -> ArrayLike:
        """Column currents (B, C) in amperes for row voltages V (B, R); numpy in, numpy out."""
        return self._read(V, transposed=False)

    def read_transposed(self, V: ArrayLike) -> ArrayLike:
        """Row currents (B, R) for voltages V (B, C) applied at the columns' bottom ends, rows sensed at
        their left ends by virtual grounds: the reverse direction of BP's transposed read."""
        return self._read(V, transposed=True)

    def node_voltages(self, V: ArrayLike, transposed: bool = False) -> tuple[ArrayLike, ArrayLike]:
        """Row-node and column-node voltages (B, R, C) each during a read (or a transposed read): the IR-drop
        map, and the voltage u - w that each cell actually sees. Not differentiable."""
        R, C = self.shape
        v, single = _voltages(V, C if transposed else R, "column" if transposed else "row")
        _, u, w = self._solve(v, transposed, nodes=True)
        if single:
            u, w = u[0], w[0]
        if isinstance(V, torch.Tensor):
            return (torch.from_numpy(u).to(V.device, V.dtype), torch.from_numpy(w).to(V.device, V.dtype))
        return u, w

    def effective_conductance(self) -> np.ndarray:
        """The matrix M (R, C) with read(V) = V @ M exactly (and read_transposed(V) = V @ Mᵀ): the tile as
        its periphery sees it. min(R, C) solves, once; afterwards every read is a plain matrix product."""
        return self._effective().copy()


class _NodalRead(torch.autograd.Function):
    """Torch wrapper of one exact read, with the adjoint computed by the read in the other direction."""

    @staticmethod
    def forward(ctx, V, G, solver, transposed):
        v = V.detach().to("cpu", torch.float64).numpy()
        want_g = ctx.needs_input_grad[1]
        if want_g:
            out, u, w = solver._solve(v, transposed, nodes=True)
            ctx.across = u - w
        else:
            out = solver._apply(v, transposed)
        ctx.solver, ctx.transposed, ctx.want_g = solver, transposed, want_g
        ctx.v_meta, ctx.g_meta = (V.device, V.dtype), (G.device, G.dtype)
        return torch.from_numpy(out).to(V.device, V.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        gy = grad_out.detach().to("cpu", torch.float64).numpy()
        grad_V = grad_G = None
        if ctx.want_g:
            back, u, w = ctx.solver._solve(gy, not ctx.transposed, nodes=True)
            grad_G = torch.from_numpy(-(ctx.across * (u - w)).sum(0)).to(*ctx.g_meta)
        else:
            back = ctx.solver._apply(gy, not ctx.transposed)
        if ctx.needs_input_grad[0]:
            grad_V = torch.from_numpy(back).to(*ctx.v_meta)
        return grad_V, grad_G, None, None


def nodal_read(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float) -> ArrayLike:
    """One-shot exact read (B, C): builds and factorizes the network, then solves for the batch."""
    return NodalSolver(G, r_row, r_col).read(V)


# ------------------------------------------------------------------------------------ approximation
def _wire_drop(J: torch.Tensor, r_row: float, r_col: float) -> torch.Tensor:
    """K·J: the IR drop across each cell's two wires caused by cell currents J (B, R, C).

    Row i's segment k carries the currents of cells k..C-1 (total minus the running sum before k), so the
    drop at node j is r_row times the running sum of those; column j's segment below node i carries the
    currents of cells 0..i, and the node sits r_col times the sum of the segments below it above the
    virtual ground. In-place steps only touch fresh intermediates, so autograd stays exact.
    """
    out = None
    if r_row > 0:
        seg = J.sum(-1, keepdim=True) - J.cumsum(-1) + J
        out = seg.cumsum(-1).mul_(r_row)
    if r_col > 0:
        seg = J.cumsum(-2)
        above = seg.sum(-2, keepdim=True) - seg.cumsum(-2) + seg
        out = above.mul_(r_col) if out is None else out.add_(above, alpha=r_col)
    return out


def approximate_read(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float, *,
                     iterations: int = 100, rtol: float = 1e-6) -> ArrayLike:
    """Column currents (B, C) with wire resistance by truncated preconditioned conjugate gradients.

    The network is solved for the cell currents J alone: J = G ⊙ (V - K·J), where K·J (``_wire_drop``) is
    two cumulative sums per wire, O(B·R·C). Scaled by s = √G it becomes (1 + s K s)·y = s ⊙ V, symmetric
    positive definite with eigenvalues >= 1, which Jacobi-preconditioned conjugate gradients solve from the
    local guess J = G·V / (1 + G·r_path).
    It stops after ``iterations`` steps or when every input's relative residual is below ``rtol``; the output
    is Σ_i J[i, j]. Batched, on the device and dtype of V, and differentiable by autograd. Its error against
    the exact solve is tabulated in docs/wires.md.
    """
    r_row, r_col = _resistance(r_row, "r_row"), _resistance(r_col, "r_col")
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError("iterations", iterations, "must be an integer >= 0")
    if not (rtol >= 0):
        raise ConfigError("rtol", rtol, "must be >= 0")
    as_numpy = not isinstance(V, torch.Tensor)
    Vt = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float64)) if as_numpy else V
    Gt = G if isinstance(G, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(G, dtype=np.float64))
    if Gt.ndim != 2 or Gt.shape[0] == 0 or Gt.shape[1] == 0:
        raise ConfigError("G", f"shape {tuple(Gt.shape)}", "must be a non-empty 2-D (rows, columns) array")
    R = Gt.shape[0]
    single = Vt.ndim == 1
    Vb = Vt[None, :] if single else Vt
    if Vb.ndim != 2 or Vb.shape[1] != R:
        raise ConfigError("V", f"shape {tuple(Vt.shape)}", f"must be (batch, {R}): one voltage per row")
    Gt = Gt.to(Vb.device, Vb.dtype)
    if not bool(torch.isfinite(Gt).all()):
        raise ConfigError("G", "non-finite entries", "conductances must be finite")
    if bool((Gt < 0).any()):
        raise ConfigError("G", float(Gt.min()), "conductances must be >= 0 S")
    if not bool(torch.isfinite(Vb).all()):
        raise ConfigError("V", "non-finite entries", "voltages must be finite")
    # On CPU, batches are cut so that each (B, R, C) temporary holds about 2^17 numbers (1 MB in float64):
    # they stay in cache, and none is big enough to be mapped afresh from the OS at every operation (glibc's
    # mmap threshold), which made a 64 x 256 x 256 read ten times slower. Inputs converge independently, so
    # the cut changes no result.
    chunk = Vb.shape[0] if Vb.device.type != "cpu" else max(1, (1 << 17) // Gt.numel())
    out = torch.cat([_cg_read(Gt, part, r_row, r_col, iterations, rtol)[0] for part in Vb.split(chunk)])
    out = out[0] if single else out
    return out.detach().numpy() if as_numpy else out


def _cg_read(G, V, r_row, r_col, iterations, rtol):
    """(column currents, CG steps taken).

    CG on (1 + s K s)·y = s ⊙ V with s = √G, run on the cell voltages x = y / s so that no square root
    appears (its derivative is infinite at G = 0): every inner product carries the weight G instead.
    """
    R, C = G.shape
    if r_row == 0 and r_col == 0:
        return V @ G, 0
    path = r_row * torch.arange(1, C + 1, dtype=G.dtype, device=G.device)[None, :] \
        + r_col * torch.arange(R, 0, -1, dtype=G.dtype, device=G.device)[:, None]
    diag = 1 + G * path                                   # diagonal of 1 + s K s: the Jacobi preconditioner

    def dot(a, b):                                        # per-input sum over the cells
        return (a * b).sum((1, 2), keepdim=True)

    Vc = V[:, :, None].expand(-1, R, C)
    x = Vc / diag                                         # the local guess: each cell sees its own wire path
    res = Vc - x - _wire_drop(G * x, r_row, r_col)
    z = res / diag
    p = z
    Gres = G * res
    rz, rr = dot(Gres, z), dot(Gres, res)                 # inner products weighted by G
    tol2 = rtol**2 * dot(G * Vc, Vc)
    steps = 0
    for _ in range(iterations):
        active = rr > tol2                                # a converged input is left as it is
        if not bool(active.any()):
            break
        steps += 1
        Gp = G * p
        Ap = p + _wire_drop(Gp, r_row, r_col)             # (1 + K G) p
        pAp = dot(Gp, Ap)
        ok = active & (pAp > 0)
        alpha = torch.where(ok, rz / torch.where(ok, pAp, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x = x + alpha * p
        res = res - alpha * Ap
        z = res / diag
        Gres = G * res
        rz_new, rr = dot(Gres, z), dot(Gres, res)
        okz = active & (rz > 0)
        beta = torch.where(okz, rz_new / torch.where(okz, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return (G * x).sum(1), steps


def approximate_read_transposed(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float,
                                **kwargs) -> ArrayLike:
    """Row currents (B, R) for the transposed read, by ``approximate_read`` on the mirrored tile.

    Columns driven at the bottom and rows sensed at the left is the forward read of the tile Gᵀ flipped on
    both axes, with r_row and r_col exchanged and the inputs and outputs in reverse order.
    """
    Gm = G.T.flip(0).flip(1) if isinstance(G, torch.Tensor) else np.asarray(G).T[::-1, ::-1]
    Vm = V.flip(-1) if isinstance(V, torch.Tensor) else np.asarray(V)[..., ::-1]
    out = approximate_read(Gm, Vm, r_col, r_row, **kwargs)
    return out.flip(-1) if isinstance(out, torch.Tensor) else out[..., ::-1].copy()
