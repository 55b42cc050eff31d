"""Wire resistance: the exact nodal solve against hand-written networks and physical laws, and the torch
approximation against the exact solve."""

import numpy as np
import pytest
import torch

from neurosim.config import ConfigError
from neurosim.wires import (
    NodalSolver,
    approximate_read,
    approximate_read_perturbed,
    approximate_read_transposed,
    nodal_read,
    read_perturbed,
)


def _tile(R, C, seed=0, gmin=1e-6, gmax=1e-4):
    rng = np.random.default_rng(seed)
    return rng.uniform(gmin, gmax, (R, C))


def _hand_2x2(G, V, r_row, r_col, transposed=False):
    """The 8 node equations of a 2x2 tile, written out one by one (unknowns u00 u01 u10 u11 w00 w01 w10 w11).

    Forward: row i driven at u_i0 through r_row from V[i]; column j sensed at w_1j through r_col into 0 V.
    Transposed: column j driven at w_1j through r_col from V[j]; row i sensed at u_i0 through r_row into 0 V.
    """
    gr, gc = 1 / r_row, 1 / r_col
    (g00, g01), (g10, g11) = G
    A = np.array([
        # u00: gr(u00 - src0) + gr(u00 - u01) + g00(u00 - w00) = 0
        [2 * gr + g00, -gr, 0, 0, -g00, 0, 0, 0],
        # u01: gr(u01 - u00) + g01(u01 - w01) = 0
        [-gr, gr + g01, 0, 0, 0, -g01, 0, 0],
        # u10: gr(u10 - src1) + gr(u10 - u11) + g10(u10 - w10) = 0
        [0, 0, 2 * gr + g10, -gr, 0, 0, -g10, 0],
        # u11: gr(u11 - u10) + g11(u11 - w11) = 0
        [0, 0, -gr, gr + g11, 0, 0, 0, -g11],
        # w00: g00(w00 - u00) + gc(w00 - w10) = 0
        [-g00, 0, 0, 0, g00 + gc, 0, -gc, 0],
        # w01: g01(w01 - u01) + gc(w01 - w11) = 0
        [0, -g01, 0, 0, 0, g01 + gc, 0, -gc],
        # w10: g10(w10 - u10) + gc(w10 - w00) + gc(w10 - end0) = 0
        [0, 0, -g10, 0, -gc, 0, g10 + 2 * gc, 0],
        # w11: g11(w11 - u11) + gc(w11 - w01) + gc(w11 - end1) = 0
        [0, 0, 0, -g11, 0, -gc, 0, g11 + 2 * gc],
    ])
    b = np.zeros(8)
    if transposed:
        b[6], b[7] = gc * V[0], gc * V[1]
        x = np.linalg.solve(A, b)
        return np.array([gr * x[0], gr * x[2]])        # into the rows' virtual grounds
    b[0], b[2] = gr * V[0], gr * V[1]
    x = np.linalg.solve(A, b)
    return np.array([gc * x[6], gc * x[7]])            # into the columns' virtual grounds


@pytest.mark.parametrize("r_row,r_col", [(2.0, 3.0), (500.0, 50.0), (1e4, 1e3)])
def test_2x2_matches_hand_written_equations(r_row, r_col):
    G = np.array([[1e-4, 3e-5], [2e-6, 7e-5]])
    V = np.array([0.2, -0.1])
    solver = NodalSolver(G, r_row, r_col)
    np.testing.assert_allclose(solver.read(V[None])[0], _hand_2x2(G, V, r_row, r_col), rtol=1e-12, atol=0)
    Vc = np.array([0.05, 0.3])
    np.testing.assert_allclose(solver.read_transposed(Vc[None])[0], _hand_2x2(G, Vc, r_row, r_col, True),
                               rtol=1e-12, atol=0)


def test_closed_forms_1x1_and_1x2():
    # 1x1: the source, both segments and the cell in series.
    g, rr, rc, v = 2e-4, 30.0, 70.0, 0.3
    assert nodal_read(np.array([[g]]), np.array([[v]]), rr, rc)[0, 0] == pytest.approx(
        v / (rr + 1 / g + rc), rel=1e-13)
    # 1x2 with ideal columns: the far cell hangs behind one more row segment; the near node sees it in
    # parallel with the near cell; the source segment in series with the rest.
    g0, g1 = 1e-3, 4e-4
    far = 1 / (rr + 1 / g1)                             # conductance of (segment + far cell)
    u0 = v * (1 / rr) / (1 / rr + g0 + far)             # divider at the near row node
    u1 = u0 * (1 / g1) / (rr + 1 / g1)
    out = nodal_read(np.array([[g0, g1]]), np.array([[v]]), rr, 0.0)[0]
    np.testing.assert_allclose(out, [g0 * u0, g1 * u1], rtol=1e-13)


@pytest.mark.parametrize("shape", [(4, 7), (9, 3)])
def test_tends_to_ideal_read_linearly_in_r(shape):
    G = _tile(*shape, seed=1)
    V = np.random.default_rng(2).uniform(-0.2, 0.2, (5, shape[0]))
    ideal = V @ G
    assert np.array_equal(nodal_read(G, V, 0.0, 0.0), ideal)
    errs = [np.abs(nodal_read(G, V, r, 2 * r) - ideal).max() for r in (1e-1, 1e-2, 1e-3)]
    # The deviation is first order in r: each tenfold decrease shrinks it tenfold, up to O(r·G·n) terms.
    assert errs[0] > 0
    assert errs[1] / errs[0] == pytest.approx(0.1, rel=0.02)
    assert errs[2] / errs[1] == pytest.approx(0.1, rel=0.002)


@pytest.mark.parametrize("r_row,r_col", [(3.0, 0.0), (0.0, 3.0)])
def test_one_ideal_wire_is_the_limit_of_a_small_one(r_row, r_col):
    G = _tile(5, 6, seed=3)
    V = np.random.default_rng(4).uniform(0, 0.2, (3, 5))
    merged = NodalSolver(G, r_row, r_col)
    tiny = NodalSolver(G, r_row or 1e-9, r_col or 1e-9)
    assert merged.n_unknowns == 30 and tiny.n_unknowns == 60
    np.testing.assert_allclose(merged.read(V), tiny.read(V), rtol=1e-7)
    Vc = np.random.default_rng(5).uniform(0, 0.2, (3, 6))
    np.testing.assert_allclose(merged.read_transposed(Vc), tiny.read_transposed(Vc), rtol=1e-7)


@pytest.mark.parametrize("transposed", [False, True])
def test_kirchhoff_at_every_node_and_overall(transposed):
    R, C, rr, rc = 6, 5, 40.0, 25.0
    G = _tile(R, C, seed=6)
    rng = np.random.default_rng(7)
    V = rng.uniform(-0.2, 0.2, (4, C if transposed else R))
    solver = NodalSolver(G, rr, rc)
    u, w = solver.node_voltages(V, transposed=transposed)
    src_row = np.zeros((4, R)) if transposed else V            # potentials behind the row end segments
    src_col = V if transposed else np.zeros((4, C))            # and behind the column end segments
    cell = G * (u - w)                                         # current row node -> column node
    left = np.concatenate([src_row[:, :, None], u], axis=2)    # row chain, end segment first
    row_seg = np.diff(left, axis=2) * (-1 / rr)                # current flowing rightwards in each segment
    below = np.concatenate([w, src_col[:, None, :]], axis=1)   # column chain, end segment last
    col_seg = -np.diff(below, axis=1) / rc                     # current flowing downwards in each segment
    scale = np.abs(cell).max()
    # Row node (i, j): in from the left = out to the right + into the cell.
    out_right = np.concatenate([row_seg[:, :, 1:], np.zeros((4, R, 1))], axis=2)
    assert np.abs(row_seg - out_right - cell).max() < 1e-12 * scale
    # Column node (i, j): in from above + from the cell = out below.
    in_above = np.concatenate([np.zeros((4, 1, C)), col_seg[:, :-1, :]], axis=1)
    assert np.abs(in_above + cell - col_seg).max() < 1e-12 * scale
    # Whole tile: what the drivers source is what the virtual grounds sink.
    if transposed:
        sourced, sensed = -col_seg[:, -1, :].sum(1), solver.read_transposed(V).sum(1)
        np.testing.assert_allclose(solver.read_transposed(V), -row_seg[:, :, 0], rtol=1e-10)
    else:
        sourced, sensed = row_seg[:, :, 0].sum(1), solver.read(V).sum(1)
        np.testing.assert_allclose(solver.read(V), col_seg[:, -1, :], rtol=1e-10)
    np.testing.assert_allclose(sourced, sensed, rtol=1e-10)


def test_transposed_read_is_the_mirrored_network_and_reciprocal():
    R, C, rr, rc = 5, 8, 30.0, 80.0
    G = _tile(R, C, seed=8)
    Vc = np.random.default_rng(9).uniform(0, 0.2, (3, C))
    solver = NodalSolver(G, rr, rc)
    got = solver.read_transposed(Vc)
    # Columns driven at the bottom, rows sensed at the left == forward read of Gᵀ flipped on both axes, with
    # the roles of the wires exchanged, inputs and outputs in reverse order.
    mirrored = NodalSolver(G.T[::-1, ::-1], rc, rr).read(Vc[:, ::-1])[:, ::-1]
    np.testing.assert_allclose(got, mirrored, rtol=1e-12)
    # Reciprocity: the transposed read is the transpose of the forward linear map.
    M = solver.effective_conductance()
    np.testing.assert_allclose(solver.read(np.eye(R)), M, rtol=1e-12)
    np.testing.assert_allclose(got, Vc @ M.T, rtol=1e-10)
    assert not np.allclose(M, G, rtol=1e-3)                    # the wires do matter here


@pytest.mark.parametrize("shape", [(6, 4), (5, 5)])
def test_large_batches_use_the_effective_matrix_and_agree(shape):
    R, C = shape
    G = _tile(R, C, seed=10)
    rng = np.random.default_rng(11)
    V, Vc = rng.uniform(0, 0.2, (10, R)), rng.uniform(0, 0.2, (10, C))
    direct = NodalSolver(G, 50.0, 20.0)                        # batches < min(R, C): triangular solves
    expect, expect_t = direct.read(V[:3]), direct.read_transposed(Vc[:3])
    assert direct._M is None
    cached = NodalSolver(G, 50.0, 20.0)
    big = cached.read(V)                                        # batch >= min(R, C): builds M first
    assert cached._M is not None
    np.testing.assert_allclose(big[:3], expect, rtol=1e-12)
    np.testing.assert_allclose(cached.read_transposed(Vc[:3]), expect_t, rtol=1e-12)


def test_torch_in_torch_out_and_gradients():
    G = torch.tensor(_tile(3, 4, seed=12), requires_grad=True)
    V = torch.tensor(np.random.default_rng(13).uniform(-0.2, 0.2, (2, 3)), requires_grad=True)
    Vc = torch.tensor(np.random.default_rng(14).uniform(-0.2, 0.2, (2, 4)), requires_grad=True)
    solver = NodalSolver(G, 300.0, 700.0)
    out = solver.read(V.detach().float())
    assert out.dtype == torch.float32 and out.shape == (2, 4)
    # Adjoint by reciprocity and dℓ/dG from the cell voltages, checked against finite differences.
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 300.0, 700.0).read(v), (V, G))
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 300.0, 700.0).read_transposed(v), (Vc, G))
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 0.0, 0.0).read(v), (V, G))


@pytest.mark.parametrize("bad", [
    dict(r_row=-1.0), dict(r_col=float("nan")), dict(G=np.ones(3)), dict(G=-np.ones((3, 2))),
    dict(V=np.ones((2, 2))), dict(V=np.ones((2, 3, 1))), dict(V=np.full((2, 3), np.inf)),
    dict(G=np.full((3, 2), np.nan)),
])
def test_bad_arguments_name_the_argument(bad):
    args = dict(G=np.full((3, 2), 1e-5), V=np.ones((2, 3)), r_row=1.0, r_col=1.0) | bad
    name = next(iter(bad))
    for fn in (nodal_read, approximate_read):
        with pytest.raises(ValueError, match=f"'{name}'") as info:
            fn(args["G"], args["V"], args["r_row"], args["r_col"])
        assert isinstance(info.value, ConfigError) and info.value.field == name


# ------------------------------------------------------------------------------------ approximation
@pytest.mark.parametrize("N,r", [(16, 1.0), (48, 1.0), (48, 10.0)])
def test_approximation_within_stated_bound(N, r):
    """Moderate r·G (Gmax·r <= 1e-3, ideal-read error up to ~50 %): default settings within 1e-5 of the
    largest ideal output; two CG steps already within 1e-2 (docs/wires.md, table)."""
    G = _tile(N, N, seed=15)
    V = np.random.default_rng(16).uniform(0, 0.2, (4, N))
    exact = nodal_read(G, V, r, r)
    scale = np.abs(V @ G).max()
    approx = approximate_read(torch.tensor(G), torch.tensor(V), r, r)
    assert np.abs(approx.numpy() - exact).max() < 1e-5 * scale
    rough = approximate_read(G, V, r, r, iterations=2, rtol=0.0)
    assert isinstance(rough, np.ndarray)
    assert np.abs(rough - exact).max() < 1e-2 * scale
    Vc = np.random.default_rng(17).uniform(0, 0.2, (4, N))
    np.testing.assert_allclose(approximate_read_transposed(G, Vc, r, 2 * r),
                               NodalSolver(G, r, 2 * r).read_transposed(Vc), rtol=1e-5)


def test_approximation_is_differentiable_and_dead_cells_are_harmless():
    G = _tile(6, 5, seed=18)
    G[0, :2] = 0.0                                              # stuck-open cells: √G would break gradients
    M = NodalSolver(G, 100.0, 100.0).effective_conductance()
    Gt = torch.tensor(G, requires_grad=True)
    V = torch.tensor(np.random.default_rng(19).uniform(0, 0.2, (3, 6)), requires_grad=True)
    weights = torch.linspace(-1, 1, 5, dtype=torch.float64)
    (approximate_read(Gt, V, 100.0, 100.0, rtol=1e-12) * weights).sum().backward()
    np.testing.assert_allclose(V.grad.numpy(), np.tile(M @ weights.numpy(), (3, 1)), rtol=1e-8)
    # dℓ/dG through the unrolled iteration matches the exact solve's adjoint (dead cells included).
    Gn = torch.tensor(G, requires_grad=True)
    (NodalSolver(Gn, 100.0, 100.0).read(V.detach()) * weights).sum().backward()
    np.testing.assert_allclose(Gt.grad.numpy(), Gn.grad.numpy(), rtol=1e-7)
    out32 = approximate_read(Gt.detach().float(), V.detach().float(), 100.0, 100.0)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.double().numpy(), V.detach().numpy() @ M, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_cuda():
    G = torch.tensor(_tile(8, 8, seed=20), device="cuda")
    V = torch.rand(3, 8, device="cuda", dtype=torch.float64)
    exact = NodalSolver(G, 5.0, 5.0).read(V)
    approx = approximate_read(G, V, 5.0, 5.0)
    assert exact.device.type == approx.device.type == "cuda"
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=0)


def test_approximation_treats_each_input_on_its_own():
    """Inputs converge independently (a converged one is frozen) and CPU batches are cut into chunks, so a
    batch's result is each input's own result, whatever else is in the batch."""
    G = torch.tensor(_tile(40, 40, seed=21))
    V = torch.tensor(np.random.default_rng(22).uniform(0, 0.2, (90, 40)))    # > one 2^17-number chunk
    V[5] = 0.2 * (-1.0) ** torch.arange(40)                                  # converges one step earlier
    whole = approximate_read(G, V, 20.0, 20.0, rtol=1e-9)
    alone = torch.cat([approximate_read(G, V[k:k + 1], 20.0, 20.0, rtol=1e-9) for k in (0, 5, 89)])
    torch.testing.assert_close(whole[[0, 5, 89]], alone, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------ layouts: pairs, reference
def _dense_nodal(Gp, V, r_row, r_col, transposed=False):
    """A reference solver written out node by node: the Laplacian of every node of the physical tile (row
    nodes, column nodes, then the R + C port nodes) built one conductance at a time, the ports pinned, a dense
    solve. Independent of NodalSolver's index arithmetic."""
    R, C = Gp.shape
    n_cells = R * C
    row_node = lambda i, j: i * C + j                                   # noqa: E731
    col_node = lambda i, j: n_cells + i * C + j                         # noqa: E731
    row_port = lambda i: 2 * n_cells + i                                # noqa: E731
    col_port = lambda j: 2 * n_cells + R + j                            # noqa: E731
    n = 2 * n_cells + R + C
    L = np.zeros((n, n))

    def edge(a, b, g):
        L[a, a] += g
        L[b, b] += g
        L[a, b] -= g
        L[b, a] -= g

    for i in range(R):
        edge(row_port(i), row_node(i, 0), 1 / r_row)
        for j in range(C):
            edge(row_node(i, j), col_node(i, j), Gp[i, j])
            if j + 1 < C:
                edge(row_node(i, j), row_node(i, j + 1), 1 / r_row)
            if i + 1 < R:
                edge(col_node(i, j), col_node(i + 1, j), 1 / r_col)
    for j in range(C):
        edge(col_node(R - 1, j), col_port(j), 1 / r_col)
    free, ports = np.arange(2 * n_cells), np.arange(2 * n_cells, n)
    out = []
    for v in V:
        xp = np.concatenate([np.zeros(R), v]) if transposed else np.concatenate([v, np.zeros(C)])
        xf = np.linalg.solve(L[np.ix_(free, free)], -L[np.ix_(free, ports)] @ xp)
        injected = L[np.ix_(ports, free)] @ xf + L[np.ix_(ports, ports)] @ xp
        out.append(-injected[:R] if transposed else -injected[R:])
    return np.array(out)


def _pair_tile(R, C, seed):
    return _tile(R, C * 2, seed).reshape(R, C, 2)


@pytest.mark.parametrize("r_row,r_col", [(40.0, 25.0), (300.0, 5.0)])
def test_pair_is_one_network_with_shared_rows(r_row, r_col):
    """A pair tile (R, C, 2) is the R x 2C network with G⁺ in column 2j, G⁻ in 2j+1: its outputs are the
    differences of that network's column currents (checked against a dense solve built node by node), and its
    transposed read drives the pair's columns at ±V."""
    R, C = 3, 2
    G = _pair_tile(R, C, seed=30)
    Gp = np.stack([G[..., 0], G[..., 1]], -1).reshape(R, 2 * C)     # columns G⁺0, G⁻0, G⁺1, G⁻1
    rng = np.random.default_rng(31)
    V, Vc = rng.uniform(-0.2, 0.2, (4, R)), rng.uniform(-0.2, 0.2, (4, C))
    phys = _dense_nodal(Gp, V, r_row, r_col)
    solver = NodalSolver(G, r_row, r_col)
    assert solver.physical_shape == (R, 2 * C) and solver.n_unknowns == 2 * R * 2 * C
    np.testing.assert_allclose(solver.read(V), phys[:, 0::2] - phys[:, 1::2], rtol=1e-11, atol=0)
    drive = np.stack([Vc, -Vc], -1).reshape(4, 2 * C)
    np.testing.assert_allclose(solver.read_transposed(Vc), _dense_nodal(Gp, drive, r_row, r_col, True),
                               rtol=1e-11, atol=0)
    # Reciprocity survives the pairing: the transposed read is the transpose of the forward map.
    M = solver.effective_conductance()
    np.testing.assert_allclose(solver.read_transposed(Vc), Vc @ M.T, rtol=1e-10)
    np.testing.assert_allclose(solver.read(V), V @ M, rtol=1e-10)
    u, w = solver.node_voltages(V)
    assert u.shape == w.shape == (4, R, 2 * C)


def test_2x1_pair_by_hand_and_more_ir_drop_than_independent_tiles():
    """The smallest pair (2 rows, one weight) is the hand-written 2x2 network; with its G⁺ and G⁻ on one row
    wire each row carries both devices' currents, so the rows drop more than in two independent 2x1 tiles and
    each device passes less current."""
    gp, gm = np.array([8e-4, 5e-4]), np.array([2e-4, 6e-4])
    G = np.stack([gp, gm], -1)[:, None, :]                            # (2, 1, 2)
    V = np.array([0.2, 0.15])
    rr, rc = 30.0, 20.0
    by_hand = _hand_2x2(np.stack([gp, gm], 1), V, rr, rc)             # physical columns: G⁺, G⁻
    solver = NodalSolver(G, rr, rc)
    np.testing.assert_allclose(solver.read(V[None])[0], [by_hand[0] - by_hand[1]], rtol=1e-12)
    plus, minus = NodalSolver(gp[:, None], rr, rc), NodalSolver(gm[:, None], rr, rc)
    alone = np.concatenate([_hand_2x1(gp, V, rr, rc), _hand_2x1(gm, V, rr, rc)])
    np.testing.assert_allclose([plus.read(V[None])[0, 0], minus.read(V[None])[0, 0]], alone, rtol=1e-12)
    # Row drop up to the G⁺ cell (the first cell of each row): larger when G⁻'s current shares the segment.
    u_pair, _ = solver.node_voltages(V[None])
    u_plus, _ = plus.node_voltages(V[None])
    assert np.all(V - u_pair[0, :, 0] > V - u_plus[0, :, 0])
    assert np.all(by_hand < alone)                                     # each device passes less current


def _hand_2x1(g, V, r_row, r_col):
    """Column current of a 2x1 tile, by series/parallel reduction written out: the lower cell's row path
    (r_row + 1/g1) meets the column at the node above the sensing segment; the upper cell's path
    (r_row + 1/g0 + r_col) joins at the same node. Superposition of the two sources."""
    a0 = r_row + 1 / g[0] + r_col                                      # source 0 down to the lower column node
    a1 = r_row + 1 / g[1]                                              # source 1 to the lower column node
    # Lower column node potential w: (V0 - w)/a0 + (V1 - w)/a1 = w / r_col.
    w = (V[0] / a0 + V[1] / a1) / (1 / a0 + 1 / a1 + 1 / r_col)
    return np.array([w / r_col])


def test_closed_form_of_a_1x1_pair_with_ideal_columns():
    """One row, one pair, ideal columns: G⁻ sits one segment further from the driver and G⁺'s segment carries
    both currents (the 1x2 divider), against independent tiles where each device has its own segment."""
    g0, g1, r, v = 1e-3, 4e-4, 30.0, 0.3
    far = 1 / (r + 1 / g1)
    u0 = v * (1 / r) / (1 / r + g0 + far)
    u1 = u0 * (1 / g1) / (r + 1 / g1)
    shared = g0 * u0 - g1 * u1
    independent = g0 * v / (1 + r * g0) - g1 * v / (1 + r * g1)
    G = np.array([[[g0, g1]]])
    assert nodal_read(G, np.array([[v]]), r, 0.0)[0, 0] == pytest.approx(shared, rel=1e-13)
    assert approximate_read(G, np.array([[v]]), r, 0.0, rtol=1e-14)[0, 0] == pytest.approx(shared, rel=1e-12)
    # To first order in r·g, sharing costs G⁺ the drop of G⁻'s current on its segment (−r·g0·g1·v) and G⁻ the
    # drop of both currents on that first segment (−r·(g0 + g1)·g1·v, on top of the drop on its own segment,
    # which it has in both cases): the difference I⁺ − I⁻ gains r·g1²·v.
    assert shared - independent == pytest.approx(r * g1**2 * v, rel=0.05)


@pytest.mark.parametrize("r_row,r_col", [(30.0, 80.0), (0.0, 50.0), (50.0, 0.0)])
def test_reference_column_is_the_last_physical_column(r_row, r_col):
    """reference=g: a column of cells at g after the tile's columns, on the same rows; output I[j] - I_ref, and
    the transposed read drives the reference column at -Σ V (the adjoint), so reciprocity holds."""
    R, C, g_ref = 4, 3, 3e-5
    G = _tile(R, C, seed=32)
    rng = np.random.default_rng(33)
    V, Vc = rng.uniform(0, 0.2, (3, R)), rng.uniform(-0.2, 0.2, (3, C))
    phys = NodalSolver(np.concatenate([G, np.full((R, 1), g_ref)], 1), r_row, r_col)
    solver = NodalSolver(G, r_row, r_col, reference=g_ref)
    full = phys.read(V)
    np.testing.assert_allclose(solver.read(V), full[:, :C] - full[:, C:], rtol=1e-12)
    drive = np.concatenate([Vc, -Vc.sum(1, keepdims=True)], 1)
    np.testing.assert_allclose(solver.read_transposed(Vc), phys.read_transposed(drive), rtol=1e-12)
    np.testing.assert_allclose(solver.read_transposed(Vc), Vc @ solver.effective_conductance().T, rtol=1e-10)
    np.testing.assert_allclose(approximate_read(G, V, r_row, r_col, reference=g_ref), solver.read(V),
                               rtol=1e-5, atol=1e-5 * np.abs(V @ G).max())
    np.testing.assert_allclose(approximate_read_transposed(G, Vc, r_row, r_col, reference=g_ref),
                               solver.read_transposed(Vc), rtol=1e-5, atol=1e-5 * np.abs(Vc @ G.T).max())


@pytest.mark.parametrize("method", ["nodal", "approximate"])
def test_pair_tends_to_the_ideal_difference(method):
    """r -> 0: both solves reduce to V·(G⁺ - G⁻), exactly at r = 0 (to rounding), linearly in r near it."""
    G = _pair_tile(6, 4, seed=34)
    rng = np.random.default_rng(35)
    V, Vc = rng.uniform(-0.2, 0.2, (3, 6)), rng.uniform(-0.2, 0.2, (3, 4))
    W = G[..., 0] - G[..., 1]
    fwd = (lambda r: nodal_read(G, V, r, r)) if method == "nodal" else \
        (lambda r: approximate_read(G, V, r, r, rtol=1e-13))
    bwd = (lambda r: NodalSolver(G, r, r).read_transposed(Vc)) if method == "nodal" else \
        (lambda r: approximate_read_transposed(G, Vc, r, r, rtol=1e-13))
    scale = np.abs(V @ G.reshape(6, 8)).max()
    np.testing.assert_allclose(fwd(0.0), V @ W, rtol=0, atol=1e-15 * scale)
    np.testing.assert_allclose(bwd(0.0), Vc @ W.T, rtol=0, atol=1e-15 * scale)
    errs = [np.abs(fwd(r) - V @ W).max() for r in (1e-1, 1e-2)]
    assert errs[0] > 0 and errs[1] / errs[0] == pytest.approx(0.1, rel=0.02)


@pytest.mark.parametrize("N,r", [(16, 1.0), (32, 10.0)])
def test_pair_approximation_within_stated_bound(N, r):
    """Paired layout (N rows, N pairs = 2N physical columns): default settings within 1e-5 of the largest
    physical column current of the ideal read, forward and transposed (docs/wires.md)."""
    G = _pair_tile(N, N, seed=36)
    rng = np.random.default_rng(37)
    V, Vc = rng.uniform(0, 0.2, (4, N)), rng.uniform(-0.2, 0.2, (4, N))
    solver = NodalSolver(G, r, r)
    scale = np.abs(V @ G.reshape(N, 2 * N)).max()
    assert np.abs(approximate_read(G, V, r, r) - solver.read(V)).max() < 1e-5 * scale
    scale_t = np.abs(np.stack([Vc, -Vc], -1).reshape(4, 2 * N) @ G.reshape(N, 2 * N).T).max()
    assert np.abs(approximate_read_transposed(G, Vc, r, r) - solver.read_transposed(Vc)).max() < 1e-5 * scale_t
    assert np.abs(solver.read(V) - V @ (G[..., 0] - G[..., 1])).max() > 1e-3 * scale   # the wires matter


def test_pair_and_reference_gradients():
    G = torch.tensor(_pair_tile(3, 2, seed=38), requires_grad=True)
    V = torch.tensor(np.random.default_rng(39).uniform(-0.2, 0.2, (2, 3)), requires_grad=True)
    Vc = torch.tensor(np.random.default_rng(40).uniform(-0.2, 0.2, (2, 2)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 300.0, 700.0).read(v), (V, G))
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 300.0, 700.0).read_transposed(v), (Vc, G))
    Gs = torch.tensor(_tile(3, 2, seed=41), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, g: NodalSolver(g, 300.0, 700.0, reference=2e-5).read(v), (V, Gs))


def test_layout_arguments_are_checked():
    with pytest.raises(ConfigError, match="'reference'"):
        NodalSolver(_pair_tile(2, 2, 0), 1.0, 1.0, reference=1e-5)      # a pair has no reference column
    with pytest.raises(ConfigError, match="'reference'"):
        NodalSolver(_tile(2, 2), 1.0, 1.0, reference=-1e-5)
    with pytest.raises(ConfigError, match="'G'"):
        approximate_read(np.ones((2, 2, 3)) * 1e-5, np.ones((1, 2)), 1.0, 1.0)


# ------------------------------------------------------------------------------------ perturbed reads
def _perturbation_case(pair, seed):
    R, C, P = 5, 4, 7
    G = _pair_tile(R, C, seed) if pair else _tile(R, C, seed)
    rng = np.random.default_rng(seed + 1)
    rows, cols = rng.integers(0, R, P), rng.integers(0, C, P)
    delta = rng.uniform(-5e-6, 3e-5, (P, 2) if pair else P)
    # One change takes a cell down to exactly 0 S (a dead cell in the perturbed network).
    if pair:
        delta[0, 1] = -G[rows[0], cols[0], 1]
    else:
        delta[0] = -G[rows[0], cols[0]]
    V = rng.uniform(-0.2, 0.2, (3, R))
    return G, V, rows, cols, delta


def _one_by_one(G, V, rows, cols, delta, read):
    out = []
    for p in range(len(rows)):
        G2 = G.copy()
        G2[rows[p], cols[p]] += delta[p]
        out.append(read(G2))
    return np.stack(out)


@pytest.mark.parametrize("layout", ["single", "pair", "reference"])
@pytest.mark.parametrize("r_row,r_col", [(30.0, 80.0), (0.0, 50.0), (40.0, 0.0), (0.0, 0.0)])
def test_perturbed_reads_equal_separate_solves(layout, r_row, r_col):
    """P reads with one weight's cell(s) changed each: the rank-1 (rank-2 for a pair) update of the cached
    factorization equals P separate factorizations; the approximate model's update equals the exact one to
    well within its tolerance of the change itself."""
    G, V, rows, cols, delta = _perturbation_case(layout == "pair", seed=42)
    ref = 3e-5 if layout == "reference" else None
    expect = _one_by_one(G, V, rows, cols, delta, lambda g: nodal_read(g, V, r_row, r_col, ref))
    base = nodal_read(G, V, r_row, r_col, ref)
    solver = NodalSolver(G, r_row, r_col, ref)
    got = solver.read_perturbed(V, rows, cols, delta)
    assert got.shape == (7, 3, 4)
    scale = np.abs(expect - base).max()
    assert scale > 0
    np.testing.assert_allclose(got, expect, rtol=0, atol=1e-10 * scale)
    approx = approximate_read_perturbed(torch.tensor(G), torch.tensor(V), torch.tensor(rows), torch.tensor(cols),
                                        torch.tensor(delta), r_row, r_col, reference=ref, rtol=1e-10)
    assert isinstance(approx, torch.Tensor) and approx.shape == (7, 3, 4)
    np.testing.assert_allclose(approx.numpy() - base, expect - base, rtol=0, atol=1e-7 * scale)
    # Defaults: the change is resolved to ~rtol of itself; against separate approximate reads, whose own
    # error is relative to the whole output.
    loose = read_perturbed(G, V, rows, cols, delta, r_row, r_col, method="approximate", reference=ref)
    np.testing.assert_allclose(loose - base, expect - base, rtol=0, atol=1e-4 * scale)


def test_perturbed_read_of_one_vector_and_checks():
    G, V, rows, cols, delta = _perturbation_case(True, seed=43)
    solver = NodalSolver(G, 10.0, 10.0)
    np.testing.assert_array_equal(solver.read_perturbed(V[0], rows, cols, delta),
                                  solver.read_perturbed(V[:1], rows, cols, delta)[:, 0])
    with pytest.raises(ConfigError, match="'delta'"):
        solver.read_perturbed(V, rows, cols, delta[:, 0])               # a pair needs (ΔG⁺, ΔG⁻)
    with pytest.raises(ConfigError, match="'delta'"):
        solver.read_perturbed(V, rows[:1], cols[:1], -2 * G[rows[:1], cols[:1]])   # G + delta < 0
    with pytest.raises(ConfigError, match="'cols'"):
        solver.read_perturbed(V, rows[:1], [4], delta[:1])
    with pytest.raises(ConfigError, match="'method'"):
        read_perturbed(G, V, rows, cols, delta, 1.0, 1.0, method="exact")
    empty = solver.read_perturbed(V, [], [], np.zeros((0, 2)))
    assert empty.shape == (0, 3, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pairs_and_perturbed_reads_on_cuda():
    G, V, rows, cols, delta = _perturbation_case(True, seed=44)
    Gc, Vc = torch.tensor(G, device="cuda"), torch.tensor(V, device="cuda")
    exact = NodalSolver(G, 20.0, 20.0)
    out = approximate_read(Gc, Vc, 20.0, 20.0)
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), exact.read(V), rtol=1e-5, atol=0)
    got = approximate_read_perturbed(Gc, Vc, torch.tensor(rows, device="cuda"), torch.tensor(cols, device="cuda"),
                                     torch.tensor(delta, device="cuda"), 20.0, 20.0)
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), exact.read_perturbed(V, rows, cols, delta), rtol=1e-5, atol=0)
