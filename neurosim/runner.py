"""A scenario becomes a run: the one place that assembles data, network, trainer, engine and run file.

``run(scenario)`` trains the chip the scenario describes and writes one HDF5 run file (``neurosim.store``):
per-epoch metrics, the engine's event trace, traces per layer, and after every epoch a checkpoint of the chip
and its trainer (``neurosim.chip_state``), each epoch committed atomically. Run again on the same output, it
resumes an unfinished run from its last complete epoch, and the numbers are those of an uninterrupted run (bit
for bit on CPU); a finished run is not redone. ``load_chip(path)`` rebuilds a trained chip from a run file.
The CLI (``neurosim run``), the demo and sweeps call this module and stay thin.

Seeds: every random part draws from a stream derived from the scenario's one ``seed``
(``Scenario.stream``): 'chip' builds the network (device-to-device sampling, faults, circuit mismatch, initial
weights, and the chip's noise streams), 'data' splits the data set, 'trainer' seeds the trainer (its DGC and
shuffle streams). Changing one stream's consumer does not shift the others.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from neurosim import __version__, chip_state
from neurosim.architectures import build_network
from neurosim.backend import resolve_device
from neurosim.config import ConfigError
from neurosim.crossbar import noise_variance_precision
from neurosim.data import Dataset, load
from neurosim.layers import AnalogNetwork
from neurosim.scenario import Scenario, apply_sets, load_scenario, loads_scenario
from neurosim.store import Commit, RunFile, RunFileError, RunWriter, metric_columns
from neurosim.training import Trainer, make_trainer


@dataclass
class Chip:
    """A chip and what trains it: the network (call it for inference), its trainer (``run_epochs`` trains
    further, continuing the run's random streams, clock and energy), the data set (None when not loaded),
    the scenario it came from and the epochs it has been trained."""

    network: AnalogNetwork
    trainer: Trainer | None
    data: Dataset | None
    scenario: Scenario
    epoch: int = 0


class Run(RunFile):
    """A run: its run file (every ``RunFile`` accessor: metrics, history, events, traces, checkpoint) and
    the trained chip (``network``, ``trainer``), rebuilt from the file when the run was not done here."""

    def __init__(self, path: str | os.PathLike, chip: Chip | None = None, resumed_from: int | None = None):
        super().__init__(path)
        self._chip = chip
        self.resumed_from = resumed_from   # the epoch an interrupted run resumed from (None: not resumed)

    @property
    def chip(self) -> Chip:
        if self._chip is None:
            self._chip = load_chip(self.path)
        return self._chip

    @property
    def network(self) -> AnalogNetwork:
        return self.chip.network

    @property
    def trainer(self) -> Trainer | None:
        return self.chip.trainer

    @property
    def scenario(self) -> Scenario:
        return self.chip.scenario


# ---- the scenario as text (interface to neurosim.scenario) ----------------------------------------------------

def scenario_text(scenario: Scenario) -> str:
    """The resolved scenario as TOML (card contents included): what a run file keeps."""
    return scenario.to_toml()


def scenario_from_text(text: str, source: str) -> Scenario:
    """A scenario from the TOML text a run file keeps."""
    return loads_scenario(text, source=source)


def identity(scenario: Scenario) -> str:
    """What makes two runs the same run: the resolved scenario, output path aside (a run may be renamed)."""
    plain = dataclasses.replace(scenario, output=dataclasses.replace(scenario.output, path=""))
    return hashlib.sha256(scenario_text(plain).encode()).hexdigest()


# ---- building ------------------------------------------------------------------------------------------------

def total_epochs(scenario: Scenario) -> int:
    t = scenario.training
    return t.two_stage.stage1_epochs + t.two_stage.stage2_epochs if t.scheme == "two_stage" else t.epochs


def build_chip(scenario: Scenario, device: torch.device | str | None = None, data: Dataset | None = None,
               shape: tuple[tuple[int, int, int], int] | None = None) -> Chip:
    """A fresh chip and trainer from a scenario, seeded from its streams. ``shape`` ((C, H, W), classes)
    builds the chip without its data set (inference only: no trainer)."""
    device = resolve_device(device or scenario.runtime.device)
    if data is None and shape is None:
        data = load(scenario.data, seed=scenario.stream("data")).to(device)
    image_shape, classes = (data.image_shape, data.classes) if data is not None else shape
    t = scenario.training
    # DGC measures the chip and needs no derivative circuits; every other scheme may run BP.
    net = build_network(scenario.network, scenario.card(), image_shape, classes, seed=scenario.stream("chip"),
                        device=device, derivative_circuits=t.scheme != "dgc")
    trainer = None
    if data is not None:
        trainer = make_trainer(net, data, t, hardware=scenario.hardware, seed=scenario.stream("trainer"))
    return Chip(net, trainer, data, scenario)


def _train(trainer: Trainer, scenario: Scenario) -> None:
    """The epochs still to do. Two-stage: the switch to Taylor circuits happens once, between the stages
    (TwoStageTrainer.fit's order), so a run resumed in stage 2 keeps its trained coefficients."""
    t = scenario.training
    if t.scheme != "two_stage":
        trainer.run_epochs(t.epochs - trainer.epoch)
        return
    ts = t.two_stage
    if trainer.epoch < ts.stage1_epochs:
        trainer.stage = 1
        trainer.run_epochs(ts.stage1_epochs - trainer.epoch, stage="stage1")
    if trainer.stage == 1:
        trainer.switch_to_taylor()
        trainer.stage = 2
    trainer.run_epochs(ts.stage1_epochs + ts.stage2_epochs - trainer.epoch, stage="stage2")


# ---- what a run file records ---------------------------------------------------------------------------------

def _traces(chip: Chip, epoch: int, last: int) -> tuple[list, dict]:
    """Trace rows of one epoch (epoch 0: the chip as initialized) and the fixed datasets (histogram edges)."""
    cfg, trainer = chip.scenario.traces, chip.trainer
    rows, fixed = [], {}
    for layer in chip.network.analog_layers:
        cb, name = layer.crossbar, layer.name
        arrays = [cb.plus] if cb.minus is None else [cb.plus, cb.minus]
        if cfg.histogram_bins:
            # Fixed edges for the whole run: every cell's window, from 0 where conductances drift below it.
            lo = 0.0 if cb.spec.drift_nu > 0 else min(float(a.g_min.min()) for a in arrays)
            hi = max(float(a.g_max.max()) for a in arrays)
            counts = np.stack([torch.histc(a.conductance()[: cb.in_features, : cb.out_features].double(),
                                           cfg.histogram_bins, lo, hi).cpu().numpy() for a in arrays])
            rows.append((f"{name}/histogram", epoch, counts.astype(np.int64),
                         {"units": "cells", "arrays": ",".join(("plus", "minus")[: len(arrays)]),
                          "doc": "cells per conductance bin (drift included, read noise not), one row per array; "
                                 f"edges in {name}/histogram_edges"}, False))
            fixed[f"{name}/histogram_edges"] = (np.linspace(lo, hi, cfg.histogram_bins + 1),
                                                {"units": "S", "doc": "bin edges, equal widths"})
        if cfg.pulses and trainer is not None:
            rows.append((f"{name}/pulses", epoch, np.int64(trainer.layer_pulses[name]),
                         {"units": "pulses", "doc": "weight-update pulses fired on the layer's devices since the "
                                                    "start (cumulative; DGC's perturbation pulses not included)"},
                         False))
        if epoch in cfg.weight_epochs or (-1 in cfg.weight_epochs and epoch == last):
            rows.append((f"{name}/weights", epoch, cb.weights().detach().cpu().numpy().astype(np.float32),
                         {"units": "1", "w_max": cb.config.w_max,
                          "doc": "weights the conductances hold (noise-free, drift included), (in, out) with "
                                 "the bias row last"}, True))
        if cfg.coefficients:
            unit = layer.activation
            for pname in ("coefficients", "prelu_slope"):
                value = getattr(unit, pname, None)
                if isinstance(value, torch.Tensor):
                    rows.append((f"{name}/{pname}", epoch, value.detach().cpu().numpy().astype(np.float64),
                                 {"units": "1", "doc": "neuron-circuit " + ("polynomial coefficients, lowest "
                                  "order first" if pname == "coefficients" else "PReLU slope")}, False))
    return rows, fixed


def _root_attrs(scenario: Scenario, text: str, device: torch.device, data: Dataset) -> dict[str, Any]:
    net = scenario.network
    return {
        "neurosim_version": __version__, "format": 1, "scenario_toml": text, "scenario_sha256": identity(scenario),
        "name": scenario.name, "description": scenario.description, "seed": scenario.seed,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "complete": False,
        "epochs_planned": total_epochs(scenario), "resumed": 0,
        "card": scenario.card().name, "architecture": net.architecture,
        "hidden": ",".join(map(str, net.hidden)) if net.architecture == "mlp" else "",
        "scheme": scenario.training.scheme, "data": data.name, "input_shape": np.asarray(data.image_shape),
        "classes": data.classes, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
        "device": str(device), "torch_version": torch.__version__, "numpy_version": np.__version__,
        "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
        "python_version": platform.python_version(), "platform": platform.platform(),
        # 'auto' resolves by the machine: say what this run's reads used.
        "noise_variance_precision": noise_variance_precision(scenario.network.crossbar, device),
    }


class _Recorder:
    """Commits the run to its file: epoch 0, every epoch (metrics, events, traces, checkpoint), the end."""

    def __init__(self, writer: RunWriter, chip: Chip, checkpoint: bool):
        self.writer, self.chip, self.checkpoint = writer, chip, checkpoint
        self.last = total_epochs(chip.scenario)
        self.attrs: dict[str, Any] = {}   # root attributes the next commit sets

    def _commit(self, epoch: int, final: bool = False) -> None:
        trainer = self.chip.trainer
        rows, fixed = _traces(self.chip, epoch, self.last) if epoch >= 0 else ([], {})
        commit = Commit(metrics=metric_columns(trainer.history), events=chip_state.drain_events(trainer.engine),
                        traces=rows, fixed=fixed, attrs=self.attrs)
        self.attrs = {}
        if self.checkpoint or final:
            commit.chip, commit.chip_static = chip_state.collect(trainer)
        if final:
            commit.attrs["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.writer.commit(commit, final=final)

    def start(self) -> None:
        self._commit(0)

    def epoch(self, row: dict[str, Any]) -> None:
        self._commit(int(row["epoch"]))

    def finish(self) -> None:
        self._commit(-1, final=True)


class _Progress:
    """A bar of the run's steps (tqdm) with the epoch and the latest test accuracy; time left is tqdm's."""

    def __init__(self, chip: Chip, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from tqdm import tqdm

        trainer = chip.trainer
        steps = -(-len(chip.data.x_train) // chip.scenario.training.batch_size)
        total = total_epochs(chip.scenario)
        self.total = total
        self.bar = tqdm(total=total * steps, initial=trainer.epoch * steps, unit="step", file=sys.stderr,
                        desc=f"epoch {min(trainer.epoch + 1, total)}/{total}", dynamic_ncols=True)

    def step(self, done: int, steps: int) -> None:
        self.bar.update(1)

    def epoch(self, row: dict[str, Any]) -> None:
        e = int(row["epoch"])
        self.bar.set_description(f"epoch {min(e + 1, self.total)}/{self.total}")
        self.bar.set_postfix(acc=f"{row['test_accuracy']:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the runner ----------------------------------------------------------------------------------------------

def output_path(scenario: Scenario, output: str | os.PathLike | None = None, source: str | os.PathLike | None = None
                ) -> Path:
    """-o, else the scenario's output.path, else the scenario file's name with .h5 in the current folder
    (a scenario made in code: its name, or 'run')."""
    if output:
        return Path(output)
    if scenario.output.path:
        return Path(scenario.output.path)
    stem = Path(source).stem if source else (scenario.name or "run")
    return Path(f"{stem}.h5")


def _refuse(path: Path, reason: str) -> RunFileError:
    return RunFileError(path, f"{reason}; choose another output (-o) or remove it")


def run(scenario: Scenario | str | os.PathLike, output: str | os.PathLike | None = None, *,
        sets: Mapping[str, Any] | None = None, progress: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        log: Callable[[str], None] | None = None) -> Run:
    """Run a scenario (a ``Scenario`` or a scenario file's path) and return the ``Run``.

    The run file is ``output`` (default: see ``output_path``). An unfinished run of the same scenario at that
    output resumes from its last complete epoch; a finished one is returned as it is, not redone; a file of
    another run there is refused (``RunFileError``), never overwritten. ``sets``: dotted overrides.
    ``progress``: a progress bar on stderr. ``on_epoch(row)``: called after each epoch is committed to the
    file. ``log(line)``: a few lines on what happens (resume, already complete)."""
    source = None
    if isinstance(scenario, str | os.PathLike):
        source = scenario
        scenario = load_scenario(scenario, dict(sets) if sets else None)
    elif sets:
        scenario = apply_sets(scenario, dict(sets))
    out = output_path(scenario, output, source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("output.path", str(out), f"cannot create its folder: {e.strerror or e}") from None
    device = resolve_device(scenario.runtime.device)
    if scenario.runtime.threads:
        torch.set_num_threads(scenario.runtime.threads)
    ident = identity(scenario)
    say = log or (lambda line: None)

    if out.exists():
        try:
            existing = RunFile(out)
        except RunFileError as e:
            raise _refuse(out, f"exists and is not a run file this neurosim reads ({e.reason})") from None
        if existing.attrs.get("scenario_sha256") != ident or not existing.complete:
            raise _refuse(out, "exists and holds another run (another scenario or other settings)")
        say(f"{out} is complete ({existing.epochs} epoch{'' if existing.epochs == 1 else 's'}): nothing to do")
        return Run(out)
    writer = RunWriter(out)
    resume = None
    if writer.partial.exists():
        try:
            resume = RunFile(writer.partial)
        except RunFileError as e:
            raise _refuse(writer.partial, f"an unfinished run file that cannot be read ({e.reason})") from None
        if resume.attrs.get("scenario_sha256") != ident:
            raise _refuse(writer.partial, "an unfinished run of another scenario (or other settings)")
        stored = str(resume.attrs.get("device", ""))
        if torch.device(stored).type != device.type:
            raise ConfigError("runtime.device", str(device), f"{writer.partial} was run on '{stored}': resume it "
                              "there (random streams differ between CPU and CUDA)")
        if not resume.has_checkpoint:
            resume = None   # only epoch 0 was written: start again, the same way

    chip = build_chip(scenario, device)
    trainer = chip.trainer
    recorder = _Recorder(writer, chip, scenario.output.checkpoint)
    resumed_from = None
    if resume is not None:
        _restore(chip, resume)
        resumed_from = trainer.epoch
        recorder.attrs["resumed"] = int(resume.attrs.get("resumed", 0)) + 1
        say(f"resuming {writer.partial} from epoch {trainer.epoch} of {total_epochs(scenario)}")
    else:
        writer.start(_root_attrs(scenario, scenario_text(scenario), device, chip.data))
        recorder.start()

    bar = _Progress(chip, progress)
    trainer.epoch_callbacks.append(recorder.epoch)
    if bar.bar is not None:
        trainer.step_callbacks.append(bar.step)
        trainer.epoch_callbacks.append(bar.epoch)
    if on_epoch is not None:
        trainer.epoch_callbacks.append(on_epoch)
    try:
        _train(trainer, scenario)
    finally:
        bar.close()
        for callbacks in (trainer.epoch_callbacks, trainer.step_callbacks):
            callbacks.clear()
    recorder.finish()
    chip.epoch = trainer.epoch
    return Run(out, chip, resumed_from)


def _restore(chip: Chip, file: RunFile, streams: bool = True) -> None:
    try:
        state = file.checkpoint()
        if chip.trainer is None:
            chip_state.restore_network(chip.network, state, streams)
        else:
            chip_state.restore(chip.trainer, state, file.history, streams)
    except chip_state.ChipMismatch as e:
        raise RunFileError(file.path, f"its checkpoint does not fit the chip of its scenario: {e}") from None
    chip.epoch = int(state["@epoch"])


def load_chip(path: str | os.PathLike, device: torch.device | str | None = None, data: bool = True) -> Chip:
    """A trained chip from a run file's checkpoint (a finished file, or an unfinished one's ``.partial``):
    ``chip.network(x)`` for inference, ``chip.trainer.run_epochs(n)`` to train further (it continues the
    run's random streams, clock and energy: the same numbers as a longer run). ``device``: where to put it
    (default: where it ran; on another kind of device the random streams start afresh). ``data=False``: do
    not load the data set (inference on your own inputs; no trainer)."""
    file = RunFile(path)
    scenario = scenario_from_text(file.scenario_toml, str(path))
    device = resolve_device(device or file.attrs.get("device") or scenario.runtime.device)
    same_kind = torch.device(str(file.attrs.get("device", device))).type == device.type
    if not same_kind:
        warnings.warn(f"{path}: ran on '{file.attrs.get('device')}', loaded on '{device}': the chip is the same, its "
                      "random streams start afresh", stacklevel=2)
    shape = None if data else (tuple(int(v) for v in file.attrs["input_shape"]), int(file.attrs["classes"]))
    chip = build_chip(scenario, device, shape=shape)
    _restore(chip, file, streams=same_kind)
    return chip


__all__ = ["Chip", "Run", "build_chip", "identity", "load_chip", "output_path", "run",
           "scenario_from_text", "scenario_text", "total_epochs"]
