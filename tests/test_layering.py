"""The import order of DESIGN.md, enforced: data flows down, nothing imports what is above it.

Every module of neurosim/ belongs to a layer of the table below (by the longest matching name prefix). A
module may import modules of a lower layer and of its own layer (peers such as crossbar and wires), never of a
higher one; imports inside functions count as much as those at the top. Some layers also must not reach
certain packages at all, through any chain of neurosim imports: the engine takes plain numbers (no torch),
analysis reads run files (no torch, no training). A new module needs a row in the table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "neurosim"

# layer name -> (rank, module prefixes). Lower ranks sit below higher ones.
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "foundation": (0, ("neurosim", "neurosim.config")),
    "numerics": (1, ("neurosim.backend", "neurosim.sampling", "neurosim.nonlinearity", "neurosim.random_streams",
                      "neurosim._philox_numba", "neurosim._update_numba", "neurosim._pulse_numba",
                      "neurosim._activation_numba", "neurosim._cache_numba", "neurosim._read_numba",
                      "neurosim._cost_numba")),
    "engine": (1, ("neurosim.engine",)),
    "data": (1, ("neurosim.data",)),
    "store": (1, ("neurosim.store",)),
    "device": (2, ("neurosim.device", "neurosim.cards", "neurosim.fitting")),
    "crossbar": (3, ("neurosim.crossbar", "neurosim.wires", "neurosim.read_scratch")),
    "circuits": (4, ("neurosim.activation",)),
    "network": (5, ("neurosim.layers", "neurosim.architectures")),
    "training": (6, ("neurosim.training",)),
    "scenario": (7, ("neurosim.scenario",)),
    "runner": (8, ("neurosim.runner", "neurosim.chip_state")),
    "sweep": (9, ("neurosim.sweep",)),
    "analysis": (10, ("neurosim.analysis",)),
    "studies": (11, ("neurosim.studies",)),
    "interface": (12, ("neurosim.cli", "neurosim.commands")),
}

# layer -> top-level names it must not reach, directly or through any chain of neurosim imports
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engine": ("torch",),
    "store": ("torch",),
    "analysis": ("torch", "neurosim.training"),
}


def layer_of(module: str) -> str | None:
    best, length = None, -1
    for name, (_, prefixes) in LAYERS.items():
        for p in prefixes:
            # the root package is its own module only; any other prefix also covers its submodules
            inside = module.startswith(p + ".") and p != "neurosim"
            if (module == p or inside) and len(p) > length:
                best, length = name, len(p)
    return best


def imported_names(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """Absolute names of everything ``module`` imports, anywhere in its source (functions included).
    ``from pkg import x`` names pkg.x when that is a module, else pkg."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                names.add(sub if sub in known else target)
    return names


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every breach of the order in ``sources`` (module name -> (source text, is a package))."""
    known = set(sources)
    graph = {m: imported_names(m, text, pkg, known) for m, (text, pkg) in sources.items()}
    found = []
    for module in sorted(graph):
        layer = layer_of(module)
        if layer is None:
            found.append(f"{module}: not in the layer table of tests/test_layering.py (add it where it belongs)")
            continue
        rank = LAYERS[layer][0]
        for name in sorted(graph[module]):
            if not name.startswith("neurosim"):
                continue
            other = layer_of(name)
            if other is None:
                found.append(f"{module} imports {name}, which is in no layer")
            elif other != layer and LAYERS[other][0] >= rank:
                found.append(f"{module} ({layer}) imports {name} ({other}): a layer imports only from below")
    for module in sorted(graph):
        banned = FORBIDDEN.get(layer_of(module) or "", ())
        if not banned:
            continue
        seen, stack, via = {module}, [module], {module: None}
        while stack:
            current = stack.pop()
            for name in graph.get(current, ()):
                hit = next((b for b in banned if name == b or name.startswith(b + ".")), None)
                if hit is not None and not any(f.startswith(f"{module} reaches {hit}:") for f in found):
                    chain = [name, current]
                    while via[chain[-1]] is not None:
                        chain.append(via[chain[-1]])
                    found.append(f"{module} reaches {hit}: {' <- '.join(chain)}")
                if name in graph and name not in seen:   # one chain per banned name is enough to fix it
                    seen.add(name)
                    via[name] = current
                    stack.append(name)
    return found


def tree_sources(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_package)
    return out


def test_neurosim_imports_follow_the_layer_order():
    sources = tree_sources()
    assert "neurosim.engine" in sources and "neurosim.training.base" in sources
    assert violations(sources) == []


def _tree(**modules: str) -> dict[str, tuple[str, bool]]:
    """A synthetic tree: module name (dots as '__') -> source; '__init__' marks a package."""
    out = {}
    for key, text in modules.items():
        name = key.replace("__", ".")
        package = name.endswith(".init")
        out[name.removesuffix(".init")] = (text, package)
    return out


def test_the_checker_catches_an_upward_import_even_inside_a_function():
    tree = _tree(neurosim__device="import torch\n\ndef f():\n    from neurosim.crossbar import Crossbar\n",
                 neurosim__crossbar="from neurosim.device import DeviceSpec\n")
    assert violations(tree) == ["neurosim.device (device) imports neurosim.crossbar (crossbar): a layer "
                                "imports only from below"]
    # the downward import alone is fine, and so are peers of one layer
    assert violations(_tree(neurosim__crossbar="from neurosim.device import DeviceSpec\n"
                                               "from neurosim import wires\n",
                            neurosim__wires="import neurosim.crossbar\n", neurosim__device="")) == []


def test_the_checker_resolves_relative_imports_and_submodules():
    tree = _tree(neurosim__training__init="from .base import Trainer\n",
                 neurosim__training__base="from ..architectures import build_network\n"
                                          "from .. import runner\n",
                 neurosim__architectures="", neurosim__runner="")
    assert violations(tree) == ["neurosim.training.base (training) imports neurosim.runner (runner): a layer "
                                "imports only from below"]


@pytest.mark.parametrize(("tree", "expected"), [
    (_tree(neurosim__engine="import numpy\n\ndef f():\n    import torch.nn\n"),
     "neurosim.engine reaches torch: torch.nn <- neurosim.engine"),
    (_tree(neurosim__engine="from neurosim.config import check\n", neurosim__config="import torch\n"),
     "neurosim.engine reaches torch: torch <- neurosim.config <- neurosim.engine"),
    (_tree(neurosim__analysis="from neurosim import store\n", neurosim__store="import numpy\n",
           neurosim__training__init="", neurosim__training__base="x = 1\n"),
     None),
    (_tree(neurosim__analysis="from neurosim.training.base import x\n", neurosim__training__init="",
           neurosim__training__base="x = 1\n"),
     "neurosim.analysis reaches neurosim.training: neurosim.training.base <- neurosim.analysis"),
])
def test_the_checker_keeps_torch_out_of_the_engine_and_training_out_of_analysis(tree, expected):
    found = violations(tree)
    if expected is None:
        assert found == []
    else:
        assert expected in found


def test_a_module_outside_the_table_is_reported():
    assert violations(_tree(neurosim__newthing="")) == [
        "neurosim.newthing: not in the layer table of tests/test_layering.py (add it where it belongs)"]


def test_no_module_imports_a_module_that_imports_it_back():
    """No import cycle anywhere in neurosim (a gradient method never needs the trainer that calls it), counting
    imports inside functions: the graph of neurosim's own modules is acyclic."""
    graph: dict[str, set[str]] = {}
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path.read_text(), is_package)
    known = set(modules)
    for name, (source, is_package) in modules.items():
        graph[name] = {m for m in imported_names(name, source, is_package, known) if m in known and m != name
                       and not name.startswith(m + ".")}   # a package's submodule importing its package is fine
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
