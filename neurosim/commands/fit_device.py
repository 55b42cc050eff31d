"""``neurosim fit-device MEASURED.csv -o CARD.toml [--plot FIT.png]``: a device card fitted to measured pulse
trains (``neurosim.fitting``; the CSV layout is in docs/devices.md, "Bring your own device")."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="MEASURED.csv", help="device,cycle,polarity,pulse,conductance_<unit> rows")
    parser.add_argument("-o", "--output", metavar="CARD.toml", required=True, help="the card to write")
    parser.add_argument("--plot", metavar="FIT.png", help="also plot data, fitted curves and residuals")
    parser.add_argument("--units", help="unit of the conductance column (S, mS, uS, nS, pS), if its header has none")
    parser.add_argument("--name", help="the card's display name (default: the data file's name)")
    parser.add_argument("--technology", default="measured", help="the card's technology field")
    parser.add_argument("--table", action="store_true",
                        help="write a table card: the device follows the data's cycle mean instead of the exponential")


def run(args: argparse.Namespace) -> int:
    from neurosim.config import ConfigError, build, dump_toml, parse_toml
    from neurosim.device import DeviceSpec, _check_sources
    from neurosim.fitting import fit_card, plot_fit, read_measurements, table_card

    curves = read_measurements(args.data, args.units)
    fit = fit_card(curves, args.data, name=args.name, technology=args.technology)
    card = table_card(fit, args.data) if args.table else fit.card
    text = dump_toml(card)
    out = Path(args.output)
    data = parse_toml(text, str(out))
    _check_sources(data, build(DeviceSpec, data, source=str(out)), str(out))  # refuse a card the model would
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError("output", str(out), f"cannot write the card ({e.strerror})") from None
    shape = ("table" if args.table else f"labels {card['nl_ltp']:.3g} / {card['nl_ltd']:.3g}")
    print(f"{out}: g {card['g_min']:.4g} .. {card['g_max']:.4g} S, {card['states']} states, {shape}, "
          f"c2c {card['c2c']:.3g}, R^2 {fit.r2['ltp']:.4f} / {fit.r2['ltd']:.4f}")
    if args.plot:
        plot_fit(fit, args.plot, card if args.table else None)
        print(args.plot)
    return 0
