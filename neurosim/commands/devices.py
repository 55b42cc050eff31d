"""``neurosim devices [CARD.toml ...]``: a table of the shipped device cards, or a check of a user's card."""

from __future__ import annotations

import argparse

from neurosim.device import DeviceSpec, load_card, shipped_cards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cards", nargs="*", metavar="CARD.toml",
                        help="card files to validate and show (default: every shipped card)")
    parser.add_argument("--sources", action="store_true", help="also print the citation of every number")


def _fmt_label(spec: DeviceSpec, polarity: str) -> str:
    if spec.table_ltp is not None:
        return "table"
    a = spec.a_ltp if polarity == "ltp" else spec.a_ltd
    if a is not None:
        return f"A={a:g}"
    label = spec.nl_ltp if polarity == "ltp" else spec.nl_ltd
    return f"{label:g}"


def table(specs: dict[str, DeviceSpec]) -> str:
    header = ("card", "name", "tech", "states", "G range (S)", "on/off", "NL ltp/ltd", "c2c", "read",
              "d2d Gmin/Gmax/NL", "stuck lo/hi", "drift nu", "source")
    rows = []
    for key, s in specs.items():
        states = f"{s.states}" if s.states_ltd in (None, s.states) else f"{s.states}/{s.states_ltd}"
        src = s.source.get("states") or s.source.get("g_max") or s.source.get("default", "")
        rows.append((key, s.name, s.technology, states, f"{s.g_min:.3g}-{s.g_max:.3g}", f"{s.on_off_ratio:.3g}",
                     f"{_fmt_label(s, 'ltp')}/{_fmt_label(s, 'ltd')}", f"{s.c2c:g}", f"{s.read_noise:g}",
                     f"{s.g_min_dtod:g}/{s.g_max_dtod:g}/{s.nl_dtod:g}",
                     f"{s.stuck_at_gmin:g}/{s.stuck_at_gmax:g}", f"{s.drift_nu:g}",
                     src if len(src) <= 60 else src[:57] + "..."))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    specs = {str(p): load_card(p) for p in args.cards} if args.cards else shipped_cards()
    print(table(specs))
    if args.sources:
        for key, s in specs.items():
            print(f"\n{key} ({s.name}):")
            for field, text in s.source.items():
                print(f"  {field}: {text}")
    if args.cards:
        print(f"\n{len(specs)} card(s) valid.")
    return 0
