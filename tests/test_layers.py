"""The package's architecture, checked: subpackages by layer, a lower layer never importing a
higher one, no import cycle (imports inside functions and under TYPE_CHECKING included), the
researcher's vocabulary importable from `harness` without paying for torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "harness"

# Bottom to top; a module may import its own layer and the layers before it.
LAYERS = ("data", "statistics", "runtime", "interventions", "measures", "judgment", "report", "plugin", "commands")


def module_name(path: Path) -> str:
    parts = path.relative_to(HARNESS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(HARNESS.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every harness module `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in known} or ({node.module} & known)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found


def layer(module: str) -> str | None:
    """The layer a module belongs to; None for the package's root (`harness`, `__main__`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path of modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_sits_in_a_layer_and_few_stay_at_the_top():
    mods = modules()
    top = [m for m in mods if m.count(".") == 1 and m.split(".")[1] not in LAYERS]
    assert len(top) <= 8, top
    assert {m.split(".")[1] for m in mods if m.count(".") >= 2} == set(LAYERS)


def test_a_layer_imports_only_itself_and_the_layers_below():
    wrong = []
    for m, deps in graph().items():
        if (own := layer(m)) is None:
            continue
        for d in deps:
            if (theirs := layer(d)) is not None and LAYERS.index(theirs) > LAYERS.index(own):
                wrong.append(f"{m} ({own}) imports {d} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The two checks above are only worth what they can catch."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    source = HARNESS / "runtime" / "codi.py"
    assert "harness.runtime.arch" in imports(source, set(modules()))
    assert layer("harness.judgment.kinds.base") == "judgment" and layer("harness") is None


VOCABULARY = ("AblateHeads", "PatchThoughts", "AttentionPattern", "PatchPath", "PatchSubspace", "Baseline",
              "TransplantHead", "Head", "heads_for", "claim_params")  # fmt: skip


@pytest.mark.parametrize("name", VOCABULARY)
def test_the_vocabulary_is_importable_from_the_package(name):
    import harness

    value = getattr(harness, name)
    assert name in harness.__all__ and value.__name__ == name and value.__module__.startswith("harness.")


def test_importing_the_package_and_the_init_command_does_not_import_torch():
    code = "import sys, harness, harness.commands.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
