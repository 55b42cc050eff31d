"""``neurosim crossbar``: one tile of a device, read and programmed, with the errors a user should expect."""

from __future__ import annotations

import argparse

import torch

from neurosim.backend import make_generator, resolve_device
from neurosim.config import ConfigError
from neurosim.crossbar import Crossbar, CrossbarConfig
from neurosim.device import load_card


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-card", default="ag_asi", help="shipped card name or card file (default ag_asi)")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=64)
    parser.add_argument("--dac-bits", type=int, default=8)
    parser.add_argument("--adc-bits", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu or cuda")


def run(args: argparse.Namespace) -> int:
    for field in ("rows", "cols"):
        if getattr(args, field) < 1:
            raise ConfigError(field, getattr(args, field), "must be >= 1")
    spec = load_card(args.device_card)
    dev = resolve_device(args.device)
    g = make_generator(args.seed, dev, "demo")
    w = (torch.rand(args.rows, args.cols, generator=g, device=dev) * 2 - 1) * 0.8
    x = torch.rand(256, args.rows, generator=g, device=dev)
    ideal = x @ w
    cfg = CrossbarConfig(tile_rows=args.rows, tile_cols=args.cols, dac_bits=args.dac_bits, adc_bits=args.adc_bits,
                         adc_range=float(ideal.abs().max()) * 1.1)
    bar = Crossbar(spec, args.rows, args.cols, cfg, seed=args.seed, name="demo", device=dev)
    print(f"device {spec.name} ({spec.technology}): {spec.states} states, G {spec.g_min:.3g}-{spec.g_max:.3g} S, "
          f"one {args.rows}x{args.cols} tile, DAC {args.dac_bits} b, ADC {args.adc_bits} b, on {dev}")
    stats = bar.write_verify(w, tolerance=0.02)
    devices = args.rows * args.cols * (2 if cfg.mapping == "differential" else 1)
    print(f"write-and-verify (tolerance 2% of w_max): {stats['iterations']} iterations, {stats['pulses']} pulses, "
          f"{stats['unconverged']} of {devices} devices still outside; weight error max {stats['max_error']:.4f} "
          f"mean {stats['mean_error']:.4f}")
    y = bar.read(x)
    rel = float((y - ideal).norm() / ideal.norm())
    print(f"read of 256 random inputs: relative error vs x·W = {rel:.4f}")
    target = w + 0.05
    before = bar.weights()
    step = bar.program_delta(target - before)
    got = bar.weights() - before
    print(f"update of +0.05 on every weight by pulses: {step['pulses']} pulses in {step['pulse_slots']} slots; "
          f"achieved mean {float(got.mean()):.4f}, spread {float(got.std()):.4f} (the controller counts pulses "
          f"for the nominal linear step; the device's nonlinearity decides what they do)")
    return 0
