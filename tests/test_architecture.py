"""The dependency rule, checked on every import in fedlayer/ (module- and function-level).

Neutral parts (layers, models, data, training, wire, ...)
<- methods <- server / client apps <- entry points (``commands``, ``report``).
Nothing imports upward, server and client never import each other, and
nothing imports in a circle.
"""

import ast
from pathlib import Path

import fedlayer

ROOT = Path(fedlayer.__file__).parent
#: Layer of each top-level part of the package; a module may import its own layer and those below.
LAYERS = {"methods": 1, "server": 2, "client": 2, "commands": 3, "report": 3}


def module_name(path: Path) -> str:
    parts = ["fedlayer", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py") if "_pb2" not in p.name}


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every fedlayer module ``module`` imports, at any depth of its code."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), module, package)


def imports_in(source: str, module: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {r for t in targets if (r := resolve(t)) and r != module and r.startswith("fedlayer")}
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer(module: str) -> int:
    return LAYERS.get(part(module), 0)


def test_no_import_breaks_the_dependency_rule():
    broken = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module) or {part(module), part(target)} == {"server", "client"}
    ]
    assert not broken, broken


def test_no_import_cycle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_checks_see_function_level_and_relative_imports():
    source = "def f():\n    from fedlayer.server.loop import FederatedRun\n    from ..client import app\n"
    found = imports_in(source, "fedlayer.methods.fedavg", "fedlayer.methods")
    assert {"fedlayer.server.loop", "fedlayer.client"} <= found
    assert all(layer(target) > layer("fedlayer.methods.fedavg") for target in found)


#: The wire's coding primitives (the LAQ grid quantiser, the bit packing): private to fedlayer/wire/.
WIRE_PRIVATE = ("fedlayer.wire.quantize", "fedlayer.wire.bitpack")


def test_only_the_wire_package_encodes_or_decodes_tensors():
    """What a tensor looks like on the wire is defined in fedlayer/wire/ alone: the quantiser and the
    bit packing live there and nothing outside it imports them (the codec stage and LAQ code tensors
    through ``wire.tensors``), and any generated protobuf module lies there too."""
    assert all(module in MODULES for module in WIRE_PRIVATE), "the coding primitives moved out of fedlayer/wire/"
    outside = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if part(module) != "wire"
        for target in targets
        if target in WIRE_PRIVATE
    ]
    assert not outside, outside
    generated = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*_pb2.py") if path.relative_to(ROOT).parts[0] != "wire"]
    assert not generated, generated


def test_methods_report_numbers_and_never_draw_or_write_reports():
    """A strategy fills a MethodReport; only the server writes and draws it (fedlayer.server.artifacts)."""
    drawing = [f"{module} -> {target}" for module, targets in GRAPH.items() if part(module) == "methods" for target in targets if target == "fedlayer.plots"]
    assert not drawing, drawing
    assert "fedlayer.plots" in GRAPH["fedlayer.server.artifacts"]
