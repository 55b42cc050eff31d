"""``neurosim demo``: BP, DGC and hybrid training of an MLP on the bundled digits at a few variation levels.

One variation level σ sets every device-to-device spread of the card (g_min, g_max, nonlinearity, step) and
the mismatch of the neuron circuits (gain σ, offset σ/2) and of the derivative circuits (gain σ, offset σ/2):
the experiment of Kim et al. 2021 in miniature. The table shows what a user of this simulator asks: how
accurate, how long on the chip, how much energy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.backend import resolve_device
from neurosim.config import ConfigError, build
from neurosim.data import DataConfig, load
from neurosim.device import DeviceSpec, load_card
from neurosim.training import TrainerConfig, make_trainer, needs_derivative_circuits

SCHEMES = ("bp", "dgc", "hybrid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller grid that finishes in under a minute")
    parser.add_argument("--device-card", default="ecram_liwo3", help="shipped card name or card file")
    parser.add_argument("--levels", default=None, help="variation levels, comma separated (default 0,0.1,0.3)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="schemes, comma separated")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5, quick 3)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden-layer width of the MLP")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")


def with_variation(spec: DeviceSpec, sigma: float) -> DeviceSpec:
    return dataclasses.replace(spec, g_min_dtod=sigma, g_max_dtod=sigma, nl_dtod=sigma, step_dtod=sigma)


def circuits(sigma: float) -> ActivationConfig:
    return ActivationConfig(function="sigmoid", gain_dtod=sigma, offset_dtod=sigma / 2,
                            derivative_gain_dtod=sigma, derivative_offset_dtod=sigma / 2)


def _parse_list(text: str, field: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(field, text, "must be a comma-separated list") from None
    if not values:
        raise ConfigError(field, text, "must not be empty")
    return values


def run(args: argparse.Namespace) -> int:
    levels = _parse_list(args.levels, "--levels") if args.levels else ([0.0, 0.3] if args.quick else
                                                                       [0.0, 0.1, 0.3])
    if any(v < 0 for v in levels):
        raise ConfigError("--levels", args.levels, "variation levels must be >= 0")
    schemes = _parse_list(args.schemes, "--schemes", str)
    for s in schemes:
        if s not in SCHEMES:
            raise ConfigError("--schemes", s, f"must be among {', '.join(SCHEMES)}")
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 5)
    if epochs < 1 or args.hidden < 1:
        raise ConfigError("--epochs" if epochs < 1 else "--hidden", epochs if epochs < 1 else args.hidden,
                          "must be >= 1")
    device = resolve_device(args.device)
    spec = load_card(args.device_card)
    data = load(build(DataConfig, {"limit": 720 if args.quick else 0}), seed=args.seed).to(device)
    print(f"neurosim demo: MLP {data.image_shape[1] * data.image_shape[2]}-{args.hidden}-{data.classes} on the "
          f"bundled digits ({len(data.x_train)} train / {len(data.x_test)} test), device '{spec.name}' "
          f"({spec.states} states), {epochs} epochs, on {device}")
    print("variation = sigma of every device-to-device spread (relative; the nonlinearity's in label units) and "
          "of neuron/derivative-circuit gain (offset sigma/2)\n")
    header = f"{'variation':>9}  {'scheme':<7} {'test acc':>8}  {'sim time (ms)':>13}  {'energy (uJ)':>11}  " \
             f"{'pulses':>10}  {'perturbations':>13}  {'wall (s)':>8}"
    print(header)
    print("-" * len(header))
    for sigma in levels:
        for scheme in schemes:
            net_cfg = NetworkConfig(hidden=(args.hidden,), activation=circuits(sigma))
            cfg = build(TrainerConfig, {"scheme": scheme, "epochs": epochs, "learning_rate": 1.0,
                                        "momentum": 0.5})
            net = build_network(net_cfg, with_variation(spec, sigma), data.image_shape, data.classes,
                                seed=args.seed, device=device, derivative_circuits=needs_derivative_circuits(cfg))
            start = time.perf_counter()
            row = make_trainer(net, data, cfg, seed=args.seed).fit()[-1]
            wall = time.perf_counter() - start
            print(f"{sigma:>9.2f}  {scheme:<7} {row['test_accuracy']:>8.3f}  {row['sim_time_s'] * 1e3:>13.2f}  "
                  f"{row['energy_j'] * 1e6:>11.2f}  {row['pulses']:>10d}  {row['perturbations']:>13d}  "
                  f"{wall:>8.1f}", flush=True)
    print("\nsim time and energy: the chip's own clock and energy for the whole training (see docs/engine.md).")
    return 0
