"""The package's layering (docs/architecture.md): rooms import only rooms below them, so no two
rooms import each other in a circle; objective names are compared only inside objectives/."""

from __future__ import annotations

import ast
from collections import defaultdict

from helpers import REPO
from jaxformer.objectives import OBJECTIVES

PACKAGE = REPO / "jaxformer"
# bottom to top; a room may import its own modules and any room of a lower layer
LAYERS = [
    {"errors"},
    {"config"},
    {"parallel", "tracking", "progress"},
    {"data"},
    {"models"},
    {"objectives", "interop"},
    {"runs"},
    {"training", "inference", "analysis"},
    {"cli"},
    # `python -m jaxformer.NAME`
    {"train", "prepare", "sample", "evaluate", "embed", "inspect", "compare"},
    {"jaxformer"},  # the package's __init__: jaxformer.load_run
]
LAYER_OF = {room: index for index, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    """`jaxformer.training.loop` -> `training`; `jaxformer.config` -> `config`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxformer"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def room_imports() -> dict[str, set[tuple[str, str]]]:
    """room -> {(imported room, importing module)} for every import of another room, deferred
    (inside a function) imports included."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("jaxformer.") and room_of(target) != room_of(name):
                    edges[room_of(name)].add((room_of(target), name))
    return edges


def test_every_room_has_a_layer():
    rooms = {room_of(name) for name in modules()} - {"jaxformer"}
    assert rooms <= set(LAYER_OF), f"rooms without a layer: {sorted(rooms - set(LAYER_OF))}"


def test_rooms_import_only_rooms_below_them():
    upward = sorted(f"{module} imports jaxformer.{target} ({room} is layer {LAYER_OF[room]}, "
                    f"{target} layer {LAYER_OF[target]})"
                    for room, targets in room_imports().items() for target, module in targets
                    if LAYER_OF[target] >= LAYER_OF[room])
    assert not upward, "\n".join(upward)


def test_no_room_imports_another_in_a_circle():
    """Independent of the layer table: a cycle in the room graph (Tarjan's SCCs)."""
    graph = {room: {target for target, _ in targets} for room, targets in room_imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(room: str) -> None:
        index[room] = low[room] = len(index)
        stack.append(room)
        for target in graph.get(room, ()):
            if target not in index:
                visit(target)
                low[room] = min(low[room], low[target])
            elif target in stack:
                low[room] = min(low[room], index[target])
        if low[room] == index[room]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == room:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for room in list(graph):
        if room not in index:
            visit(room)
    assert not cycles, f"rooms importing each other in a circle: {cycles}"


def test_objective_names_are_compared_only_inside_the_objectives_package():
    names = set(OBJECTIVES)
    found = []
    for module, tree in modules().items():
        if room_of(module) == "objectives":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = [c for operand in operands for c in ast.walk(operand)
                         if isinstance(c, ast.Constant) and c.value in names]
            found += [f"{module}:{node.lineno} compares with {c.value!r}" for c in constants]
    assert not found, "\n".join(found)
