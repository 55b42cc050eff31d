"""Validity envelope of linearized DGC: its cosine with exact DGC over ADC bits, device states and noise.

The table in docs/training.md ("Linearized DGC: validity envelope") comes from this script. Setting: the
64-16-10 MLP of the digits (sigmoid hidden layer, identity output, bias rows, network seed 0, default crossbar:
one tile, adc_range 12), the first 32 training samples, cross-entropy, forward differences of one pulse.
Per layer (fc1, fc2), over every weight whose row is driven by the batch:

  cosine( E[exact measurement C(w+Δ) − C(w)],  linearized prediction g_lin·Δ )

with the same real perturbation Δ (one draw of the card's cycle-to-cycle noise) on both sides, so the
number measures the converters and the finite perturbation, not the perturbation's randomness (which both
modes share). Noise-free rows: the exact measurement is deterministic (and equals ``dgc_exact``). Noisy rows:
its expectation by ``expected_differences`` with ``--draws`` common-random-number draws (disattenuated;
the jackknife standard error is printed where it exceeds 0.01; in parentheses, the plain cosine where the
average is still too noisy to disattenuate, standard error over 0.1). ``check`` is what
``check_linearized_validity`` decides with its defaults (128 sampled weights, adaptive draws): ok or REFUSE.

Run: python benchmarks/dgc_envelope.py [--part cards|states|noise|all] [--draws 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import load
from neurosim.device import load_card, shipped_card_paths
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import linearized_gradients
from neurosim.training.dgc_envelope import (
    _cosine,
    _jackknife,
    check_linearized_validity,
    expected_differences,
    real_perturbations,
)

BITS = (None, 4, 6, 8, 10, 12, 14, 16)


def network(card: str, bits: int | None, states: int | None = None, c2c: float | None = None,
            read_noise: float = 0.0, neuron_noise: float = 0.0):
    spec = load_card(card)
    changes: dict = {"read_noise": read_noise}
    if states is not None:
        changes.update(states=states, states_ltd=None)
    if c2c is not None:
        changes["c2c"] = c2c
    spec = dataclasses.replace(spec, **changes)
    cfg = NetworkConfig(hidden=(16,), activation=ActivationConfig(function="sigmoid", noise=neuron_noise),
                        output_activation=ActivationConfig(function="identity", noise=neuron_noise),
                        crossbar=CrossbarConfig(adc_bits=bits))
    return build_network(cfg, spec, (1, 8, 8), 10, seed=0)


def cosines(net, x, y, cfg, draws: int) -> list[str]:
    cells = []
    for layer in net.analog_layers:
        cb = layer.crossbar
        deltas = real_perturbations(net, layer, cfg)
        (g,) = linearized_gradients(net, [layer], x, y, "cross_entropy")
        driven = (layer.matrix_input(net(x, stop=list(net.stages).index(layer))) != 0).any(0)
        flat = driven[:, None].expand(-1, cb.out_features).reshape(-1).nonzero().squeeze(1)
        predicted = (g * deltas[0]).reshape(-1)[flat].double()
        d = expected_differences(net, layer, x, y, "cross_entropy", flat, deltas, draws)
        c, se = _cosine(d, predicted), _jackknife(d, predicted)
        if not se < 0.1:  # the average is still too noisy: the plain cosine, which the noise can only lower
            mean = d.mean(1)
            raw = float(mean @ predicted) / max(float(mean.norm() * predicted.norm()), 1e-300)
            cells.append(f"({raw:.2f})")
        else:
            cells.append(f"{max(-1.0, min(1.0, c)):.2f}" + (f"±{se:.2f}" if se > 0.01 else ""))
    try:
        check_linearized_validity(net, net.analog_layers, x, y, "cross_entropy", cfg)
        verdict = "ok"
    except ConfigError:
        verdict = "REFUSE"
    return [" / ".join(cells), verdict]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("cards", "states", "noise", "all"))
    ap.add_argument("--draws", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="", help="noise part: only these rows (comma-separated indexes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load()
    x, y = data.x_train[:32], data.y_train[:32]
    cfg = build(DGCConfig, {"mode": "linearized", "perturbation_pulses": 1})
    head = "| setting | " + " | ".join("ideal" if b is None else f"{b} bit" for b in BITS) + " |"
    rule = "|---|" + "---|" * len(BITS)
    t0 = time.perf_counter()

    def row(label: str, make) -> None:
        cells = []
        for bits in BITS:
            net = make(bits)
            has_noise = any(layer.activation.config.noise > 0 or layer.crossbar.spec.read_noise > 0
                            for layer in net.analog_layers)
            value, verdict = cosines(net, x, y, cfg, args.draws if has_noise else 1)
            cells.append(value if verdict == "ok" else f"{value} ✗")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

    if args.part in ("cards", "all"):
        print("\nShipped cards as they are (cycle-to-cycle noise of the card, no read or neuron noise)\n")
        print(head.replace("setting", "card (states)"))
        print(rule)
        for card in sorted(shipped_card_paths()):
            states = load_card(card).states
            row(f"{card} ({states})", lambda b, card=card: network(card, b))
    if args.part in ("states", "all"):
        print("\nag_asi, states overridden, cycle-to-cycle noise off\n")
        print(head.replace("setting", "states"))
        print(rule)
        for states in (16, 64, 256, 4096):
            row(str(states), lambda b, s=states: network("ag_asi", b, states=s, c2c=0.0))
    if args.part in ("noise", "all"):
        print(f"\nag_asi as shipped plus per-evaluation noise ({args.draws} draws)\n")
        print(head.replace("setting", "read noise, neuron noise"))
        print(rule)
        rows = ((0.0, 0.0), (0.01, 0.0), (0.03, 0.0), (0.1, 0.0), (0.0, 0.03), (0.0, 0.1), (0.03, 0.03))
        keep = {int(i) for i in args.rows.split(",")} if args.rows else set(range(len(rows)))
        for rn, nn in [r for i, r in enumerate(rows) if i in keep]:
            row(f"{rn}, {nn}", lambda b, rn=rn, nn=nn: network("ag_asi", b, read_noise=rn, neuron_noise=nn))
    print(f"\n# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
