"""Wire resistance in a crossbar read: the exact nodal solve (scipy sparse) and a fast torch approximation.

The circuit (see docs/wires.md): cell (i, j) of an R x C tile joins row node (i, j) and column node (i, j).
Row i is driven at its left end by an ideal source through one segment r_row; row nodes are chained by r_row.
Column j ends at the bottom in a virtual ground (a transimpedance amplifier held at 0 V) through one segment
r_col; column nodes are chained by r_col. The output is the current into each virtual ground; with zero wire
resistance it is exactly I = Gᵀ·V. The transposed read swaps the roles of the two peripheries (columns driven
at their bottom ends, rows sensed at their left ends) on the very same network, so one factorization serves
both directions, and by reciprocity the transposed read is exactly the transpose of the forward linear map.

How a weight is wired (docs/wires.md, "Layouts"): the logical columns of a tile sit on physical columns that
share the row wires. ``G`` of shape (R, C, 2) holds a differential pair per weight: G⁺ = G[..., 0] in physical
column 2j and G⁻ = G[..., 1] in column 2j+1 of one R x 2C network, and weight column j reads I[2j] − I[2j+1]
(the pair's currents subtracted before the ADC); the transposed read drives 2j at +V[j] and 2j+1 at −V[j].
``reference=g`` adds a column of cells at g as physical column C (the far end) and reads I[j] − I[C].
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from neurosim.config import ConfigError

ArrayLike = np.ndarray | torch.Tensor

__all__ = ["NodalSolver", "approximate_read", "approximate_read_perturbed", "approximate_read_transposed",
           "nodal_read", "read_perturbed"]


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


# --------------------------------------------------------------------------------------------- layouts
class _Layout:
    """Where the logical columns of a tile sit among the physical columns that share its row wires.

    'single': G (R, C) is the network. 'pair': G (R, C, 2), G⁺ in physical column 2j and G⁻ in 2j+1; the
    output of column j is I[2j] − I[2j+1] and the transposed read drives the two at ±V[j]. 'reference': G (R, C)
    plus a column of cells at ``reference`` siemens as physical column C; output I[j] − I[C], and the transposed
    read drives the reference column at −Σ V. In every case the transposed read is the adjoint of the forward
    one (the drive is the transpose of the output combination), so reciprocity carries over.
    """

    def __init__(self, shape: tuple[int, ...], reference: float | None):
        ref = None
        if reference is not None:
            try:
                ref = float(reference)
            except (TypeError, ValueError):
                raise ConfigError("reference", reference, "must be a conductance in siemens") from None
            if not np.isfinite(ref) or ref < 0:
                raise ConfigError("reference", reference, "must be a finite conductance >= 0 S")
        shape = tuple(shape)
        if len(shape) == 3 and shape[2] == 2 and ref is None:
            kind = "pair"
        elif len(shape) == 2:
            kind = "single" if ref is None else "reference"
        elif len(shape) == 3 and shape[2] == 2:
            raise ConfigError("reference", reference, "a differential pair (G of shape (R, C, 2)) has no "
                              "reference column")
        else:
            raise ConfigError("G", f"shape {shape}", "must be (rows, columns), or (rows, columns, 2) for "
                              "differential pairs")
        if shape[0] == 0 or shape[1] == 0:
            raise ConfigError("G", f"shape {shape}", "must have at least one row and one column")
        self.kind, self.reference = kind, ref
        self.rows, self.cols = shape[0], shape[1]
        self.cells = 2 if kind == "pair" else 1               # cells per weight
        self.phys_cols = {"pair": 2 * self.cols, "reference": self.cols + 1, "single": self.cols}[kind]

    def physical(self, G: ArrayLike) -> ArrayLike:
        """The network's conductances (..., R, physical columns) from G (..., R, C[, 2])."""
        if self.kind == "pair":
            return G.reshape(*G.shape[:-3], self.rows, self.phys_cols)
        if self.kind == "reference":
            if isinstance(G, torch.Tensor):
                return torch.cat([G, G.new_full((*G.shape[:-1], 1), self.reference)], -1)
            return np.concatenate([G, np.full((*G.shape[:-1], 1), self.reference)], -1)
        return G

    def combine(self, current: ArrayLike) -> ArrayLike:
        """Logical outputs (..., C) from the physical column currents (..., physical columns)."""
        if self.kind == "pair":
            return current[..., 0::2] - current[..., 1::2]
        if self.kind == "reference":
            return current[..., :-1] - current[..., -1:]
        return current

    def spread(self, v: ArrayLike) -> ArrayLike:
        """Physical column drive (..., physical columns) of a transposed read of logical inputs v (..., C): the
        transpose of ``combine``."""
        if self.kind == "pair":
            if isinstance(v, torch.Tensor):
                return torch.stack((v, -v), -1).reshape(*v.shape[:-1], self.phys_cols)
            return np.stack((v, -v), -1).reshape(*v.shape[:-1], self.phys_cols)
        if self.kind == "reference":
            if isinstance(v, torch.Tensor):
                return torch.cat([v, -v.sum(-1, keepdim=True)], -1)
            return np.concatenate([v, -v.sum(-1, keepdims=True)], -1)
        return v

    def to_G_shape(self, g_phys: np.ndarray) -> np.ndarray:
        """A per-cell quantity of the network (R, physical columns) in the shape of G (the reference column
        is not part of G)."""
        if self.kind == "pair":
            return g_phys.reshape(self.rows, self.cols, 2)
        return g_phys[:, : self.cols] if self.kind == "reference" else g_phys

    def perturbations(self, rows: ArrayLike, cols: ArrayLike, delta: ArrayLike, g_phys: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical cells (P, k) and conductance changes (P, k) of P perturbations of weights (rows, cols), k
        cells a weight; refused unless indices are in range and every changed conductance stays >= 0."""
        r, c = _indices(rows), _indices(cols)
        for name, idx, n in (("rows", r, self.rows), ("cols", c, self.cols)):
            if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n):
                raise ConfigError(name, "entries outside the tile", f"must be integer indices in [0, {n})")
        if r.size != c.size:
            raise ConfigError("cols", f"{c.size} entries", f"must match rows ({r.size} entries)")
        r, c = r.astype(np.int64), c.astype(np.int64)
        P, k = r.size, self.cells
        d = _float64(delta)
        if d.shape not in ((P, k),) + (((P,),) if k == 1 else ()):
            want = f"({P}, 2): (ΔG⁺, ΔG⁻) of each pair" if k == 2 else f"({P},)"
            raise ConfigError("delta", f"shape {d.shape}", f"must be {want}")
        d = d.reshape(P, k)
        if k == 2:
            pr, pc = np.repeat(r[:, None], 2, axis=1), 2 * c[:, None] + np.arange(2)
        else:
            pr, pc = r[:, None], c[:, None]
        if not np.all(np.isfinite(d)):
            raise ConfigError("delta", "non-finite entries", "conductance changes must be finite")
        if P and np.any(g_phys[pr, pc] + d < 0):
            raise ConfigError("delta", float((g_phys[pr, pc] + d).min()),
                              "would make a conductance negative (G + delta must be >= 0 S)")
        return pr, pc, d


def _indices(x: ArrayLike) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x).reshape(-1)


def _conductances(G: ArrayLike, reference: float | None) -> tuple[np.ndarray, _Layout]:
    """G as a float64 numpy array and its layout, refused unless finite and non-negative."""
    g = _float64(G)
    layout = _Layout(g.shape, reference)
    if not np.all(np.isfinite(g)):
        raise ConfigError("G", "non-finite entries", "conductances must be finite")
    if np.any(g < 0):
        raise ConfigError("G", float(g.min()), "conductances must be >= 0 S")
    return g, layout


def _woodbury(c: ArrayLike, Z: ArrayLike, d: ArrayLike) -> ArrayLike:
    """Currents α (P, B, k) through the conductances d (P, k) added in parallel to k cells of a network, from the
    base voltages c (P, B, k) across those cells and the transfer resistances Z (P, k, k) between them (the
    voltage across cell a per unit current driven through cell b, every port held): α = (1 + Δ·Z)⁻¹·Δ·c,
    Δ = diag(d), the Sherman–Morrison–Woodbury identity. numpy or torch alike."""
    dc = d[:, None, :] * c
    if d.shape[1] == 1:
        return dc / (1 + d[:, None, :] * Z[:, None, :, 0])
    # k = 2 (a pair), written out: 1 + Δ·Z is a 2 x 2 matrix per perturbation, its determinant > 0 (it is
    # det L'/det L of two positive definite Laplacians).
    m00, m01 = 1 + d[:, 0] * Z[:, 0, 0], d[:, 0] * Z[:, 0, 1]
    m10, m11 = d[:, 1] * Z[:, 1, 0], 1 + d[:, 1] * Z[:, 1, 1]
    det = (m00 * m11 - m01 * m10)[:, None]
    r0, r1 = dc[..., 0], dc[..., 1]
    a0 = (m11[:, None] * r0 - m01[:, None] * r1) / det
    a1 = (m00[:, None] * r1 - m10[:, None] * r0) / det
    return (torch.stack if isinstance(dc, torch.Tensor) else np.stack)((a0, a1), -1)


# ------------------------------------------------------------------------------------------ exact solve
class NodalSolver:
    """Exact read of one tile with wire resistance; factorization cached for a given G.

    ``G`` is (R, C) single devices, (R, C, 2) differential pairs sharing the row wires, or (R, C) with a
    ``reference`` column (see the module docstring). Unknowns are the node voltages that are not pinned:
    2·R·C' with both resistances > 0 (C' physical columns), R·C' when one is 0 (those wires are equipotential
    and merge with their driver or virtual ground), none when both are 0. The reduced Laplacian is symmetric
    positive definite; it is factorized once by SuperLU and every read, in either direction, is a pair of
    triangular solves with the whole batch as right-hand sides.

    Torch inputs give torch outputs (device and dtype of ``V``), differentiable with respect to ``V`` and to
    ``G`` when ``G`` was a tensor that requires grad: by reciprocity the gradient of a read is the read in the
    other direction, and dℓ/dG[i, j] = -Σ_batch ΔV_read[i, j]·ΔV_adjoint[i, j] (voltages across the cell).
    """

    def __init__(self, G: ArrayLike, r_row: float, r_col: float, reference: float | None = None):
        self.r_row = _resistance(r_row, "r_row")
        self.r_col = _resistance(r_col, "r_col")
        g, self.layout = _conductances(G, reference)
        self._G_tensor = G if isinstance(G, torch.Tensor) else None
        self.shape = (self.layout.rows, self.layout.cols)
        self._g = g = self.layout.physical(g)
        self.physical_shape = R, C = g.shape
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
        """Sensed outputs (B, C) or (B, R) for logical drive voltages v; with ``nodes``, also the row-node and
        column-node voltages (B, R, physical columns) each."""
        R, C = self.physical_shape
        B = v.shape[0]
        xp = np.zeros((R + C, B))
        if transposed:
            xp[R:] = self.layout.spread(v).T
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
        sensed = -injected[:R].T if transposed else self.layout.combine(-injected[R:].T)
        if not nodes:
            return sensed
        full = np.concatenate([xf, xp])
        u = full[self._u.ravel()].T.reshape(B, R, C)
        w = full[self._w.ravel()].T.reshape(B, R, C)
        return sensed, u, w

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

    def _changes(self, v: np.ndarray, pr: np.ndarray, pc: np.ndarray, pd: np.ndarray) -> np.ndarray:
        """Change of the forward outputs (P, B, C) when perturbation p adds pd[p, l] siemens to physical cell
        (pr[p, l], pc[p, l]), l < k: a rank-k update of the factorized network (docs/wires.md, "Perturbed
        reads"), one triangular solve per changed cell and none per input."""
        R, C = self.physical_shape
        P, k = pr.shape
        _, u, w = self._solve(v, False, nodes=True)
        c = (u - w)[:, pr, pc].transpose(1, 0, 2)                    # (P, B, k): base voltage across each cell
        Z = np.zeros((P, k, k))                                       # transfer resistances between the cells
        T = np.zeros((P, k, C))                                       # column currents per unit cell current
        if self.r_col == 0:   # the cell's column node is its virtual ground: its own current is sensed directly
            T[np.arange(P)[:, None], np.arange(k)[None, :], pc] = 1.0
        nf = self.n_unknowns
        if nf and P:
            ui, wi = self._u[pr, pc], self._w[pr, pc]                 # node numbers; >= nf: a port
            L_col = self._L_pf[R:]
            chunk = max(1, (1 << 21) // (nf * k))                     # right-hand sides of at most 16 MB
            for s in range(0, P, chunk):
                sl = slice(s, min(P, s + chunk))
                m = sl.stop - sl.start
                uu, ww = ui[sl], wi[sl]
                fu, fw = uu < nf, ww < nf
                D = np.zeros((nf, m * k))                             # d = e_row_node − e_column_node per cell
                rhs_col = np.arange(m * k).reshape(m, k)
                D[uu[fu], rhs_col[fu]] = 1.0
                D[ww[fw], rhs_col[fw]] = -1.0
                with _one_blas_thread():
                    H = self._lu.solve(np.asfortranarray(D)).reshape(nf, m, k)
                Hp = H.transpose(1, 0, 2)                             # (m, nf, k)
                at_u = np.take_along_axis(Hp, np.where(fu, uu, 0)[:, :, None], axis=1)
                at_w = np.take_along_axis(Hp, np.where(fw, ww, 0)[:, :, None], axis=1)
                Z[sl] = at_u * fu[:, :, None] - at_w * fw[:, :, None]
                T[sl] += (L_col @ H.reshape(nf, m * k)).reshape(C, m, k).transpose(1, 2, 0)
        return self.layout.combine(np.matmul(_woodbury(c, Z, pd), T))

    # -------------------------------------------------------------------------------------- API
    def read(self, V: ArrayLike) -> ArrayLike:
        """Column currents (B, C) in amperes for row voltages V (B, R); numpy in, numpy out."""
        return self._read(V, transposed=False)

    def read_transposed(self, V: ArrayLike) -> ArrayLike:
        """Row currents (B, R) for voltages V (B, C) applied at the columns' bottom ends (a pair: ±V[j] on its
        two columns), rows sensed at their left ends by virtual grounds: BP's transposed read."""
        return self._read(V, transposed=True)

    def read_perturbed(self, V: ArrayLike, rows: ArrayLike, cols: ArrayLike, delta: ArrayLike) -> ArrayLike:
        """Column currents (P, B, C) of P reads of V (B, R), read p with the conductance of weight
        (rows[p], cols[p]) changed by delta[p] siemens (a pair: delta (P, 2), the changes of G⁺ and G⁻) and
        every other cell as in G: what P separate solves of perturbed tiles give, exactly (Sherman–Morrison–
        Woodbury on the cached factorization: one triangular solve per changed cell, shared by the batch)."""
        v, single = _voltages(V, self.shape[0], "row")
        pr, pc, pd = self.layout.perturbations(rows, cols, delta, self._g)
        out = self._apply(v, False)[None] + self._changes(v, pr, pc, pd)
        if single:
            out = out[:, 0]
        return torch.from_numpy(out).to(V.device, V.dtype) if isinstance(V, torch.Tensor) else out

    def node_voltages(self, V: ArrayLike, transposed: bool = False) -> tuple[ArrayLike, ArrayLike]:
        """Row-node and column-node voltages (B, R, physical columns) each during a read (or a transposed read):
        the IR-drop map, and the voltage u - w that each cell actually sees. Not differentiable."""
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
            grad = ctx.solver.layout.to_G_shape(-(ctx.across * (u - w)).sum(0))
            grad_G = torch.from_numpy(np.ascontiguousarray(grad)).to(*ctx.g_meta)
        else:
            back = ctx.solver._apply(gy, not ctx.transposed)
        if ctx.needs_input_grad[0]:
            grad_V = torch.from_numpy(back).to(*ctx.v_meta)
        return grad_V, grad_G, None, None


def nodal_read(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float, reference: float | None = None
               ) -> ArrayLike:
    """One-shot exact read (B, C): builds and factorizes the network, then solves for the batch."""
    return NodalSolver(G, r_row, r_col, reference).read(V)


# ------------------------------------------------------------------------------------ approximation
def _wire_drop(J: torch.Tensor, r_row: float, r_col: float) -> torch.Tensor:
    """K·J: the IR drop across each cell's two wires caused by cell currents J (..., R, C).

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


def _cg_solve(G: torch.Tensor, rhs: torch.Tensor, r_row: float, r_col: float, iterations: int, rtol: float
              ) -> tuple[torch.Tensor, int]:
    """Cell voltages x (..., R, C) with x + K·(G ⊙ x) = rhs, and the CG steps taken; G (..., R, C) broadcasts
    against rhs (a read: rhs is each row's drive voltage on all its cells).

    CG on (1 + s K s)·y = s ⊙ rhs with s = √G, run on x = y / s so that no square root appears (its derivative
    is infinite at G = 0): every inner product carries the weight G instead. Each right-hand side stops on its
    own once its G-weighted relative residual is below ``rtol``. Where G = 0 the iterate is not determined by
    the weighted system (nothing flows there); ``_dead_cells`` completes it when a caller needs it.
    """
    R, C = G.shape[-2:]
    if r_row == 0 and r_col == 0:
        return rhs.clone(), 0
    path = r_row * torch.arange(1, C + 1, dtype=G.dtype, device=G.device)[None, :] \
        + r_col * torch.arange(R, 0, -1, dtype=G.dtype, device=G.device)[:, None]
    diag = 1 + G * path                                   # diagonal of 1 + s K s: the Jacobi preconditioner

    def dot(a, b):                                        # per right-hand side, sum over the cells
        return (a * b).sum((-2, -1), keepdim=True)

    x = rhs / diag                                        # the local guess: each cell sees its own wire path
    res = rhs - x - _wire_drop(G * x, r_row, r_col)
    z = res / diag
    p = z
    Gres = G * res
    rz, rr = dot(Gres, z), dot(Gres, res)                 # inner products weighted by G
    tol2 = rtol**2 * dot(G * rhs, rhs)
    steps = 0
    for _ in range(iterations):
        active = rr > tol2                                # a converged right-hand side is left as it is
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
    return x, steps


def _dead_cells(x: torch.Tensor, G: torch.Tensor, rhs: torch.Tensor, r_row: float, r_col: float) -> torch.Tensor:
    """x with its entries at cells of G = 0 set from their own equation x = rhs − K·(G ⊙ x), which involves the
    live cells only (the weighted CG leaves dead cells undetermined; a perturbed read needs their voltage)."""
    if (r_row == 0 and r_col == 0) or not bool((G == 0).any()):
        return x
    return torch.where(G > 0, x, rhs - _wire_drop(G * x, r_row, r_col))


# On CPU, right-hand sides are solved in groups whose (·, R, C) temporaries hold about 2^17 numbers (1 MB in
# float64): they stay in cache, and none is big enough to be mapped afresh from the OS at every operation
# (glibc's mmap threshold), which made a 64 x 256 x 256 read ten times slower. Right-hand sides converge
# independently, so the grouping changes no result. Elsewhere, groups of 2^23 numbers bound the memory.
_CPU_GROUP, _DEVICE_GROUP = 1 << 17, 1 << 23


def _approx_currents(G: torch.Tensor, V: torch.Tensor, r_row: float, r_col: float, iterations: int,
                     rtol: float) -> torch.Tensor:
    """Physical column currents (T, B, C) of T networks G (T, R, C) driven by row voltages V (T, B, R)."""
    T, R, C = G.shape
    B = V.shape[1]
    budget = _CPU_GROUP if V.device.type == "cpu" else _DEVICE_GROUP
    per = R * C

    def solve(g, v):
        g = g[:, None]
        x, _ = _cg_solve(g, v[..., None].expand(*v.shape, C), r_row, r_col, iterations, rtol)
        return (g * x).sum(-2)

    if T * B * per <= budget:
        return solve(G, V)
    tiles = max(1, budget // (B * per))
    outs = []
    for t in range(0, T, tiles):
        g, v = G[t:t + tiles], V[t:t + tiles]
        if B * per <= budget:
            outs.append(solve(g, v))
        else:
            outs.append(torch.cat([solve(g, part) for part in v.split(max(1, budget // per), dim=1)], dim=1))
    return torch.cat(outs)


def _approx_tiles(G: torch.Tensor, V: torch.Tensor, r_row: float, r_col: float, layout: _Layout,
                  transposed: bool = False, iterations: int = 100, rtol: float = 1e-6) -> torch.Tensor:
    """Logical outputs of T tiles at once: G (T, R, C[, 2]) in ``layout``, V (T, B, R) → (T, B, C), or for the
    transposed read V (T, B, C) → (T, B, R), which is the forward read of the mirrored network (Gᵀ flipped on
    both axes, r_row and r_col exchanged, inputs and outputs in reverse order)."""
    Gp = layout.physical(G)
    if not transposed:
        return layout.combine(_approx_currents(Gp, V, r_row, r_col, iterations, rtol))
    mirrored = Gp.transpose(-2, -1).flip(-2, -1)
    out = _approx_currents(mirrored, layout.spread(V).flip(-1), r_col, r_row, iterations, rtol)
    return out.flip(-1)


def _approx_args(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float, reference: float | None, transposed: bool,
                 iterations: int, rtol: float):
    """Checked arguments of the approximate reads: (G tensor, V as (B, n) tensor, layout, r_row, r_col,
    whether V was numpy, whether V was one vector)."""
    r_row, r_col = _resistance(r_row, "r_row"), _resistance(r_col, "r_col")
    if not isinstance(iterations, int) or iterations < 0:
        raise ConfigError("iterations", iterations, "must be an integer >= 0")
    if not (rtol >= 0):
        raise ConfigError("rtol", rtol, "must be >= 0")
    as_numpy = not isinstance(V, torch.Tensor)
    Vt = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float64)) if as_numpy else V
    Gt = G if isinstance(G, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(G, dtype=np.float64))
    layout = _Layout(tuple(Gt.shape), reference)
    n, what = (layout.cols, "column") if transposed else (layout.rows, "row")
    single = Vt.ndim == 1
    Vb = Vt[None, :] if single else Vt
    if Vb.ndim != 2 or Vb.shape[1] != n:
        raise ConfigError("V", f"shape {tuple(Vt.shape)}", f"must be (batch, {n}): one voltage per {what}")
    Gt = Gt.to(Vb.device, Vb.dtype)
    if not bool(torch.isfinite(Gt).all()):
        raise ConfigError("G", "non-finite entries", "conductances must be finite")
    if bool((Gt < 0).any()):
        raise ConfigError("G", float(Gt.min()), "conductances must be >= 0 S")
    if not bool(torch.isfinite(Vb).all()):
        raise ConfigError("V", "non-finite entries", "voltages must be finite")
    return Gt, Vb, layout, r_row, r_col, as_numpy, single


def approximate_read(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float, *, reference: float | None = None,
                     iterations: int = 100, rtol: float = 1e-6) -> ArrayLike:
    """Column currents (B, C) with wire resistance by truncated preconditioned conjugate gradients.

    The network is solved for the cell currents J alone: J = G ⊙ (V - K·J), where K·J (``_wire_drop``) is
    two cumulative sums per wire, O(B·R·C). Scaled by s = √G it becomes (1 + s K s)·y = s ⊙ V, symmetric
    positive definite with eigenvalues >= 1, which Jacobi-preconditioned conjugate gradients solve from the
    local guess J = G·V / (1 + G·r_path). ``G`` and ``reference`` as for ``NodalSolver`` (a pair's two columns
    share the row wires in the solve).
    It stops after ``iterations`` steps or when every input's relative residual is below ``rtol``; the output
    is Σ_i J[i, j]. Batched, on the device and dtype of V, and differentiable by autograd. Its error against
    the exact solve is tabulated in docs/wires.md.
    """
    Gt, Vb, layout, r_row, r_col, as_numpy, single = _approx_args(G, V, r_row, r_col, reference, False,
                                                                  iterations, rtol)
    out = _approx_tiles(Gt[None], Vb[None], r_row, r_col, layout, False, iterations, rtol)[0]
    out = out[0] if single else out
    return out.detach().numpy() if as_numpy else out


def approximate_read_transposed(G: ArrayLike, V: ArrayLike, r_row: float, r_col: float, *,
                                reference: float | None = None, iterations: int = 100,
                                rtol: float = 1e-6) -> ArrayLike:
    """Row currents (B, R) for the transposed read (columns driven at the bottom, a pair's two at ±V), by
    ``approximate_read`` on the mirrored network: Gᵀ flipped on both axes, r_row and r_col exchanged, inputs
    and outputs in reverse order."""
    Gt, Vb, layout, r_row, r_col, as_numpy, single = _approx_args(G, V, r_row, r_col, reference, True,
                                                                  iterations, rtol)
    out = _approx_tiles(Gt[None], Vb[None], r_row, r_col, layout, True, iterations, rtol)[0]
    out = out[0] if single else out
    return out.detach().numpy() if as_numpy else out


def _approx_changes(Gp: torch.Tensor, v: torch.Tensor, pr: torch.Tensor, pc: torch.Tensor, pd: torch.Tensor,
                    r_row: float, r_col: float, layout: _Layout, iterations: int, rtol: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base outputs (B, C), changes (P, B, C)) of the approximate model for the network Gp (R, C'), row
    voltages v (B, R) and perturbations adding pd[p, l] to physical cell (pr[p, l], pc[p, l]).

    The same rank-k update as the exact solve, in the cell-voltage form of the approximation: with
    A = 1 + K·G, a conductance d added at cell c makes A' = A + d·(K e_c) e_cᵀ, so the perturbed solution needs
    y = A⁻¹·K e_c, one CG solve per changed cell (batched over cells, not over inputs): Z[a, b] = y_b[c_a] and
    a unit current through cell b changes the column currents by e_col(b) − Σ_rows G ⊙ y_b.
    """
    R, C = Gp.shape
    P, k = pr.shape
    B = v.shape[0]
    budget = _CPU_GROUP if v.device.type == "cpu" else _DEVICE_GROUP
    group = max(1, budget // (R * C))
    rhs0 = v[:, :, None].expand(B, R, C)
    # The change is proportional to the base voltage across the perturbed cell, whose own error at a G-weighted
    # residual of rtol is up to ~100x rtol (measured): the base (B right-hand sides, few next to P·k) is solved
    # 1000x tighter, down to 10 ulp of the dtype.
    tight = min(rtol, max(rtol * 1e-3, 10 * torch.finfo(v.dtype).eps))
    x0 = torch.cat([_cg_solve(Gp, part, r_row, r_col, iterations, tight)[0] for part in rhs0.split(group)])
    x0 = _dead_cells(x0, Gp, rhs0, r_row, r_col)
    base = layout.combine((Gp * x0).sum(-2))
    c = x0[:, pr, pc].permute(1, 0, 2)                                    # (P, B, k)
    Z = torch.empty((P, k, k), dtype=v.dtype, device=v.device)
    T = torch.empty((P, k, C), dtype=v.dtype, device=v.device)
    ar = torch.arange(P * k, device=v.device)
    rows_f, cols_f = pr.reshape(-1), pc.reshape(-1)
    per = max(1, group // k) * k                                          # whole perturbations per group
    for s in range(0, P * k, per):
        n = min(P * k, s + per) - s
        unit = torch.zeros((n, R, C), dtype=v.dtype, device=v.device)
        unit[ar[:n], rows_f[s:s + n], cols_f[s:s + n]] = 1.0          # K·unit: drops of a unit cell current
        rhs = _wire_drop(unit, r_row, r_col) if r_row or r_col else torch.zeros_like(unit)
        y, _ = _cg_solve(Gp, rhs, r_row, r_col, iterations, rtol)
        y = _dead_cells(y, Gp, rhs, r_row, r_col).reshape(n // k, k, R, C)
        q = torch.arange(n // k, device=v.device)
        p0 = s // k
        Z[p0:p0 + n // k] = y[q[:, None, None], torch.arange(k, device=v.device)[None, None, :],
                              pr[p0:p0 + n // k][:, :, None], pc[p0:p0 + n // k][:, :, None]]
        T[p0:p0 + n // k] = unit.reshape(n // k, k, R, C).sum(-2) - (Gp * y).sum(-2)
    return base, layout.combine(torch.matmul(_woodbury(c, Z, pd), T))


def approximate_read_perturbed(G: ArrayLike, V: ArrayLike, rows: ArrayLike, cols: ArrayLike, delta: ArrayLike,
                               r_row: float, r_col: float, *, reference: float | None = None,
                               iterations: int = 100, rtol: float = 1e-6) -> ArrayLike:
    """``NodalSolver.read_perturbed`` in the approximate model: (P, B, C) column currents of P reads of V
    (B, R), read p with weight (rows[p], cols[p]) changed by delta[p] (a pair: (P, 2)). The base read is
    ``approximate_read``; each change is the exact rank-k update of the same linear model, with one CG solve
    per changed cell (its own ``rtol``), so a change is resolved to rtol of itself, not of the whole output."""
    Gt, Vb, layout, r_row, r_col, as_numpy, single = _approx_args(G, V, r_row, r_col, reference, False,
                                                                  iterations, rtol)
    Gp = layout.physical(Gt)
    pr, pc, pd = layout.perturbations(rows, cols, delta, _float64(Gp))
    dev = Vb.device
    base, change = _approx_changes(Gp, Vb, torch.from_numpy(pr).to(dev), torch.from_numpy(pc).to(dev),
                                   torch.from_numpy(pd).to(dev, Vb.dtype), r_row, r_col, layout, iterations, rtol)
    out = base[None] + change
    out = out[:, 0] if single else out
    return out.detach().numpy() if as_numpy else out


def read_perturbed(G: ArrayLike, V: ArrayLike, rows: ArrayLike, cols: ArrayLike, delta: ArrayLike,
                   r_row: float, r_col: float, *, method: str = "nodal", reference: float | None = None,
                   **kwargs) -> ArrayLike:
    """(P, B, C): P reads of one tile, each with one weight's cell(s) changed (see ``NodalSolver.read_perturbed``);
    ``method`` 'nodal' (exact) or 'approximate' (``approximate_read_perturbed``, which takes ``iterations`` and
    ``rtol``)."""
    if method == "nodal":
        return NodalSolver(G, r_row, r_col, reference).read_perturbed(V, rows, cols, delta)
    if method == "approximate":
        return approximate_read_perturbed(G, V, rows, cols, delta, r_row, r_col, reference=reference, **kwargs)
    raise ConfigError("method", method, "must be 'nodal' or 'approximate'")
