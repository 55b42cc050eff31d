"""The fused CPU pulse pass of differential pairs (neurosim._pulse_numba) against the torch pass (the oracle)."""

from __future__ import annotations

import pytest
import torch

from neurosim.backend import make_generator
from neurosim.device import DeviceArray, _program_pairs, pair_arrays
from neurosim.random_streams import PhiloxStream

pytest.importorskip("numba")

CARDS = {
    "steep": {"nl_ltp": 0.0, "a_ltp": 1e-4, "a_ltd": 2e-3},
    "saturating": {"nl_ltp": 2.4, "nl_ltd": 4.88},
    "convex_spread_stuck": {"nl_ltp": 2.4, "nl_ltd": -1.0, "nl_dtod": 2.0, "g_min_dtod": 0.2, "g_max_dtod": 0.1,
                            "step_dtod": 0.3, "stuck_at_gmin": 0.03, "stuck_at_gmax": 0.03},
    "linear_ltp": {"nl_ltp": 0.0, "nl_ltd": 3.0},
    "linear_ltd": {"nl_ltp": -2.0, "nl_ltd": 0.0},
    "linear": {"nl_ltp": 0.0, "nl_ltd": 0.0, "g_max_dtod": 0.1},
    "drifting": {"nl_ltp": 2.4, "nl_ltd": -1.0, "nl_dtod": 1.0, "drift_nu_dtod": 0.3, "drift_t0": 0.01,
                 "stuck_at_gmin": 0.03},
}


def _pairs(spec, dtype, kernel, shapes=((40, 30), (40, 30))):
    """Two pairs of one card (one joined pass), their cells spread over each window, ends included."""
    pairs = []
    for k, shape in enumerate(shapes):
        noise = make_generator(k, "cpu", "noise")
        pair = [DeviceArray(spec, shape, make_generator(k, "cpu", name), dtype=dtype, noise_generator=noise)
                for name in ("plus", "minus")]
        pair_arrays(*pair)
        stream = PhiloxStream(7, "cpu", "pulses", kernel=kernel)
        for j, a in enumerate(pair):
            u = torch.rand(shape, generator=torch.Generator().manual_seed(10 * k + j), dtype=torch.float64)
            u[0] = 0.0
            u[1] = 1.0
            a.set_conductance((a.g_min + u * (a.g_max - a.g_min)).to(dtype), snap=False)
            a.pulse_stream = stream
        pairs.append(pair)
    return pairs


def _writes(pairs, step):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for first, second in pairs:
        cells = first.g.numel()
        idx = torch.randperm(cells, generator=gen)[: cells // 3].sort().values
        counts = torch.randint(1, 9, idx.shape, generator=gen).to(first.dtype)
        counts[torch.rand(idx.shape, generator=gen) < 0.5] *= -1
        counts[:5] = 60.0                      # beyond the window: clamps at the bounds
        out.append((first, second, idx, counts))
    return out


def _run(pairs, writes, fused):
    """One joined pass through the kernel (``fused``) or the torch path, asserting which one ran."""
    import neurosim.device as device

    assert device._fused([(0, *w) for w in writes]) == fused
    return _program_pairs(writes, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("card", list(CARDS))
def test_fused_pass_equals_the_torch_pass_within_its_ulp_bound(spec_factory, card, dtype):
    """Every conductance of both arrays of two joined pairs after a pass from the same state, three passes
    (the oracle's state copied into the kernel's arrays before each): equal bit for bit where the pass uses no
    log1p/expm1 (linear polarities: the same IEEE operations, addcmul as an fma), else within
    4·eps·max(g_max, |g|) of the cell (docs/devices.md "Programming": one ulp of log1p/expm1 moves the
    curve position by <= 1 ulp of 1; measured max 1.9). Programming times, versions and the stream's position
    are equal; stuck cells stay put; the counts of 60 pulses reach the bounds."""
    spec = spec_factory(states=65, c2c=0.01, drift_nu=0.05, **CARDS[card])
    fused, oracle = _pairs(spec, dtype, "numba"), _pairs(spec, dtype, "torch")
    eps = torch.finfo(dtype).eps
    exact = card == "linear"
    for step in range(3):
        for pf, po in zip(fused, oracle, strict=True):
            for a, b in zip(pf, po, strict=True):
                a.g.copy_(b.g)
                a.time_s = b.time_s = 0.25 * (step + 1)            # before t0: no drift, but stamped times
            pf[0].pulse_stream._counter = po[0].pulse_stream.counter
        got = _run(fused, _writes(fused, step), True)
        want = _run(oracle, _writes(oracle, step), False)
        assert fused[0][0].pulse_stream.counter == oracle[0][0].pulse_stream.counter > 0
        for (gf, gs), (wf, ws) in zip(got, want, strict=True):
            for x, y in ((gf, wf), (gs, ws)):
                assert x.dtype == y.dtype and x.shape == y.shape
        for pf, po in zip(fused, oracle, strict=True):
            for a, b in zip(pf, po, strict=True):
                assert torch.equal(a.t_programmed, b.t_programmed) and a.version == b.version
                assert bool(((a.g >= a.g_min) & (a.g <= a.g_max) | a.stuck).all())
                assert torch.equal(a.g[a.stuck], b.g[b.stuck])
                if exact:
                    assert torch.equal(a.g, b.g)
                else:
                    bound = 4 * eps * torch.maximum(b.g_max.expand(b.shape), b.g.abs())
                    assert bool(((a.g - b.g).abs() <= bound).all()), float(((a.g - b.g).abs() / bound).max())
    # the writes did reach both ends of some windows
    g = torch.cat([a.g.reshape(-1) for p in fused for a in p])
    lo = torch.cat([a.g_min.expand(a.shape).reshape(-1) for p in fused for a in p])
    hi = torch.cat([a.g_max.expand(a.shape).reshape(-1) for p in fused for a in p])
    assert bool((g == lo).any()) and bool((g == hi).any())


def test_fused_pass_draws_the_streams_normals(spec_factory):
    """The cycle-to-cycle draw of cell k of the pass is normal k of one stream call: at c2c = 0.2 on a linear
    card (exact arithmetic), the kernel's conductances minus the noise-free pass's are the stream's normals
    times c2c·span·sqrt(|n|) (cells start mid-window, |n| <= 2 and c2c = 0.05: a bound is 6 sigma away, and
    |z| <= 6.66 by construction, so no cell in this fixed draw is clamped)."""
    spec = spec_factory(states=65, c2c=0.05, nl_ltp=0.0, nl_ltd=0.0)
    quiet = spec_factory(states=65, c2c=0.0, nl_ltp=0.0, nl_ltd=0.0)
    noisy, clean = _pairs(spec, torch.float64, "numba"), _pairs(quiet, torch.float64, "numba")
    for p in noisy + clean:
        for a in p:
            a.set_conductance(torch.full(a.shape, 0.5 * (spec.g_min + spec.g_max), dtype=torch.float64), snap=False)
    writes = _writes(noisy, 0)
    for w in writes:
        w[3].clamp_(-2, 2)
    got = _program_pairs(writes, True)
    ref = _program_pairs([(c[0], c[1], w[2], w[3]) for c, w in zip(clean, writes, strict=True)], True)
    z = PhiloxStream(7, "cpu", "pulses", kernel="torch").normal(sum(2 * w[2].numel() for w in writes),
                                                                dtype=torch.float64)
    scale = spec.c2c * (spec.g_max - spec.g_min)
    diff = torch.cat([t for pair_g, pair_r in zip(got, ref, strict=True) for t in (pair_g[0] - pair_r[0],
                                                                                      pair_g[1] - pair_r[1])])
    mag = torch.cat([t for w in writes for t in (w[3].abs().sqrt(), w[3].abs().sqrt())])
    torch.testing.assert_close(diff, z * scale * mag, rtol=0, atol=4 * 2.0**-52 * spec.g_max)


def test_bp_epochs_kernel_and_torch_path_fire_the_same_pulses(monkeypatch):
    """Two BP epochs of a differential-pair MLP (spreads, convex cells, stuck cells, c2c, read noise,
    converters, stochastic rounding; no drift, so every write takes the kernel), once through the kernel and
    once through the torch pass: the same pulse counts per layer and the same metrics. The conductances may
    differ by the kernel's ulps, which could in principle flip one stochastic rounding through an ADC code;
    this fixed run shows they do not here, and the conductances stay within 64·eps·g_max (ulps compound
    over the steps)."""
    from torch import nn

    import neurosim.device as device
    from neurosim.config import build
    from neurosim.crossbar import CrossbarConfig
    from neurosim.data import DataConfig, load
    from neurosim.layers import AnalogLinear, AnalogNetwork
    from neurosim.training import TrainerConfig, make_trainer
    from tests.bp_fingerprint import _spec

    torch.set_num_threads(1)
    data = load(DataConfig(name="synthetic", size=8, samples=240, test_fraction=0.25), seed=1)
    spec = _spec(nl_ltp=2.0, nl_ltd=-3.0, c2c=0.01, read_noise=0.02, g_min_dtod=0.05, g_max_dtod=0.05, nl_dtod=0.5,
                 step_dtod=0.05, stuck_at_gmin=0.01, stuck_at_gmax=0.01)
    xb = CrossbarConfig(tile_rows=16, tile_cols=8, dac_bits=6, adc_bits=7, adc_range=6.0, rounding="stochastic")
    cfg = build(TrainerConfig, {"scheme": "bp", "epochs": 2, "batch_size": 16, "learning_rate": 0.2})
    fused_calls = []
    real = device._fused

    def run(kernel: bool):
        monkeypatch.setattr(device, "_fused", lambda j: fused_calls.append(1) or (real(j) and kernel))
        widths = (64, 24, 10)
        net = AnalogNetwork([nn.Flatten(), *(AnalogLinear(widths[i], widths[i + 1], name=f"fc{i}", spec=spec,
                                                           crossbar=xb, seed=3) for i in range(2))])
        trainer = make_trainer(net, data, cfg, seed=11)
        trainer.run_epochs(2)
        rows = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in trainer.history]
        return dict(trainer.layer_pulses), rows, [a.g.clone() for layer in net.analog_layers
                                                  for a in layer.crossbar._arrays()]

    assert real([(0, *w) for w in _writes(_pairs(spec, torch.float32, "numba"), 0)])   # the kernel applies
    pulses_k, rows_k, g_k = run(True)
    pulses_t, rows_t, g_t = run(False)
    assert fused_calls and sum(pulses_k.values()) > 0
    assert pulses_k == pulses_t and rows_k == rows_t
    for a, b in zip(g_k, g_t, strict=True):
        assert bool(((a - b).abs() <= 64 * torch.finfo(a.dtype).eps * spec.g_max).all())
