"""The state of a chip and of its trainer as plain arrays (a run file's /chip group), and back.

A chip is rebuilt from its scenario, which draws the same device-to-device parameters, faults and circuit
mismatch from the same seeds; what training changed is then put back: every device array's conductances,
programming times (drift ages), clock and write count, the controller's believed weights and momentum, the
neuron circuits' trainable coefficients, every random generator's state, the trainer's epoch and counters,
and the engine's clock, energy and counts. The result continues exactly as the original run would have (bit
for bit on CPU). The sampled parameters are stored as well (``collect`` returns them apart, to be written
once) so that a file describes its chip on its own; ``restore`` checks them against the rebuilt chip and
refuses a file whose chip this neurosim would not rebuild the same.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from neurosim.layers import AnalogLayer, AnalogNetwork, StepDropout
from neurosim.random_streams import PhiloxStream
from neurosim.training.base import Trainer

# Per-cell parameters of a DeviceArray sampled once at construction (DeviceArray.state_dict's names).
STATIC = ("g_min", "g_max", "a_ltp", "a_ltd", "step", "drift_nu", "stuck_low", "stuck_high")


class ChipMismatch(ValueError):
    """A checkpoint does not fit the chip its scenario builds (another network, or other sampled devices)."""


def _np(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.astype(np.uint8) if a.dtype == np.bool_ else a


def _arrays(layer: AnalogLayer) -> dict[str, Any]:
    cb = layer.crossbar
    return {"plus": cb.plus} if cb.minus is None else {"plus": cb.plus, "minus": cb.minus}


def network_generators(network: AnalogNetwork) -> dict[str, torch.Generator | PhiloxStream]:
    """Every random stream of a chip, by a stable name. Streams shared by several parts (a crossbar's read
    and pulse noise, both arrays of a pair) appear once."""
    out: dict[str, torch.Generator | PhiloxStream] = {}
    seen: set[int] = set()

    def add(name: str, g: torch.Generator | PhiloxStream) -> None:
        if id(g) not in seen:
            seen.add(id(g))
            out[name] = g

    for stage in network.stages:
        if isinstance(stage, AnalogLayer):
            add(f"{stage.name}.noise", stage.crossbar.noise_generator)
            add(f"{stage.name}.read_noise", stage.crossbar.read_stream)
            add(f"{stage.name}.rounding", stage.crossbar.rounding_stream)
            add(f"{stage.name}.pulses", stage.crossbar.pulse_stream)
            for side, array in _arrays(stage).items():
                add(f"{stage.name}.{side}.noise", array.noise_generator)
            for (stream, device), g in sorted(stage.activation._noise_gens.items()):
                add(f"{stage.name}.neurons.{stream}@{device}", g)
        elif isinstance(stage, StepDropout):
            add(f"{stage.name}.dropout", stage.generator)
    return out


def generators(trainer: Trainer) -> dict[str, torch.Generator]:
    """The chip's streams and the trainer's own ('trainer': DGC's draws, 'shuffle': the batch order)."""
    return {"trainer": trainer.generator, "shuffle": trainer.shuffle_generator,
            **network_generators(trainer.network)}


def stray_generators(trainer: Trainer) -> list[str]:
    """Generators reachable from the trainer that ``generators`` does not list (a checkpoint would miss them
    and a resumed run would not repeat): attribute paths, for tests and for whoever adds a random stream."""
    known = {id(g) for g in generators(trainer).values()}
    found, seen = [], set()
    stack: list[tuple[str, Any]] = [("trainer", trainer)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or isinstance(obj, torch.Tensor | str | bytes | int | float | type(None)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator | PhiloxStream):
            if id(obj) not in known:
                found.append(path)
            continue
        if isinstance(obj, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif isinstance(obj, nn.Module) or type(obj).__module__.startswith("neurosim"):
            fields = dict(getattr(obj, "__dict__", {}))
            fields.update({k: getattr(obj, k) for k in getattr(type(obj), "__slots__", ()) if hasattr(obj, k)})
            stack.extend((f"{path}.{k}", v) for k, v in fields.items())
    return sorted(found)


def _activation_config(unit) -> str:
    return json.dumps(dataclasses.asdict(unit.config), sort_keys=True)


def collect(trainer: Trainer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, sampled): the trees ``store.write_tree`` writes under /chip. ``state`` changes every epoch;
    ``sampled`` (device-to-device parameters and fault masks) never does."""
    net, eng = trainer.network, trainer.engine
    layers: dict[str, Any] = {}
    sampled: dict[str, Any] = {}
    for layer in net.analog_layers:
        arrays, params = {}, {}
        for side, a in _arrays(layer).items():
            arrays[side] = {"g": _np(a.g), "t_programmed": _np(a.t_programmed), "@time_s": float(a.time_s)}
            params[side] = {k: _np(getattr(a, k)) for k in STATIC}   # as held: a 0-d value means every cell
        unit = layer.activation
        layers[layer.name] = {
            "believed": _np(layer.crossbar.believed), "arrays": arrays,
            "activation": {"@config": _activation_config(unit),
                           **{k: _np(v) for k, v in unit.state_dict().items()}},
        }
        sampled[layer.name] = {"arrays": params}
    gens = {name: {"state": _np(g.get_state()), "@device": str(g.device)} for name, g in generators(trainer).items()}
    totals = eng.totals
    trainer_tree: dict[str, Any] = {
        "@epoch": int(trainer.epoch), "@activation_lr": float(trainer.activation_lr),
        "velocity": {name: _np(v) for name, v in trainer.velocity.items()},
        "layer_pulses": {f"@{name}": int(n) for name, n in trainer.layer_pulses.items()},
    }
    if hasattr(trainer, "stage"):
        trainer_tree["@stage"] = int(trainer.stage)
    engine_tree = {f"@{k}": v for k, v in totals.items()}
    engine_tree["last_epoch"] = {f"@{k}": v for k, v in eng._last_epoch.items()}
    state = {"@epoch": int(trainer.epoch), "@scheme": trainer.scheme,
             "@device": str(net.analog_layers[0].crossbar.device) if net.analog_layers else "cpu",
             "trainer": trainer_tree, "engine": engine_tree, "generators": gens, "layers": layers}
    return state, {"layers": sampled}


def _check_sampled(network: AnalogNetwork, sampled: dict[str, Any]) -> None:
    for layer in network.analog_layers:
        stored = sampled.get(layer.name, {}).get("arrays", {})
        for side, a in _arrays(layer).items():
            for k in STATIC:
                value = stored.get(side, {}).get(k)
                if value is None or not np.array_equal(np.asarray(value), _np(getattr(a, k))):
                    raise ChipMismatch(f"layer '{layer.name}' ({side}): the stored '{k}' differs from the chip this "
                                       "neurosim builds from the file's scenario (a file of another version?)")


def restore_network(network: AnalogNetwork, state: dict[str, Any], streams: bool = True) -> None:
    """The chip part of ``restore``: device arrays, believed weights, neuron circuits and (``streams``) the
    chip's random streams, into a network freshly built from the same scenario."""
    layers = state.get("layers", {})
    names = [layer.name for layer in network.analog_layers]
    if sorted(layers) != sorted(names):
        raise ChipMismatch(f"the checkpoint has layers {sorted(layers)}, the scenario's network {sorted(names)}")
    _check_sampled(network, layers)
    for layer in network.analog_layers:
        saved = layers[layer.name]
        cb = layer.crossbar
        for side, a in _arrays(layer).items():
            s = saved["arrays"][side]
            for k in ("g", "t_programmed"):
                if tuple(s[k].shape) != tuple(getattr(a, k).shape):
                    raise ChipMismatch(f"layer '{layer.name}' ({side}): '{k}' of shape {s[k].shape}, the chip's "
                                       f"{tuple(getattr(a, k).shape)}")
            a.g = torch.from_numpy(np.ascontiguousarray(s["g"])).to(device=a.device, dtype=a.dtype)
            a.t_programmed = torch.from_numpy(np.ascontiguousarray(s["t_programmed"])).to(a.device, a.dtype)
            a.time_s = float(s["@time_s"])
            # The write count is a cache key only (Crossbar caches its read tensors by it): a new one makes any
            # cache of the rebuilt chip stale, whatever it had read before.
            a.version += 1
        cb.believed.copy_(torch.from_numpy(saved["believed"]).to(cb.device, cb.dtype))  # in place: layers alias it
        layer.sync_believed()
        _restore_activation(layer, saved["activation"])
    if streams:
        _restore_streams(network_generators(network), network, state.get("generators", {}), skip=("trainer",
                                                                                                 "shuffle"))


def _restore_streams(gens: dict[str, torch.Generator | PhiloxStream], network: AnalogNetwork,
                     saved: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    missing = sorted(set(gens) - set(saved) - set(skip))
    if missing:   # left as seeded, the run would go on with other numbers than the interrupted one
        raise ChipMismatch(f"the checkpoint lacks the random stream(s) {', '.join(missing)} of this chip "
                           "(written by another version of neurosim?): it cannot continue the same run")
    for name, g in saved.items():
        if name in skip:
            continue
        target = gens.get(name)
        if target is None and ".neurons." in name:    # created on first use: make it, then set its state
            layer_name, rest = name.split(".neurons.", 1)
            stream, device = rest.split("@", 1)
            unit = next(layer for layer in network.analog_layers if layer.name == layer_name).activation
            target = unit._generator(stream, torch.device(device))
        if target is None:
            raise ChipMismatch(f"the checkpoint has a random stream '{name}' this chip does not")
        dtype = np.int64 if isinstance(target, PhiloxStream) else np.uint8   # (key, counter) or torch's bytes
        target.set_state(torch.from_numpy(np.asarray(g["state"], dtype=dtype)))


def restore(trainer: Trainer, state: dict[str, Any], history: list[dict[str, Any]] | None = None,
            streams: bool = True) -> None:
    """Put a checkpoint (``collect``'s trees, as read back: the sampled parameters under ``layers`` too) into
    a trainer freshly built from the same scenario, whose engine has not run yet. ``history``: the metrics
    rows of the epochs done (the run file's /metrics). ``streams=False``: leave the random streams as seeded
    (a chip moved to another kind of device, whose generators have another state format)."""
    net, eng = trainer.network, trainer.engine
    restore_network(net, state, streams)
    if streams:
        saved = state.get("generators", {})
        _restore_streams({"trainer": trainer.generator, "shuffle": trainer.shuffle_generator}, net,
                         {k: v for k, v in saved.items() if k in ("trainer", "shuffle")})
    t = state["trainer"]
    trainer.epoch = int(t["@epoch"])
    trainer.activation_lr = float(t["@activation_lr"])
    if "@stage" in t:
        trainer.stage = int(t["@stage"])
    device = net.analog_layers[0].crossbar.device if net.analog_layers else torch.device("cpu")
    trainer.velocity = {k: torch.from_numpy(v).to(device) for k, v in t.get("velocity", {}).items()}
    trainer.layer_pulses.update({k[1:]: int(v) for k, v in t.get("layer_pulses", {}).items() if k.startswith("@")})
    trainer.history = [dict(row) for row in (history or [])]
    _restore_engine(eng, state["engine"], trainer.history)


def _restore_activation(layer: AnalogLayer, saved: dict[str, Any]) -> None:
    """Neuron circuits: the realization the run had switched to (two-stage's Taylor stage), then every
    buffer and trainable coefficient."""
    unit = layer.activation
    stored = json.loads(saved["@config"])
    current = dataclasses.asdict(unit.config)
    if stored != json.loads(json.dumps(current)):
        changes = {}
        for k, v in stored.items():
            if json.loads(json.dumps(current.get(k))) != v:
                changes[k] = tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
        unit.set_mode(**changes)
        layer.activation_config = unit.config
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in saved.items() if not k.startswith("@")}
    try:
        unit.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ChipMismatch(f"layer '{layer.name}': neuron circuits: {e}") from None


def _restore_engine(eng, saved: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """The clock, energy and counts. The engine keeps them privately (it has no restore of its own); the
    clock moves by simpy's own ``run(until=...)``, which lands on the stored time exactly."""
    if eng.env.now != 0 or eng._log:
        raise RuntimeError("restore needs an engine that has not run yet")
    now = float(saved["@time_s"])
    if now > 0:
        eng.env.run(until=now)
    eng._energy = float(saved["@energy_j"])
    eng._counts = {k: int(saved[f"@{k}"]) for k in eng._counts}
    eng._last_epoch = {k[1:]: v for k, v in saved["last_epoch"].items() if k.startswith("@")}
    if eng.enabled:
        keys = ["epoch", *eng._last_epoch, *(f"delta_{k}" for k in eng._last_epoch)]
        eng.epochs = [{k: row[k] for k in keys if k in row} for row in history]


def drain_events(engine) -> np.ndarray:
    """The events logged since the last call (EVENT_DTYPE), and forget them: a run file takes the trace
    epoch by epoch, so the engine's log never grows with the run (it has no public way to drop it)."""
    events = engine.events()
    engine._log.clear()
    return events


__all__ = ["STATIC", "ChipMismatch", "collect", "drain_events", "generators", "network_generators", "restore",
           "restore_network", "stray_generators"]
