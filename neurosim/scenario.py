"""The root settings object of an experiment: one TOML file describes a whole run (seed, runtime, data, device,
network, training, hardware table, traces, output), and one ``Scenario`` carries all of it.

This module is the one place that reads a scenario file: ``load_scenario(path, sets)`` parses it, applies
dotted ``--set`` overrides and named links, resolves the device card, fills the derived defaults, checks across
tables and returns a validated, frozen ``Scenario``. ``Scenario.to_toml()`` writes the resolved scenario back
(card contents included), and loading that text gives an equal object with the same ``fingerprint()``.
docs/scenarios.md documents every field (its reference part is ``reference_markdown()``).

Loading, in order (``scenario_from_dict``, ``_settle``):
1. the links are read; a field a link sets must not be written in the file with another value
   (``_check_links_agree``);
2. the file's tables become settings classes, the links' fields filled first (types, bounds, unknown keys:
   ``neurosim.config.build``);
3. ``sets``: derived fields are reset (they follow what changed), then link values and dotted fields are set;
4. links set their fields to value × scale;
5. resolution: the card is read (relative paths against the scenario's folder) and kept inline, paths made
   absolute, derived defaults filled (``DERIVABLE``);
6. checks across tables (``_check_across``).
An error in a field a link sets names the link and its value.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import re
import sys
import types
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurosim.architectures import NetworkConfig
from neurosim.backend import derive_seed
from neurosim.config import (
    _MISSING,
    ConfigError,
    build,
    dump_toml,
    field_type,
    get_path,
    load_toml,
    normalize,
    parse_sets,
    parse_toml,
    set_path,
    setting,
    to_dict,
    with_overrides,
)
from neurosim.data import DataConfig
from neurosim.device import _NUMERIC_FIELDS, DeviceSpec, load_card, shipped_card_paths
from neurosim.engine import HardwareTable
from neurosim.training.config import TrainerConfig

__all__ = ["DERIVABLE", "STREAMS", "DeviceConfig", "LinkConfig", "OutputConfig", "RuntimeConfig", "Scenario",
           "SweepConfig", "TracesConfig", "analog_layer_names", "apply_sets", "default_layer_schemes", "load_scenario",
           "loads_scenario", "parse_sets", "reference_markdown", "resolve", "scenario_from_dict"]

#: The named random streams a run draws from; each is ``derive_seed(seed, name)``: independent of the others,
#: and unchanged when another part draws more numbers.
STREAMS = ("chip", "data", "shuffle", "noise")

_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LINK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the numerics run (not part of the physics: results do not depend on it on CPU)."""

    device: str = setting("auto", "torch device: 'auto' (CUDA where present), 'cpu' or 'cuda[:N]'")
    threads: int = setting(0, "torch CPU threads (0: torch's default)", ge=0)

    def validate(self) -> None:
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError("device", self.device, "must be 'auto', 'cpu' or 'cuda[:N]'")


@dataclass(frozen=True)
class DeviceConfig:
    """Which synaptic device: a shipped card by name or a card file, plus field overrides, or a whole card
    inline. The loader reads the card into ``inline`` (so a resolved scenario carries its card), and from
    then on ``card`` only records where it came from."""

    card: str = setting("ideal", "a shipped card's name (`neurosim devices` lists them) or a card file's path "
                        "(relative to the scenario file)")
    overrides: dict = setting(default_factory=dict, doc="card fields set here instead of in the card "
                              "(e.g. {step_dtod = 0.05}); they need no citation")
    inline: DeviceSpec | None = setting(None, "a whole card written in the scenario (the fields of a card file, "
                                        "every number cited in inline.source as in card files); filled by the "
                                        "loader from `card` when absent")

    def __post_init__(self) -> None:
        if isinstance(self.overrides, dict):   # a wrong type is check()'s to report
            hints = typing.get_type_hints(DeviceSpec)
            object.__setattr__(self, "overrides", {k: normalize(v, hints[k]) if k in hints else v
                                                   for k, v in sorted(self.overrides.items())})

    def validate(self) -> None:
        known = {f.name for f in dataclasses.fields(DeviceSpec)}
        for key, value in self.overrides.items():
            if key not in known:
                raise ConfigError(f"overrides.{key}", value, "not a field of a device card (known: "
                                  f"{', '.join(sorted(known))})")
        if self.inline is None and not self.card:
            raise ConfigError("card", self.card, "needs a shipped card's name or a card file (or an inline card)")
        if self.inline is not None:
            _check_citations(self.inline)


def _check_citations(spec: DeviceSpec) -> None:
    """An inline card cites its numbers as a card file does: every numeric field away from its default has a
    source (``source.default`` covers zeros). A card read from a file passed the file's stricter rule."""
    defaults = {f.name: f.default for f in dataclasses.fields(DeviceSpec)}
    for name in _NUMERIC_FIELDS:
        value = getattr(spec, name)
        if value == defaults[name] or name in spec.source or (value == 0 and "default" in spec.source):
            continue
        raise ConfigError(f"inline.{name}", value, f"cites no source (add inline.source.{name}, as card files do; "
                          "device.overrides need none)")


@dataclass(frozen=True)
class TracesConfig:
    """What a run records besides its per-epoch metrics (the /traces group of the run file)."""

    histogram_bins: int = setting(64, "bins of each device array's conductance histogram per epoch (0: none)",
                                  ge=0)
    weight_epochs: tuple[int, ...] = setting((), "epochs whose weights are stored whole (compressed); -1: the "
                                             "last")
    coefficients: bool = setting(True, "store the neuron circuits' trainable coefficients per epoch")
    pulses: bool = setting(True, "store each layer's pulse count per epoch")

    def validate(self) -> None:
        for e in self.weight_epochs:
            if e < -1:
                raise ConfigError("weight_epochs", list(self.weight_epochs), "entries are epochs >= 0, or -1 "
                                  "(the last)")


@dataclass(frozen=True)
class OutputConfig:
    """Where the run file goes and how often the chip is checkpointed."""

    path: str = setting("", "run file (default: the scenario file's name with .h5, in the current folder)")
    checkpoint: bool = setting(True, "keep the chip's state after every epoch, so an interrupted run resumes")


def _tuples(value: Any) -> Any:
    """Lists as tuples, all the way down (TOML gives lists; equal settings must compare equal)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class SweepConfig:
    """What ``neurosim sweep`` runs by default: every combination of the grid's values (linked keys advance
    together), each with ``seeds`` seeds. ``neurosim run`` ignores this table; a point's run file holds the
    point's scenario without it."""

    grid: dict = setting(default_factory=dict, doc="axes: a dotted field or a link's name -> its values, a "
                         "non-empty list of TOML values (e.g. {variation = [0.0, 0.1], \"training.scheme\" = "
                         "[\"bp\", \"dgc\"]})")
    linked: tuple[tuple[str, ...], ...] = setting((), "groups of grid keys whose lists (of one length) advance "
                                                  "together instead of combining, e.g. [[\"training.scheme\", "
                                                  "\"training.bp.backward\"]]")
    seeds: int = setting(1, "seeds per grid point: the scenario's seed, seed + 1, ..., seed + seeds - 1", ge=1)
    workers: int = setting(0, "default of --workers: 0 runs the points one after another in this process; N "
                           "starts N local Dask workers", ge=0)

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):
            object.__setattr__(self, "grid", {k: _tuples(v) for k, v in sorted(self.grid.items())})

    def validate(self) -> None:
        for key, values in self.grid.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
                raise ConfigError(f"grid.{key}", values, "a grid key is a dotted field or a link's name")
            if key == "seed" or key.split(".")[0] in ("sweep", "derived") or key == "output.path":
                raise ConfigError(f"grid.{key}", values, "cannot be an axis (seeds: set sweep.seeds; a point's "
                                  "file name comes from its values)")
            if not isinstance(values, tuple):
                raise ConfigError(f"grid.{key}", values, "must be a list of values (e.g. [0.0, 0.1])")
            if not values:
                raise ConfigError(f"grid.{key}", [], "needs at least one value")
        seen: set[str] = set()
        for group in self.linked:
            for key in group:
                if key not in self.grid:
                    raise ConfigError("linked", [list(g) for g in self.linked], f"'{key}' is not a grid key")
                if key in seen:
                    raise ConfigError("linked", [list(g) for g in self.linked], f"'{key}' is in two groups")
                seen.add(key)
            lengths = {len(self.grid[k]) for k in group}
            if len(lengths) > 1:
                raise ConfigError("linked", list(group), "linked keys need lists of one length (here: "
                                  + ", ".join(f"{k}: {len(self.grid[k])}" for k in group) + ")")
        for group in [*self.linked, *[(k,) for k in self.grid if k not in seen]]:
            rows = [repr(r) for r in zip(*(self.grid[k] for k in group), strict=True)]
            if len(set(rows)) != len(rows):
                what = f"grid.{group[0]}" if len(group) == 1 else "linked"
                raise ConfigError(what, [list(self.grid[k]) for k in group] if len(group) > 1 else
                                  list(self.grid[group[0]]), "lists a value twice")


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """One key that sets several fields: each field gets ``value × scale`` (or ``value`` itself without
    ``scale``). ``--set NAME=V`` and sweeps address the link by its name."""

    doc: str = setting("", "what the link stands for")
    value: Any = setting(doc="the link's value (a number where `scale` is given; else any TOML value)")
    fields: tuple[str, ...] = setting(doc="dotted fields the link sets (e.g. 'device.overrides.step_dtod')")
    scale: tuple[float, ...] = setting((), "one factor per field (empty: every field gets the value itself)")

    def validate(self) -> None:
        if not self.fields:
            raise ConfigError("fields", [], "names no field")
        if len(set(self.fields)) != len(self.fields):
            raise ConfigError("fields", list(self.fields), "names a field twice")
        if self.scale and len(self.scale) != len(self.fields):
            raise ConfigError("scale", list(self.scale), f"needs one factor per field ({len(self.fields)})")
        if self.scale and not (isinstance(self.value, int | float) and not isinstance(self.value, bool)):
            raise ConfigError("value", self.value, "must be a number (the link scales it)")
        if isinstance(self.value, float) and not math.isfinite(self.value):
            raise ConfigError("value", self.value, "must be a finite number")

    def targets(self) -> dict[str, Any]:
        """field -> the value the link gives it."""
        if not self.scale:
            return dict.fromkeys(self.fields, self.value)
        return {f: self.value * s for f, s in zip(self.fields, self.scale, strict=True)}


#: Fields the loader fills from other settings when they hold the value here ("derive me"); the ones it filled
#: are listed in ``Scenario.derived`` and derived again whenever a set changes the scenario.
DERIVABLE: dict[str, Any] = {
    "device.inline": None,                  # the card named by device.card
    "data.size": 0,                         # the data set's stored image side
    "data.channels": 0,                     # its stored channels
    "data.classes": 0,                      # its classes
    "network.dropout": None,                # 0.5 for lenet, else 0 (as published)
    "training.hybrid.layer_schemes": (),    # hybrid: DGC for convolutions, BP above (mlp: DGC on the first layer)
    "hardware.pulse_s": None,               # the card's pulse width
    "hardware.pulse_j": None,               # V²·G_mid·pulse_s from the card
}

# Each data set's images as stored: (side, channels, classes); npz files are read, not derived.
_STORED = {"digits": (8, 1, 10), "mnist": (28, 1, 10), "fashion_mnist": (28, 1, 10), "cifar10": (32, 3, 10),
           "synthetic": (8, 1, 10)}
# The input side each architecture's layers are sized for.
INPUT_SIDE = {"lenet": 28, "vgg11": 32}
# Data sets read from files: what data.path must be.
_PATH_KIND = {"mnist": "folder", "fashion_mnist": "folder", "cifar10": "folder", "npz": "file"}


def analog_layer_names(network: NetworkConfig) -> list[str]:
    """The analog layers ``build_network`` makes, by name, from the settings alone (no torch modules)."""
    if network.architecture == "mlp":
        return [f"fc{i + 1}" for i in range(len(network.hidden) + 1)]
    if network.architecture == "lenet":
        return ["conv1", "conv2", "fc1", "fc2"]
    return [f"conv{i + 1}" for i in range(8)] + ["fc1"]


def default_layer_schemes(network: NetworkConfig) -> tuple[str, ...]:
    """Hybrid's default per-layer schemes (HybridTrainer.per_layer with none given): DGC for convolutions, BP
    for fully connected layers; an MLP of more than one layer gets DGC on its first layer."""
    names = analog_layer_names(network)
    schemes = ["dgc" if n.startswith("conv") else "bp" for n in names]
    if "dgc" not in schemes and len(schemes) > 1:
        schemes[0] = "dgc"
    return tuple(schemes)


@dataclass(frozen=True)
class Scenario:
    """One experiment. Every table is a validated settings class; ``links`` name several fields set as one.

    Equal scenarios compare equal and hash equal: lists are held as tuples, numbers in float fields as
    floats, tables' keys sorted; the hash is that of ``fingerprint()``, the SHA-256 of the resolved TOML."""

    name: str = setting("", "a short name (titles of plots, summaries)")
    description: str = setting("", "one sentence on the experiment")
    seed: int = setting(0, "the one seed: the chip, the data split, the shuffle and the noise derive their own "
                        "independent streams from it", ge=0)
    runtime: RuntimeConfig = setting(default_factory=RuntimeConfig, doc="where the numerics run")
    data: DataConfig = setting(default_factory=DataConfig, doc="the data set")
    device: DeviceConfig = setting(default_factory=DeviceConfig, doc="the synaptic device")
    network: NetworkConfig = setting(default_factory=NetworkConfig, doc="the network on the chip")
    training: TrainerConfig = setting(default_factory=TrainerConfig, doc="on-chip training")
    hardware: HardwareTable = setting(default_factory=HardwareTable, doc="durations and energies of operations")
    traces: TracesConfig = setting(default_factory=TracesConfig, doc="what is recorded per epoch")
    output: OutputConfig = setting(default_factory=OutputConfig, doc="the run file")
    sweep: SweepConfig = setting(default_factory=SweepConfig, doc="the default grid of `neurosim sweep`")
    links: dict = setting(default_factory=dict, doc="named links: one key that sets several fields "
                          "([links.NAME] with value, fields, scale, doc)")
    derived: tuple[str, ...] = setting((), "fields the loader filled from others (the card, the architecture, "
                                       "the data set); they follow what they derive from when a set changes the "
                                       "scenario. Written by to_toml: leave it as it is")

    def __post_init__(self) -> None:
        if isinstance(self.links, dict):
            links = {}
            for name, link in sorted(self.links.items()):
                if not _LINK_NAME.fullmatch(str(name)) or name in _TOP_LEVEL:
                    raise ConfigError(f"links.{name}", link, "a link's name is a word (letters, digits, '_') that "
                                      "is not a top-level field")
                if isinstance(link, dict):
                    link = build(LinkConfig, link, prefix=f"links.{name}")
                elif not isinstance(link, LinkConfig):
                    raise ConfigError(f"links.{name}", link, "must be a table (value, fields, scale, doc)")
                links[name] = _normalize_link(name, link)
            object.__setattr__(self, "links", links)
        if isinstance(self.derived, tuple | list) and all(isinstance(d, str) for d in self.derived):
            for d in self.derived:
                if d not in DERIVABLE:
                    raise ConfigError("derived", d, f"is not a derived field (those are: {', '.join(DERIVABLE)})")
            object.__setattr__(self, "derived", tuple(sorted(set(self.derived))))

    def validate(self) -> None:
        for key, values in self.sweep.grid.items():   # values are checked by the sweep, point by point
            if key not in self.links:
                try:
                    _target_type(key)
                except ConfigError as e:
                    raise ConfigError(f"sweep.grid.{key}", list(values), f"{e.reason} (an axis is a field or a "
                                      f"link: {', '.join(sorted(self.links)) or 'none here'})") from None
        owner: dict[str, str] = {}
        for name, link in self.links.items():
            for f in link.fields:
                for other, by in owner.items():
                    if _overlap(f, other):
                        raise ConfigError(f"links.{name}.fields", f, f"overlaps {other}, which link '{by}' sets")
                owner[f] = name

    # -- what a run needs --------------------------------------------------------------------------------------
    def card(self) -> DeviceSpec:
        """The device card with the scenario's overrides applied (validated); errors name device.* fields."""
        return _card(self.device, None, None)

    def stream(self, name: str) -> int:
        """The seed of one named stream ('chip', 'data', 'shuffle', 'noise', ...), derived from ``seed``."""
        return derive_seed(self.seed, name)

    def layer_names(self) -> list[str]:
        """The network's analog layers, by name, in order."""
        return analog_layer_names(self.network)

    def input_shape(self) -> tuple[int, int, int] | None:
        """(channels, side, side) of the network's input, where the settings tell it (not for an npz file
        whose size and channels are left 0)."""
        d = self.data
        if d.size and d.channels:
            return (d.channels, d.size, d.size)
        return None

    # -- text ------------------------------------------------------------------------------------------------
    def to_toml(self, header: bool = True) -> str:
        """The scenario as TOML text: every field written (so a later change of a default does not change
        what the text means), the card inline. Loading it gives an equal scenario."""
        body = dump_toml(_plain(self, ""))
        if not header:
            return body
        from neurosim import __version__

        return (f"# neurosim {__version__} scenario, resolved: every field written, the device card inline "
                f"(device.inline),\n# derived fields listed in `derived`. fingerprint {_digest(body)}\n\n" + body)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the resolved TOML text without its header: equal scenarios share it, and any
        setting that differs changes it."""
        return _digest(self.to_toml(header=False))

    def __hash__(self) -> int:
        return int(self.fingerprint()[:16], 16)


_TOP_LEVEL = {f.name for f in dataclasses.fields(Scenario)}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _overlap(a: str, b: str) -> bool:
    """Whether two dotted paths address the same setting (equal, or one holds the other)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _target_type(path: str) -> Any:
    """The type of a field a link may set: any settings field but the links themselves, `derived`, and the
    inline card (set card fields through device.overrides)."""
    if path.split(".")[0] in ("links", "derived") or path == "device.inline" or path.startswith("device.inline."):
        raise ConfigError(path, _MISSING, "links set settings fields, not links, derived or device.inline (use "
                          "device.overrides.FIELD for the card)")
    parts = path.split(".")
    if parts[:2] == ["device", "overrides"]:
        hints = typing.get_type_hints(DeviceSpec)
        if len(parts) != 3 or parts[2] not in hints:
            raise ConfigError(path, _MISSING, "device.overrides.FIELD needs a device card's field")
        return hints[parts[2]]
    return field_type(Scenario, path)


def _normalize_link(name: str, link: LinkConfig) -> LinkConfig:
    """Check that every field exists and give the value the type of the fields (an integer for a float field
    becomes a float), so that equal links compare and hash equal."""
    types = []
    for f in link.fields:
        try:
            types.append(_target_type(f))
        except ConfigError as e:
            raise ConfigError(f"links.{name}.fields", f, e.reason if e.field == f else str(e)) from None
    value = normalize(link.value, types[0])
    return link if value is link.value else dataclasses.replace(link, value=value)


def _plain(obj: Any, path: str) -> Any:
    """A settings tree as plain TOML data: None omitted where it is the default (TOML has no null), empty
    tables omitted, tables' keys sorted."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            where = f"{path}.{f.name}" if path else f.name
            if value is None:
                if f.default is None:
                    continue
                raise ConfigError(where, None, "cannot be written as TOML (no null): set a value")
            if isinstance(value, dict) and not value:
                continue
            out[f.name] = _plain(value, where)
        return out
    if isinstance(obj, dict):
        out = {}
        for k in sorted(obj):
            if obj[k] is None:
                raise ConfigError(f"{path}.{k}", None, "cannot be written as TOML (no null): set a value")
            out[k] = _plain(obj[k], f"{path}.{k}")
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v, path) for v in obj]
    return obj


# -- loading ---------------------------------------------------------------------------------------------------

def shipped_scenario_paths() -> dict[str, Path]:
    """name -> path of every scenario installed with the package (the repository's scenarios/ folder)."""
    from importlib import resources

    folder = resources.files("neurosim.scenarios")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".toml")}


def load_scenario(path: str | Path, sets: dict[str, Any] | None = None) -> Scenario:
    """A scenario file as a validated, resolved Scenario; ``sets``: dotted overrides and link values
    (``{"device.overrides.c2c": 0.02, "variation": 0.3}``; ``parse_sets`` reads them from ``KEY=VALUE``)."""
    path = Path(path)
    data = load_toml(path)
    return scenario_from_dict(data, sets, source=str(path), base=path.expanduser().resolve().parent)


def loads_scenario(text: str, sets: dict[str, Any] | None = None, *, source: str = "<scenario text>",
                   base: str | Path | None = None) -> Scenario:
    """A scenario from TOML text (a run file's ``scenario_toml``); ``base``: the folder relative paths are
    read from (default: the current one)."""
    data = parse_toml(text, source)
    return scenario_from_dict(data, sets, source=source, base=base)


def scenario_from_dict(data: dict[str, Any], sets: dict[str, Any] | None = None, *, source: str | None = None,
                       base: str | Path | None = None) -> Scenario:
    """A scenario from parsed TOML: built, checked against its links, set, resolved and checked across."""
    _check_links_agree(_links_of(data, source), data, source)
    written = _build_seeded(data, source)
    return _settle(written, dict(sets or {}), source, base)


def _links_of(data: dict[str, Any], source: str | None) -> dict[str, LinkConfig]:
    return build(Scenario, {"links": data.get("links", {})}, source=source).links


def _build_seeded(data: dict[str, Any], source: str | None) -> Scenario:
    """The Scenario of plain data, its links' fields filled first, so that a table's own checks see them
    when it is built (an npz data set whose path a link gives); an error in a linked field names the link."""
    links = _links_of(data, source)
    seeded = copy.deepcopy(data)
    for link in links.values():
        for field, value in link.targets().items():
            with contextlib.suppress(ConfigError):   # a malformed table there: building it reports that
                set_path(seeded, Scenario, field, value)
    try:
        return build(Scenario, seeded, source=source)
    except ConfigError as e:
        raise _blame_link(links, e, source) from None


def apply_sets(scenario: Scenario, sets: dict[str, Any], *, base: str | Path | None = None,
               source: str | None = None) -> Scenario:
    """``scenario`` with dotted fields and link values set (``{"variation": 0.3, "training.scheme": "dgc"}``),
    its derived fields derived again, resolved and checked: what ``--set`` and a sweep point do. A field that
    a link sets is refused (set the link). Relative paths are read from ``base`` (default: current folder)."""
    return _settle(scenario, dict(sets), source, base)


def resolve(scenario: Scenario, *, base: str | Path | None = None, source: str | None = None) -> Scenario:
    """A scenario built in code, resolved as a loaded one is (card inline, derived fields, checks)."""
    return _settle(scenario, {}, source, base)


def _settle(scenario: Scenario, sets: dict[str, Any], source: str | None, base: str | Path | None) -> Scenario:
    base = Path.cwd() if base is None else Path(base)
    if sets:
        scenario = _assign(scenario, sets, source, base)
    try:
        scenario = _apply_links(scenario, source)
        scenario = _resolve(scenario, source, base)
        _check_across(scenario, source)
    except ConfigError as e:
        raise _blame_link(scenario.links, e, source) from None
    return scenario


def _blame_link(links: dict[str, LinkConfig], e: ConfigError, source: str | None) -> ConfigError:
    """An error in a field a link sets names the link: its value is what the user wrote."""
    for name, link in links.items():
        for f in link.fields:
            if e.field == f or e.field.startswith(f + "."):
                return ConfigError(f"links.{name}.value", link.value, f"sets {e.field} = {e.value!r}: {e.reason}",
                                   e.source or source)
    return e if e.source or not source else e.within("", source)


def _check_links_agree(links: dict[str, LinkConfig], data: dict[str, Any], source: str | None) -> None:
    """A field a link sets may be written in the file only with the value the link gives it: else which one
    holds would be a surprise."""
    for name, link in links.items():
        for field, target in link.targets().items():
            node: Any = data
            for part in field.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is _MISSING or _same(node, target):
                continue
            raise ConfigError(field, node, f"is set by link '{name}' to {target!r}: write that value, or leave the "
                              "field out", source)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    return a == b


def _assign(scenario: Scenario, sets: dict[str, Any], source: str | None, base: Path) -> Scenario:
    """Set link values and dotted fields; derived fields are reset first, so they follow what the sets change
    (a field set here is no longer derived)."""
    keys = list(sets)
    for key in keys:
        if key in scenario.links or key.startswith("links."):
            continue
        if "." not in key and key not in _TOP_LEVEL:
            names = ", ".join(sorted(scenario.links)) or "none"
            raise ConfigError(key, sets[key], f"neither a top-level field nor a link (links: {names})", source)
        for name, link in scenario.links.items():
            for f in link.fields:
                if _overlap(key, f):
                    raise ConfigError(key, sets[key], f"{f} is set by link '{name}' (= {link.value!r}): set "
                                      f"'{name}' instead, or take the field out of the link", source)
    data = to_dict(scenario)
    derived = set(scenario.derived)
    changed = _changed_fields(scenario, sets)
    card_changes = any(_overlap(k, "device.card") for k in changed)
    inline_changes = any(_overlap(k, "device.inline") for k in changed)
    if card_changes and scenario.device.inline is not None and "device.inline" not in derived \
            and not inline_changes:
        raise ConfigError("device.card", sets.get("device.card"), "this scenario's card is written inline "
                          "(device.inline): change its fields, or device.overrides", source)
    for d in sorted(derived):
        touched = any(_overlap(k, d) for k in changed)
        if d == "device.inline":   # the card is read again only when another one is named
            if inline_changes:
                derived.discard(d)
            elif card_changes:
                derived.discard(d)
                set_path(data, Scenario, d, None)
            continue
        derived.discard(d)
        if not touched:
            set_path(data, Scenario, d, DERIVABLE[d])
    for key, value in sets.items():
        if key in scenario.links:
            data["links"][key]["value"] = value
        else:
            set_path(data, Scenario, key, value, source=source)
    data["derived"] = sorted(derived)
    return _build_seeded(data, source)


def _changed_fields(scenario: Scenario, sets: dict[str, Any]) -> set[str]:
    """The fields a set of ``sets`` may change: their keys, and for a key that touches the links (a link's
    name, or anything under links.) the fields of every link, old and new (conservative: a derived field or
    the inline card is derived again if a link might move what it follows)."""
    changed = {k for k in sets if k not in scenario.links and not _overlap(k, "links")}
    if len(changed) < len(sets):
        for link in scenario.links.values():
            changed.update(link.fields)

        def fields_in(value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    if k == "fields" and isinstance(v, list | tuple):
                        changed.update(str(f) for f in v)
                    fields_in(v)

        for k, v in sets.items():
            if k.startswith("links.") and k.endswith(".fields") and isinstance(v, list | tuple):
                changed.update(str(f) for f in v)
            elif _overlap(k, "links"):
                fields_in(v)
    return changed


def _apply_links(scenario: Scenario, source: str | None) -> Scenario:
    if not scenario.links:
        return scenario
    data = to_dict(scenario)
    targets = {}
    for link in scenario.links.values():
        targets.update(link.targets())
    for field, value in targets.items():
        set_path(data, Scenario, field, value, source=source)
    data["derived"] = [d for d in scenario.derived if not any(_overlap(d, f) for f in targets)]
    return build(Scenario, data, source=source)


def _card_path(card: str, base: Path) -> Path | None:
    """The file a device.card names (relative to ``base``), or None for a shipped card's name."""
    path = Path(card).expanduser()
    if path.suffix or "/" in card or "\\" in card or (base / path).exists():
        return path if path.is_absolute() else base / path
    return None


def _card(device: DeviceConfig, base: Path | None, source: str | None) -> DeviceSpec:
    """The card of a device table, with its overrides: errors name device.card, device.overrides.FIELD or the
    inline card's field."""
    spec = device.inline
    if spec is None:
        path = _card_path(device.card, base or Path.cwd())
        try:
            if path is None:
                if device.card not in shipped_card_paths():
                    raise ConfigError("device.card", device.card, "no such shipped device card (shipped: "
                                      f"{', '.join(sorted(shipped_card_paths()))}); a card file needs its path, "
                                      "e.g. 'cards/my_device.toml'", source)
                spec = load_card(device.card)
            else:
                if not path.exists():
                    raise ConfigError("device.card", device.card, f"no such card file ({path})", source)
                spec = load_card(path)
        except ConfigError as e:
            if e.field == "device.card":
                raise
            raise ConfigError("device.card", device.card, str(e), source) from None
    if not device.overrides:
        return spec
    try:
        return with_overrides(spec, device.overrides)
    except ConfigError as e:
        head = e.field.split(".")[0]
        if head in device.overrides:
            raise ConfigError(f"device.overrides.{e.field}", e.value, e.reason, source) from None
        raise ConfigError("device.overrides", device.overrides, f"the card with these overrides: field "
                          f"'{e.field}' = {e.value!r}: {e.reason}", source) from None


def _resolve(scenario: Scenario, source: str | None, base: Path) -> Scenario:
    """The card inline, relative paths absolute, every derivable field that holds its "derive me" value
    filled (and listed in ``derived``)."""
    data = to_dict(scenario)
    derived = set(scenario.derived)

    def fill(path: str, value: Any) -> None:
        if get_path(scenario, path) == DERIVABLE[path] and value != DERIVABLE[path]:
            set_path(data, Scenario, path, value)
            derived.add(path)

    def absolute(field: str, written: str, path: Path) -> None:
        """A path field made absolute; a link that gives it its value (a path too) is made absolute with it,
        so that the written text still agrees with its links and reads the same from any folder."""
        new = str(path.resolve())
        set_path(data, Scenario, field, new)
        for name, link in scenario.links.items():
            if field in link.fields and not link.scale and link.value == written:
                data["links"][name]["value"] = new

    device = scenario.device
    if device.inline is None:
        path = _card_path(device.card, base)
        spec = _card(dataclasses.replace(device, overrides={}), base, source)
        if path is not None:
            absolute("device.card", device.card, path)
        data["device"]["inline"] = to_dict(spec)
        derived.add("device.inline")
        device = dataclasses.replace(device, inline=spec)
    card = _card(device, base, source)

    d = scenario.data
    if d.path and d.name in _PATH_KIND:
        p = Path(d.path).expanduser()
        absolute("data.path", d.path, p if p.is_absolute() else base / p)
    stored = _STORED.get(d.name)
    if stored is not None:
        fill("data.size", stored[0])
        fill("data.channels", stored[1])
        fill("data.classes", stored[2])
    net = scenario.network
    fill("network.dropout", 0.5 if net.architecture == "lenet" else 0.0)
    if scenario.training.scheme == "hybrid":
        fill("training.hybrid.layer_schemes", default_layer_schemes(net))
    hw = scenario.hardware.resolve(card.pulse_width, card.pulse_voltage_ltp, card.pulse_voltage_ltd, card.g_min,
                                   card.g_max)
    fill("hardware.pulse_s", hw.pulse_s)
    fill("hardware.pulse_j", hw.pulse_j)
    data["derived"] = sorted(derived)
    return build(Scenario, data, source=source)


def _npz_input(path: Path) -> tuple[int, int, int] | None:
    """(channels, height, width) of an npz file's images from the array header alone, or None where the file
    does not tell it plainly (the data loader then reports what is wrong with it)."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as z:
            for key in ("x_train", "x"):
                if f"{key}.npy" in z.namelist():
                    with z.open(f"{key}.npy") as f:
                        read = {(1, 0): np.lib.format.read_array_header_1_0,
                                (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
                        if read is None:
                            return None
                        shape = read(f)[0]
                    if len(shape) == 3:
                        return (1, shape[1], shape[2])
                    if len(shape) == 4:
                        return tuple(shape[1:])
                    return None
    except (OSError, ValueError, zipfile.BadZipFile, KeyError):
        return None
    return None


def _check_across(s: Scenario, source: str | None) -> None:
    """Checks that need several tables, done at load so a run does not fail half way."""
    def fail(field: str, value: Any, reason: str) -> None:
        raise ConfigError(field, value, reason, source)

    d, net, tr = s.data, s.network, s.training
    # data files exist
    kind = _PATH_KIND.get(d.name)
    if kind is None and d.path:
        fail("data.path", d.path, f"the {d.name} data set reads no file (leave data.path empty)")
    if kind is not None:
        p = Path(d.path)
        if not p.exists():
            fail("data.path", d.path, f"no such {kind}")
        if kind == "folder" and not p.is_dir():
            fail("data.path", d.path, "is a file, not a folder (give the folder that holds the data set's files)")
        if kind == "file" and p.is_dir():
            fail("data.path", d.path, "is a folder, not an .npz file")
    # the input size the architecture needs
    side = INPUT_SIDE.get(net.architecture)
    if side is not None:
        shape = s.input_shape()
        if shape is None and d.name == "npz":
            shape = _npz_input(Path(d.path))
            if shape is not None and d.size:
                shape = (shape[0], d.size, d.size)
        if shape is not None and shape[1:] != (side, side):
            fail("data.size", d.size or shape[1], f"{net.architecture} expects {side}×{side} inputs, "
                 f"{d.name} gives {shape[1]}×{shape[2]} (set data.size = {side} to resize)")
    if net.architecture == "vgg11" and net.dropout:
        fail("network.dropout", net.dropout, "vgg11 has no dropout layers (leave it 0)")
    # per-layer schemes
    layers = analog_layer_names(net)
    chosen = tr.hybrid.layer_schemes
    if chosen and len(chosen) != len(layers):
        fail("training.hybrid.layer_schemes", list(chosen), f"needs one entry per analog layer ({len(layers)}: "
             f"{', '.join(layers)})")
    # the same rule as neurosim.training.dgc.check_dgc, on the settings
    if tr.scheme != "bp" and net.crossbar.wire_resistance != "none" and tr.dgc.perturbation != "temporary":
        fail("training.dgc.perturbation", tr.dgc.perturbation, "pulse perturbations with wire resistance are not "
             "modelled: the restore errors of earlier cycles change the wired read of every later one; use "
             "'temporary' or network.crossbar.wire_resistance = 'none'")
    if tr.scheme == "two_stage" and tr.two_stage.stage2_epochs and len(layers) < 2:
        fail("training.scheme", tr.scheme, "stage 2 trains the hidden layers' neuron circuits: this network has "
             "none (give network.hidden)")
    total = tr.two_stage.stage1_epochs + tr.two_stage.stage2_epochs if tr.scheme == "two_stage" else tr.epochs
    for e in s.traces.weight_epochs:
        if e > total:
            fail("traces.weight_epochs", list(s.traces.weight_epochs), f"epoch {e} is beyond the run's {total} "
                 "epochs")


# -- reference documentation -----------------------------------------------------------------------------------

_UNIT = re.compile(r"\((S|s|V|J|ohm)\)|\[(s|J|S|V)\]")
MARKER = "<!-- Generated below by neurosim.scenario.reference_markdown(): do not edit; regenerate with " \
         "`python -m neurosim.scenario docs/scenarios.md`. -->"


def _doc_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_doc_type(a) for a in args) + " (optional)"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_doc_type(args[0]) if args else 'values'}"
    if tp is dict or origin is dict or dataclasses.is_dataclass(tp):
        return "table"
    if tp is Any:
        return "any"
    return {float: "number", int: "integer", bool: "boolean", str: "string"}.get(tp, getattr(tp, "__name__", "?"))


def _is_number(tp: Any) -> bool:
    """A float field (alone or optional): a quantity, dimensionless where its doc names no unit."""
    return tp is float or float in typing.get_args(tp)


def _allowed(meta: Any) -> str:
    if meta.get("choices") is not None:
        return ", ".join(f"`{_literal(c)}`" for c in meta["choices"])
    lo = [f"≥ {meta['ge']:g}" if meta.get("ge") is not None else None,
          f"> {meta['gt']:g}" if meta.get("gt") is not None else None]
    hi = [f"≤ {meta['le']:g}" if meta.get("le") is not None else None,
          f"< {meta['lt']:g}" if meta.get("lt") is not None else None]
    return ", ".join(b for b in lo + hi if b)


def _literal(value: Any) -> str:
    from neurosim.config import toml_value

    return toml_value(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The field reference of docs/scenarios.md: one table per TOML table, each field with its type, default,
    allowed values, unit and doc, all read from the settings classes themselves."""
    out: list[str] = []

    def table(title: str, cls: type, default: Any, prefix: str, note: str = "", extra: str = ""
              ) -> list[tuple[str, type, Any, str]]:
        hints = typing.get_type_hints(cls)
        out.append(f"### `{title}`\n")
        doc = " ".join((cls.__doc__ or "").split())
        if not doc or doc.startswith(cls.__name__ + "("):   # a dataclass without a docstring of its own
            doc = ""
        if doc and note:
            doc = f"{doc.rstrip('.')}; here: {note}"
        text = doc or note
        if text:
            text = text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")
        text = " ".join(t for t in (text, extra) if t)
        if text:
            out.append(text + "\n")
        out.append("| key | type | default | allowed | unit | description |")
        out.append("|---|---|---|---|---|---|")
        subs = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            path = f"{prefix}{f.name}"
            sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
            if default is not None:
                value = getattr(default, f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = dataclasses.MISSING
            doc = f.metadata.get("doc", "")
            if sub is not None and path != "device.inline":
                subs.append((path, sub, value, doc))
                continue
            if value is dataclasses.MISSING:
                shown = "required"
            elif value is None:
                shown = "none"
            elif isinstance(value, dict) and not value:
                shown = "{}"
            else:
                shown = f"`{_literal(value)}`"
            if path in DERIVABLE:
                shown += " (derived)"
            m = _UNIT.search(doc)
            unit = (m.group(1) or m.group(2)) if m else "1" if _is_number(tp) else ""
            if path == "device.inline":
                doc += " (its keys: the `[device.inline]` table below)"
            out.append(f"| `{f.name}` | {_doc_type(tp)} | {_cell(shown)} | {_cell(_allowed(f.metadata))} | "
                       f"{unit} | {_cell(doc)} |")
        out.append("")
        return subs

    def walk(title: str, cls: type, default: Any, prefix: str, note: str) -> None:
        subs = table(title, cls, default, prefix, note)
        for path, sub, value, doc in subs:
            walk(path, sub, value if dataclasses.is_dataclass(value) else None, path + ".", doc)

    subs = table("top level", Scenario, None, "")
    own_doc = {path: bool(sub.__doc__) and not sub.__doc__.startswith(sub.__name__ + "(") for path, sub, _, _ in subs}
    for path, sub, value, doc in subs:
        walk(path, sub, value, path + ".", "" if own_doc[path] else doc)
        if path == "device":
            table("device.inline", DeviceSpec, None, "device.inline.",
                  extra="The same fields are the keys `device.overrides` accepts.")
    table("links.NAME", LinkConfig, None, "links.NAME.")
    return "\n".join(out).rstrip() + "\n"


def update_docs(path: str | Path) -> bool:
    """Rewrite the generated part of a docs page (below MARKER); True if it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head = text.split(MARKER)[0].rstrip() + "\n\n" if MARKER in text else text.rstrip() + "\n\n"
    new = head + MARKER + "\n\n" + reference_markdown()
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


if __name__ == "__main__":  # python -m neurosim.scenario docs/scenarios.md
    for target in sys.argv[1:] or ["docs/scenarios.md"]:
        print(f"{target}: {'updated' if update_docs(target) else 'unchanged'}")
