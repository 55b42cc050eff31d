"""Torch operations and Python time per hardware-BP training step, by phase (issue #14's measure).

Op counts come from torch.profiler (every aten op, nested ones included, as ``key_averages`` counts them) and
are deterministic: they do not depend on the machine's load, unlike wall-clock times. So are the Python-level
calls (``--calls``: every call of a Python function or of a builtin from Python, as ``sys.setprofile`` sees
them), the measure of a step's glue: a Python function's call (a frame) costs about 0.2-0.6 µs here, by the
machine's phase, a builtin's (``is_contiguous``, ``isinstance``) a fraction of that. The phases are
``forward`` (``AnalogLayer.forward_bp``), ``cost`` (the cost and its gradient), ``backward``
(``AnalogLayer.backward_bp``), ``update`` (``Trainer.update_layers``: momentum and ``program_deltas``) and
``other`` (the rest of the step: the engine's events, the clock, neuron-circuit updates).

    python benchmarks/bp_ops.py [--sizes 784-256-128-10_b64,...] [--steps 20] [--top 25] [--threads 2]
                                [--cprofile] [--detail] [--time] [--calls]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import BP_ACTIVATION, BP_CROSSBAR, bp_contender, parse_size

from neurosim.architectures import NetworkConfig
from neurosim.crossbar import CrossbarConfig
from neurosim.data import DataConfig, load
from neurosim.layers import AnalogLayer
from neurosim.training import bp as bp_module
from neurosim.training.base import Trainer

PHASES = ("forward", "cost", "backward", "update")


@contextlib.contextmanager
def _phases_wrapped(around, phases=(("forward_bp", AnalogLayer, "forward"), ("backward_bp", AnalogLayer, "backward"),
                                    ("mean_cost_and_gradient", bp_module, "cost"),
                                    ("update_layers", Trainer, "update"))):
    """Wrap each phase's function: ``around(name)`` is a context manager entered around every call of the
    phase ``name``; the functions are restored afterwards."""
    saved = []
    for attr, owner, name in phases:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapped(*args, fn=fn, name=name, **kwargs):
            with around(name):
                return fn(*args, **kwargs)

        setattr(owner, attr, functools.wraps(fn)(wrapped))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def phase_marks():
    """Each phase's calls in a profiler range of its name."""
    return _phases_wrapped(lambda name: record_function(f"phase::{name}"))


def run_steps(trainer, steps: int, times: list[float] | None = None) -> None:
    """``steps`` training steps of the trainer's process (engine included), on its own data; each step's
    seconds appended to ``times`` when given."""
    data, batch = trainer.data, trainer.config.batch_size
    schemes = trainer.layer_schemes(1)

    def process():
        for i in range(steps):
            idx = torch.arange(i * batch, (i + 1) * batch) % len(data.x_train)
            t0 = time.perf_counter()
            yield from trainer.step(data.x_train[idx], data.y_train[idx], schemes)
            if times is not None:
                times.append(time.perf_counter() - t0)

    trainer.engine.start(process())


def phase_clocks(spent: dict[str, float]):
    """Add each phase's seconds into ``spent`` (the cost is not timed on its own: it is part of the step)."""

    @contextlib.contextmanager
    def clock(name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

    phases = (("forward_bp", AnalogLayer, "forward"), ("backward_bp", AnalogLayer, "backward"),
              ("update_layers", Trainer, "update"))
    return _phases_wrapped(clock, phases)


def time_steps(trainer, steps: int) -> None:
    """Least and median milliseconds of a step and of its phases, each step timed on its own (the least is
    the figure least disturbed by other processes)."""
    per_step: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(steps):
        spent: dict[str, float] = {}
        times: list[float] = []
        with phase_clocks(spent):
            run_steps(trainer, 1, times)
        per_step["step"].append(times[0])
        for k, v in spent.items():
            per_step[k].append(v)
    for k in ("step", "forward", "backward", "update"):
        v = sorted(per_step[k])
        print(f"{k}_ms_min = {1e3 * v[0]:.3f}")
        print(f"{k}_ms_median = {1e3 * v[len(v) // 2]:.3f}")


def phase_of(event) -> str:
    e = event
    while e is not None:
        if e.name.startswith("phase::"):
            return e.name[7:]
        e = e.cpu_parent
    return "other"


def count_ops(trainer, steps: int, top: int, detail: bool = False) -> None:
    with phase_marks(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps(trainer, steps)
    per_phase: dict[str, int] = collections.Counter()
    calls: dict[str, int] = collections.Counter()      # ops called from Python (not from inside another op)
    per_op: dict[str, int] = collections.Counter()
    top_ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in prof.events():
        if e.name.startswith("aten::"):
            phase = phase_of(e)
            per_phase[phase] += 1
            per_op[e.name] += 1
            if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"):
                calls[phase] += 1
                top_ops[phase][e.name] += 1
    total = sum(per_phase.values())
    print(f"aten_ops_per_step = {total / steps:.1f}")
    print(f"aten_calls_per_step = {sum(calls.values()) / steps:.1f}")
    for p in (*PHASES, "other"):
        print(f"aten_ops_per_step_{p} = {per_phase[p] / steps:.1f}")
        print(f"aten_calls_per_step_{p} = {calls[p] / steps:.1f}")
    if detail:
        for p in (*PHASES, "other"):
            print(f"# {p}: ops called from Python per step")
            for name, n in top_ops[p].most_common(top):
                print(f"#   {name:40s} {n / steps:7.1f}")
    print("# most frequent ops per step:")
    for name, n in per_op.most_common(top):
        print(f"#   {name:40s} {n / steps:7.1f}")


def count_calls(trainer, steps: int, top: int) -> None:
    """Python-level calls per step and phase (``sys.setprofile``'s 'call' and 'c_call' events), and the most
    frequent functions of each phase. Calls made by this script itself (the step loop, the phase wrappers)
    are not counted: the phase marker is a class of this file, so all of its calls are this file's."""
    phase = ["other"]
    calls = {p: collections.Counter() for p in (*PHASES, "other")}
    here = __file__

    class Inside:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            self.outer, phase[0] = phase[0], self.name

        def __exit__(self, *exc):
            phase[0] = self.outer

    def hook(frame, event, arg):
        code = frame.f_code
        if code.co_filename == here:
            return
        if event == "call":
            calls[phase[0]][f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})"] += 1
        elif event == "c_call":
            calls[phase[0]][f"[c] {getattr(arg, '__qualname__', arg)}"] += 1

    with _phases_wrapped(Inside):
        run_steps(trainer, 2)
        sys.setprofile(hook)
        try:
            run_steps(trainer, steps)
        finally:
            sys.setprofile(None)

    def functions(counter):   # calls of Python functions (a frame each, the dearer kind), builtins apart
        return sum(n for name, n in counter.items() if not name.startswith("[c]"))

    print(f"python_calls_per_step = {sum(sum(c.values()) for c in calls.values()) / steps:.1f}")
    print(f"python_function_calls_per_step = {sum(functions(c) for c in calls.values()) / steps:.1f}")
    for p, counter in calls.items():
        print(f"python_calls_per_step_{p} = {sum(counter.values()) / steps:.1f}  "
              f"(functions {functions(counter) / steps:.1f})")
    for p, counter in calls.items():
        print(f"# {p}: most frequent calls per step")
        for name, n in counter.most_common(top):
            print(f"#   {n / steps:7.1f}  {name}")


def python_profile(trainer, steps: int, top: int) -> None:
    pr = cProfile.Profile()
    pr.enable()
    run_steps(trainer, steps)
    pr.disable()
    stats = pstats.Stats(pr)
    print("# cProfile, cumulative ms per step:")
    for fn in ("forward_bp", "backward_bp", "update_layers", "program_deltas", "bp_gradients", "step"):
        rows = [(k, v) for k, v in stats.stats.items() if k[2] == fn]
        for k, v in rows:
            print(f"#   {fn:20s} {1e3 * v[3] / steps:7.3f}  ({Path(k[0]).name}:{k[1]})")
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="784-256-128-10_b64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--detail", action="store_true", help="the ops called from Python, per phase")
    parser.add_argument("--time", action="store_true", help="least and median ms per step and phase instead")
    parser.add_argument("--calls", action="store_true", help="Python-level calls per step and phase instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench_crossbar import device_spec

    data = load(DataConfig(name="synthetic", size=28, samples=5000, test_fraction=0.2), seed=0)
    for size in args.sizes.split(","):
        widths, batch = parse_size(size)
        net_cfg = NetworkConfig(hidden=widths[1:-1], activation=BP_ACTIVATION,
                                crossbar=CrossbarConfig(**BP_CROSSBAR))
        trainer = bp_contender(net_cfg, device_spec(), data, batch)
        run_steps(trainer, 5)   # warm-up: read caches, lazily made tensors
        print(f"# {size}, {args.steps} steps")
        if args.time:
            time_steps(trainer, args.steps)
            continue
        if args.calls:
            count_calls(trainer, args.steps, args.top)
            continue
        count_ops(trainer, args.steps, args.top, args.detail)
        if args.cprofile:
            python_profile(trainer, args.steps, args.top)


if __name__ == "__main__":
    main()
