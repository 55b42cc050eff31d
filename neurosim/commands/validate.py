"""``neurosim validate SCENARIO.toml [--set KEY=VALUE ...] [--print]``: check a scenario file without running it.

Everything a run would refuse at its start is refused here, with the same one line and exit status 2: the
tables' types and bounds, unknown keys, the card, the data files, the checks across tables. On success it
prints a short summary of the resolved scenario, or (``--print``) the resolved scenario as TOML.
"""

from __future__ import annotations

import argparse

from neurosim.config import ConfigError, parse_sets
from neurosim.scenario import Scenario, load_scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO.toml", help="the scenario file")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="set a field (dotted, e.g. device.overrides.step_dtod=0.05) or a link "
                             "(variation=0.3); VALUE is a TOML literal, a bare word a string; repeatable")
    parser.add_argument("--print", dest="print_toml", action="store_true",
                        help="print the resolved scenario as TOML (card included) instead of the summary")


def summary(s: Scenario, path: str) -> str:
    """A few lines a user reads to see that the file says what they meant."""
    card = s.card()
    net, tr, d = s.network, s.training, s.data
    shape = s.input_shape()
    inputs = shape[0] * shape[1] * shape[2] if shape else "?"
    if net.architecture == "mlp":
        layout = "-".join(str(w) for w in (inputs, *net.hidden, d.classes or "?"))
    else:
        layout = f"{len(s.layer_names())} analog layers"
    act = net.activation
    mismatch = f", gain sigma {act.gain_dtod:g}, offset sigma {act.offset_dtod:g}" if act.has_variation else ""
    overrides = ", ".join(f"{k} = {v!r}" for k, v in s.device.overrides.items()) or "none"
    epochs = (f"{tr.two_stage.stage1_epochs} + {tr.two_stage.stage2_epochs} epochs" if tr.scheme == "two_stage"
              else f"{tr.epochs} epochs")
    schemes = f" (layers: {', '.join(tr.hybrid.layer_schemes)})" if tr.scheme == "hybrid" else ""
    data_shape = f"{shape[1]}×{shape[2]}×{shape[0]}" if shape else "as stored"
    lines = [
        f"{path}: valid",
        f"  name         {s.name or '(none)'}{': ' + s.description if s.description else ''}",
        f"  seed         {s.seed} (streams chip, data, shuffle, noise derived from it)",
        f"  device       {s.device.card} ({card.name}, {card.technology}, {card.states} states, "
        f"{card.g_min:.3g}..{card.g_max:.3g} S); overrides: {overrides}",
        f"  network      {net.architecture} {layout}, {act.function} circuits{mismatch}; crossbar "
        f"{net.crossbar.mapping} {net.crossbar.tile_rows}×{net.crossbar.tile_cols}",
        f"  data         {d.name} {data_shape}, {d.classes or '?'} classes"
        f"{f', first {d.limit} training samples' if d.limit else ''}",
        f"  training     {tr.scheme}{schemes}, {epochs}, batch {tr.batch_size}, learning rate "
        f"{tr.learning_rate:g}, momentum {tr.momentum:g}",
        f"  hardware     pulse {s.hardware.pulse_s:.3g} s, {s.hardware.pulse_j:.3g} J per cell",
    ]
    for name, link in s.links.items():
        lines.append(f"  link         {name} = {link.value!r} sets {len(link.fields)} fields")
    lines.append(f"  derived      {', '.join(s.derived) or 'none'}")
    lines.append(f"  fingerprint  {s.fingerprint()[:16]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        sets = parse_sets(args.sets)
    except ConfigError as e:
        raise e.within("", args.scenario) from None
    scenario = load_scenario(args.scenario, sets)
    print(scenario.to_toml() if args.print_toml else summary(scenario, args.scenario), end="" if
          args.print_toml else "\n")
    return 0
