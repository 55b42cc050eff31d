"""Measured errors of DGC's approximations and the size of the physical effects its modes model, on the bundled
digits (64-16-10 sigmoid MLP, batch 32). One figure a line as ``name = value``; docs/training.md quotes them.

  restore_rms_<card>_<mode>   rms change of fc1's weights (the conductances it really holds) after 10 DGC steps
                              that only perturb and restore (no update), and restore_mean_* its mean.
  shared_std_ratio            std over 40 measurements of fc2's DGC gradient with lower_reads = "shared" over
                              "fresh" (the chip), hidden neurons with 1% noise, no read noise.
  cosine_<precision>_dw<dw>   cosine of noise-free DGC (temporary change dw, central) of fc1 with the true
                              gradient (autograd through the noise-free chip in float64).

    python benchmarks/dgc_fidelity.py
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.config import build, with_overrides
from neurosim.data import load
from neurosim.device import load_card
from neurosim.training import noise_free
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import dgc_exact, dgc_measure


def network(spec, act=None, seed=0):
    cfg = NetworkConfig(hidden=(16,), activation=act or ActivationConfig(function="sigmoid"), init_scale=0.3)
    return build_network(cfg, spec, (1, 8, 8), 10, seed=seed, derivative_circuits=False)


def true_gradient(net, layer, x, y):
    w = layer.crossbar.weights().double().clone().requires_grad_(True)
    for other in net.analog_layers:
        other.crossbar.read_dtype = torch.float64
    with noise_free(net):
        loss = nn.functional.cross_entropy(net(x.double(), mode="linearized", weights={layer.name: w}).double(), y)
    for other in net.analog_layers:
        other.crossbar.read_dtype = other.crossbar.dtype
    return torch.autograd.grad(loss, w)[0]


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    torch.set_num_threads(1)
    data = load()
    x, y = data.x_train[:32], data.y_train[:32]
    for card in ("ag_asi", "taox_hfox", "pcmo"):
        for mode in ("pulse", "pulse_verify"):
            net = network(load_card(card))
            layer = net.analog_layers[0]
            w0 = layer.crossbar.weights().clone()
            cfg = build(DGCConfig, {"perturbation": mode})
            for _ in range(10):
                dgc_measure(net, layer, x, y, "cross_entropy", cfg)
            d = layer.crossbar.weights() - w0
            print(f"restore_rms_{card}_{mode} = {float(d.pow(2).mean().sqrt()):.4f}")
            print(f"restore_mean_{card}_{mode} = {float(d.mean()):+.4f}")
        print(f"# {card}: rms of the initial weights = {float(w0.pow(2).mean().sqrt()):.4f}")

    ideal = load_card("ideal")
    net = network(ideal, ActivationConfig(function="sigmoid", noise=0.01))
    top = net.analog_layers[1]
    std = {}
    for reads in ("fresh", "shared"):
        cfg = build(DGCConfig, {"lower_reads": reads})
        g = torch.stack([dgc_exact(net, top, x, y, "cross_entropy", cfg)[0] for _ in range(40)])
        std[reads] = float(g.std(0).mean())
    print(f"shared_std_ratio = {std['shared'] / std['fresh']:.4g}")

    spec = dataclasses.replace(with_overrides(ideal, {"g_min_dtod": 0.1}))
    act = ActivationConfig(function="sigmoid", gain_dtod=0.1, offset_dtod=0.05)
    net = network(spec, act, seed=1)
    layer = net.analog_layers[0]
    ref = true_gradient(net, layer, x, y)
    for precision in ("float32", "float64"):
        for dw in (1e-2, 1e-3, 1e-4, 1e-5):
            cfg = build(DGCConfig, {"perturbation_dw": dw, "difference": "central", "precision": precision})
            g, _ = dgc_exact(net, layer, x, y, "cross_entropy", cfg)
            print(f"cosine_{precision}_dw{dw:g} = {cosine(g.double(), ref):.5f}")


if __name__ == "__main__":
    main()
