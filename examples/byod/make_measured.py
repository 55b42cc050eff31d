"""Make examples/byod/measured.csv, the worked example of docs/devices.md ("Bring your own device").

Not a measurement: the device model of neurosim itself (``neurosim.fitting.simulate_measurements``), driven
by the invented card below, for 4 devices x 5 cycles of 64 potentiation then 64 depression pulses, one pulse
at a time (seed 2026), readings rounded to 4 significant digits in microsiemens as an instrument would print
them. Because the parameters are known, the docs can show what the fit recovers.

    python examples/byod/make_measured.py [OUT.csv]
"""

from __future__ import annotations

import sys
from pathlib import Path

from neurosim.device import DeviceSpec
from neurosim.fitting import simulate_measurements

TRUE = DeviceSpec(name="example", g_min=1.0e-6, g_max=1.0e-5, states=65, nl_ltp=1.8, nl_ltd=3.0, c2c=0.015,
                  g_min_dtod=0.05, g_max_dtod=0.08, nl_dtod=0.4)
DEVICES, CYCLES, SEED = 4, 5, 2026


def main(out: str | Path) -> None:
    rows = simulate_measurements(TRUE, DEVICES, CYCLES, SEED)
    lines = ["device,cycle,polarity,pulse,conductance_uS"]
    lines += [f"{d},{c},{p},{k},{g * 1e6:.4g}" for d, c, p, k, g in rows]
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("measured.csv"))
