"""The house as DESIGN.md draws it: every import in nbalign/ (deferred ones inside functions included)
points down the layers, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nbalign"

# Lower numbers sit lower. A module may import its own layer or any lower one; the engine's modules may
# import each other, but never in a circle. A new module must be placed here.
LAYERS = {
    "errors": 0, "version": 0, "clock": 0,
    "spec_fields": 1, "specs": 1, "adapters": 1, "preference_specs": 1, "text": 1, "outcomes": 1,
    # the engine
    "runfolder": 2, "devices": 2, "models": 2, "data": 2, "preference_data": 2, "scoring": 2, "tokens": 2, "batching": 2, "fastpaths": 2, "generation": 2, "export": 2,
    "evaluation": 2, "evalcache": 2, "memory": 2, "results": 2, "mixing": 2, "callbacks": 2, "plots": 2, "examples": 2,
    "labeling": 2, "labeling.rows": 2, "labeling.store": 2,
    "runs": 3, "labeling.candidates": 3, "labeling.judge": 3, "labeling.agreement": 3, "labeling.constitution": 3, "labeling.widgets": 3, "views": 3, "labeling.live": 4,
    "methods": 4, "methods.base": 4, "methods.card": 4, "methods.config": 4, "methods.inputs": 4, "methods.launch": 4, "methods.watching": 4, "methods.sft": 4, "methods.preference": 4,
    "methods.dpo": 4, "methods.kto": 4, "methods.reward": 4, "methods.rewards": 4, "methods.rlhf": 4, "methods.merge": 4,
    "_session": 5, "api": 5,
    "magics": 6,
    "__main__": 7, "__init__": 7,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """nbalign modules `path` imports anywhere in its body, as names relative to the package."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "nbalign":
                target = ".".join(node.module.split(".")[1:])
            else:
                continue
            candidates = [target] if target else []
            candidates += [f"{target}.{a.name}".lstrip(".") for a in node.names]
            found.update(c for c in candidates if c in LAYERS)
            if not target and not any(c in LAYERS for c in candidates):
                found.add("__init__")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            # importlib.import_module(".methods.x") or f".methods.{name}": the static part names the module.
            arg = node.args[0]
            text = arg.value if isinstance(arg, ast.Constant) else (
                arg.values[0].value if isinstance(arg, ast.JoinedStr) and arg.values
                and isinstance(arg.values[0], ast.Constant) else None)
            if isinstance(text, str) and text.startswith("."):
                static = [p for p in text.lstrip(".").split(".") if p]
                target = ".".join(static) if isinstance(arg, ast.Constant) else ".".join(static[:1])
                found.add(target if target in LAYERS else "__init__")
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
            # The package's lazy names: {"name": ("module", "attr")}.
            found.update(v.elts[0].value for v in node.value.values if v.elts[0].value in LAYERS)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nbalign":
                    found.add(".".join(parts[1:]) or "__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted(set(graph()) - set(LAYERS))
    assert not missing, f"place these modules in LAYERS (and in DESIGN's drawing): {missing}"


def test_imports_point_down_the_layers():
    upward = [
        f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
        for module, targets in graph().items()
        for target in targets
        if LAYERS[target] > LAYERS[module]
    ]
    assert not upward, "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder and the import reader see what they must."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # A deferred import inside a function counts, relative or absolute.
    assert {"runfolder", "generation"} <= imports_of(PACKAGE / "methods" / "base.py")
    assert "api" in imports_of(PACKAGE / "magics.py")  # `from . import api` inside a method
    assert "methods" in imports_of(PACKAGE / "api.py")  # importlib.import_module(f".methods.{module}")
    assert "_session" in imports_of(PACKAGE / "__init__.py")  # the lazy `nbalign.session`


def test_only_the_api_and_the_magics_read_the_session():
    # (and the package's top, which lends the object its public name, nbalign.session)
    readers = sorted(m for m, targets in graph().items() if "_session" in targets)
    assert readers == ["__init__", "api", "magics"], readers


def test_no_module_is_over_about_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 430}
    assert not long, long
