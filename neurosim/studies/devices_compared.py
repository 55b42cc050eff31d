"""Devices compared: on-chip BP training of one MLP on every shipped device card, accuracy, chip time and energy
per card, in the spirit of the MLP+NeuroSim V3.0 device table (scenarios/studies/devices_compared.toml).

The card axis of the sweep is every card installed with the package (``neurosim.device.shipped_card_paths``),
so a new card joins the table by being shipped. The table puts each card's published parameters (states,
nonlinearity labels, cycle-to-cycle noise, on/off ratio, pulse width) next to its results, ranked by accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from neurosim import studies

NAME = "devices_compared"
TITLE = "Devices compared: on-chip training of an MLP with every shipped device card"
PAPER = ("P.-Y. Chen, X. Peng, S. Yu, \"NeuroSim: A Circuit-Level Macro Model for Benchmarking Neuro-Inspired "
         "Architectures in Online Learning\", IEEE TCAD 37(12), 3067 (2018), doi 10.1109/TCAD.2018.2789723; "
         "MLP+NeuroSim V3.0, github.com/neurosim/MLP_NeuroSim_V3.0")
SCENARIOS = ["devices_compared.toml"]
RUNTIME = {"ci": "10 s", "default": "2 min", "full": "~15 min (estimated)"}

PLAN = {
    "ci": {"seeds": 1, "sets": {"training.epochs": 1, "data.limit": 32}},
    "default": {"seeds": 5, "sets": {}},
    "full": {"seeds": 10, "sets": {"training.epochs": 20}},
}


def _card_facts(name: str) -> dict:
    """The card's published parameters as the table shows them."""
    from neurosim.device import load_card, shipped_card_paths

    spec = load_card(shipped_card_paths()[name])
    states_ltd = spec.states_ltd or spec.states
    return {"card": name, "device": spec.name, "technology": spec.technology,
            "states": spec.states if states_ltd == spec.states else f"{spec.states}/{states_ltd}",
            "NL (LTP/LTD)": f"{spec.nl_ltp:g}/{spec.nl_ltd:g}", "c2c": f"{spec.c2c:g}",
            "on/off": f"{spec.g_max / spec.g_min:.3g}",
            "pulse width (s)": "-" if spec.pulse_width is None else f"{spec.pulse_width:g}"}


def run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False,
        log=print) -> list[Path]:
    """Train the MLP on every shipped card at ``size`` into ``out``; write the table and the figure."""
    from neurosim.analysis import plot_bars, summary_table
    from neurosim.device import shipped_card_paths

    studies.check_size(size)
    out = Path(out)
    plan = PLAN[size]
    cards = sorted(shipped_card_paths())
    frame = studies.sweep(studies.scenario_path("devices_compared.toml"), studies.sweep_folder(out, "cards", size),
                          grid={"device.card": cards}, seeds=plan["seeds"], sets=plan["sets"], workers=workers,
                          progress=progress, log=log)
    table = summary_table(frame).sort_values("final_test_accuracy_mean", ascending=False, kind="stable")
    table = table.reset_index(drop=True)
    rows, numbers = [], []
    for rank, r in enumerate(table.to_dict("records"), start=1):
        facts = _card_facts(r["device.card"])
        rows.append({"rank": rank, **facts, "seeds": r["n"],
                     "final accuracy": studies.mean_std(r["final_test_accuracy_mean"], r["final_test_accuracy_std"]),
                     "chip time (s)": studies.mean_std(r["sim_time_s_mean"], r["sim_time_s_std"], ".3g"),
                     "energy (µJ)": studies.mean_std(r["energy_j_mean"], r["energy_j_std"], ".3g", 1e6),
                     "pulses": f"{r['pulses_mean']:.3g}"})
        numbers.append({"rank": rank, **facts, "seeds": r["n"],
                        **{f"{s}_{m}": r[f"{s}_{m}"] for s in ("final_test_accuracy", "best_test_accuracy",
                                                               "sim_time_s", "energy_j", "pulses")
                           for m in ("mean", "std")}})
    paths = studies.write_table(
        pd.DataFrame(rows), out, "devices", csv_frame=pd.DataFrame(numbers),
        title=f"On-chip BP training of a 64-16-10 MLP on the digits, every shipped card, mean ± sample std over "
              f"{plan['seeds']} seeds, ranked by final test accuracy",
        notes=["NL: NeuroSim nonlinearity labels of potentiation/depression (0 = linear); c2c: cycle-to-cycle "
               "sigma of a pulse's step, fraction of the window; chip time and energy: the whole training "
               "(reads, converters, neurons, digital controller, programming pulses)."])
    table = table.rename(columns={"device.card": "card"})
    fig = plot_bars(table, "card", ["final_test_accuracy", "sim_time_s", "energy_j"],
                    ylabels=["final test accuracy", "chip time (s)", "energy (J)"], logy=["sim_time_s", "energy_j"],
                    title=f"On-chip training of a 64-16-10 MLP per device card (digits), mean ± std over "
                          f"{plan['seeds']} seeds")
    paths.append(studies.save_figure(fig, out / "devices.png"))
    return paths
