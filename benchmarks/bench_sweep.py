"""What a sweep costs beyond its runs: the speed-up of 2 local Dask workers over one process, and the time from
the command to the first finished point.

One figure a line as ``name = value`` (lines starting with ``#`` are comments). Every sweep is the real command
(``neurosim sweep``) in a fresh process, timed from its start to its exit, into a fresh folder; the contenders
alternate their order from repeat to repeat, so a disturbance from another process hits all alike; medians over
the repeats. The points: 8 DGC runs of scenarios/variation_tolerance.toml (variation 0, 0.1, 0.2, 0.3 × 2 seeds,
10 epochs each, --epochs), of equal size, so that the figure measures the executor rather than how unequal
points pack onto workers.

  sweep_serial_s              the points one after another in the command's process, torch's default threads
                              (all cores: DGC's batched arithmetic uses them)
  sweep_serial_1thread_s      the same with one torch thread (OMP_NUM_THREADS=1): one core
  sweep_workers2_s            the points on 2 Dask workers of a LocalCluster the command starts, 1 torch thread
                              each (cores ÷ workers on 2 cores)
  sweep_workers2_vs_serial    sweep_serial_s / sweep_workers2_s: what --workers 2 gains over the default
  sweep_workers2_vs_serial_1thread  sweep_serial_1thread_s / sweep_workers2_s: the executor's own scaling
                              (goal >= 1.7), every point on one core in both
  first_point_s_<how>         from the command's start to the first point's run file in DIR/points
  first_point_overhead_s_<how>  that minus the point's own epochs (its wall_time_s in the summary): the start of
                              Python, torch and neurosim, the plan, the cluster, building the chip, the commits
                              and the delivery (goal < 5 s)

    python benchmarks/bench_sweep.py [--repeats N] [--points 8] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "variation_tolerance.toml"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def grid(points: int, epochs: int) -> list[str]:
    levels = ["0", "0.1", "0.2", "0.3", "0.05", "0.15", "0.25", "0.35"][: max(1, points // 2)]
    return ["--grid", "variation=" + ",".join(levels), "--grid", "training.scheme=dgc",
            "--grid", "training.bp.backward=transposed_read", "--seeds", "2", "--set", f"training.epochs={epochs}"]


def sweep(folder: Path, args: list[str], env: dict[str, str], points: int, epochs: int
          ) -> tuple[float, float, float]:
    """(total s, s to the first finished point, that point's own epochs s) of one `neurosim sweep`."""
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "neurosim.cli", "sweep", str(SCENARIO), "-o", str(folder), "--quiet",
           *grid(points, epochs), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**ENV, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, name = None, None
    while proc.poll() is None:
        if first is None and (folder / "points").exists():
            done = [p for p in (folder / "points").glob("*.h5")]
            if done:
                first, name = time.perf_counter() - t0, done[0].name
        time.sleep(0.005)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"neurosim sweep failed: {proc.stderr.read().decode()}")
    if first is None:   # finished between two looks
        first, name = total, sorted((folder / "points").glob("*.h5"))[0].name
    with h5py.File(folder / "summary.h5") as f:
        table = f["summary"][()]
    own = float(table["wall_time_s"][[p.decode() for p in table["point"]].index(name)])
    return total, first, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per point (the size of a point)")
    args = parser.parse_args()
    print(f"# {args.points} points of {SCENARIO.name} with {args.epochs} epochs each, {args.repeats} repeats, "
          f"{os.cpu_count()} cores")
    hows = {"serial": (["--workers", "0"], {}), "serial_1thread": (["--workers", "0"], {"OMP_NUM_THREADS": "1"}),
            "workers2": (["--workers", "2"], {})}
    runs: dict[str, list[tuple[float, float, float]]] = {h: [] for h in hows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(hows)[r % len(hows):] + list(hows)[:r % len(hows)]
            for how in order:
                runs[how].append(sweep(Path(tmp) / how, *hows[how], args.points, args.epochs))
                print(f"# repeat {r + 1} {how}: {runs[how][-1][0]:.2f} s", flush=True)
    med = {how: statistics.median(t for t, _, _ in runs[how]) for how in hows}
    for how in hows:
        print(f"sweep_{how}_s = {med[how]:.2f}")
    print(f"sweep_workers2_vs_serial = {med['serial'] / med['workers2']:.2f}")
    print(f"sweep_workers2_vs_serial_1thread = {med['serial_1thread'] / med['workers2']:.2f}")
    for how in hows:
        first = statistics.median(f for _, f, _ in runs[how])
        overhead = statistics.median(f - own for _, f, own in runs[how])
        print(f"first_point_s_{how} = {first:.2f}")
        print(f"first_point_overhead_s_{how} = {overhead:.2f}")


if __name__ == "__main__":
    main()
