"""The crossbar's bookkeeping after a sparse write as one numba pass equals its torch path bit for bit."""


import pytest
import torch

from neurosim.config import build
from neurosim.crossbar import Crossbar, CrossbarConfig
from neurosim.device import DeviceSpec


def _crossbar(mapping, dtype, tile_rows, tile_cols, shape=(37, 29), w_max=1.0):
    spec = build(DeviceSpec, {"name": "t", "g_min": 1e-6, "g_max": 1e-5, "states": 65, "nl_ltp": 2.0,
                              "nl_ltd": -3.0, "states_ltd": 41})
    cfg = CrossbarConfig(tile_rows=tile_rows, tile_cols=tile_cols, mapping=mapping, w_max=w_max)
    return Crossbar(spec, *shape, cfg, seed=1, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mapping,tile_rows,tile_cols", [("differential", 16, 8), ("differential", 64, 64),
                                                          ("reference", 10, 7)])
def test_bookkeeping_kernel_equals_the_torch_path(dtype, mapping, tile_rows, tile_cols):
    # Ragged tiles, several column tiles or one, a single device with different up and down steps, beliefs
    # pushed past ±w_max (the clamp), counts of both signs and several sizes.
    a = _crossbar(mapping, dtype, tile_rows, tile_cols)
    b = _crossbar(mapping, dtype, tile_rows, tile_cols)
    assert (a.dw_up != a.dw_down) == (mapping == "reference")
    g = torch.Generator().manual_seed(2)
    start = (torch.rand(a.believed.shape, generator=g, dtype=torch.float64) * 2.2 - 1.1).to(dtype)
    a.believed.copy_(start)
    b.believed.copy_(start)
    n = a.believed.numel()
    for k in (1, 17, n // 3, n):
        idx = torch.randperm(n, generator=g)[:k].sort().values
        counts = torch.randint(1, 40, (k,), generator=g).to(dtype) * torch.where(
            torch.rand(k, generator=g) < 0.5, -1.0, 1.0).to(dtype)
        assert a._bookkeeping_kernel(idx, counts)
        pulses, slots = a._written(idx, counts, a._cells(idx)[0], None, False)
        want_pulses, want_slots = b._bookkeeping_torch(idx, counts)
        assert pulses == float(want_pulses) and slots == float(want_slots)
        assert torch.equal(a.believed, b.believed)
    assert float(a.believed.abs().max()) == pytest.approx(a.config.w_max)   # the clamp was exercised
    # slots by hand for a single count: its magnitude
    idx = torch.tensor([5])
    pulses, slots = a._written(idx, torch.tensor([-3.0], dtype=dtype), a._cells(idx)[0], None, False)
    assert (pulses, slots) == (3.0, 3.0)


def test_program_deltas_through_the_kernel_equal_the_torch_bookkeeping(monkeypatch):
    # Whole stochastic writes of two layers (same seeds: the same pulses and device responses): the beliefs and
    # the reported pulses and slots equal those of the torch bookkeeping, bit for bit.
    from neurosim.crossbar import program_deltas
    runs = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(Crossbar, "_bookkeeping_kernel", lambda self, idx, counts: False)
        bars = [_crossbar("differential", torch.float32, 16, 8, shape=(40, 30)),
                _crossbar("reference", torch.float32, 16, 8, shape=(30, 10))]
        g = torch.Generator().manual_seed(0)
        stats = [program_deltas(bars, [torch.randn(40, 30, generator=g), torch.randn(30, 10, generator=g)],
                                scale=3 * bars[0].dw_up) for _ in range(3)]
        runs.append((stats, [bar.believed.clone() for bar in bars], [bar.weights() for bar in bars]))
    (s1, b1, w1), (s2, b2, w2) = runs
    assert s1 == s2 and all(s["pulses"] > 0 for step in s1 for s in step)
    assert all(torch.equal(x, y) for x, y in zip(b1 + w1, b2 + w2, strict=True))
