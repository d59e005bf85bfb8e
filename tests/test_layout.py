"""The code's shape: imports run downward, no private name crosses a module, one home for each fact.

These read the source with ``ast`` (the import graph as written, lazy imports inside functions
included) and the registry as loaded.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from tiny import ARCHS, tiny_model

import hf_prope
from hf_prope.registry import ARCHITECTURES, GENERIC_CHECKED, supported_model_types

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject's package-dir).
PACKAGES = {
    "hf_prope": "hf_prope",
    "hf_prope/gguf": "hf_prope.gguf",
    "patches": "hf_prope.patches",
    "recipes": "hf_prope.recipes",
}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].stem == "__init__" else module.rsplit(".", 1)[0]
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in ``module``, lazy ones too."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                target = f"{source}.{alias.name}"
                # `from . import analysis` imports a module; `from .spec import PatchSpec` a name.
                found.append((target, None, node.lineno) if target in MODULES else (source, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m.split(".")[0] == "hf_prope"]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_across_modules() -> None:
    bad = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if target == "hf_prope._version":
                continue  # the version module: where __version__ is defined, by convention
            pieces = target.split(".") + ([name] if name else [])
            if any(_is_private(p) for p in pieces):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {'.'.join(pieces)}")
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_no_private_attribute_of_another_project_module_is_used() -> None:
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("hf_prope"):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if f"{_resolve(module, node)}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in aliases and aliases[root.id] != "_version":
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {root.id}...{node.attr}")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycles() -> None:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            # Importing a name from a package's __init__ is an edge to the package.
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != module:
                graph[module].add(target)
    # A package's __init__ re-exporting its submodules is the package itself, not an edge back.
    for package in PACKAGES.values():
        for child in list(graph[package]):
            if child.startswith(package + "."):
                graph[child].discard(package)
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_does_not_import_the_outer_layer() -> None:
    """The library core never reaches up into the recipes or the command line."""
    outer = {"hf_prope.cli", "hf_prope.benchmarks", "hf_prope.memory_probe", "hf_prope.__main__"}
    bad = []
    for module in MODULES:
        if module in outer or module.startswith("hf_prope.recipes"):
            continue
        for target, _, line in _imports(module):
            if target.startswith("hf_prope.recipes") or target in outer:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_every_module_says_what_it_holds() -> None:
    missing = [str(p.relative_to(ROOT)) for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_contributing_layout_names_every_module() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    layout = text[text.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 5)] if "\n## " in layout[5:] else layout
    names = {p.name for m, p in MODULES.items() if p.stem not in ("__init__", "__main__", "_version")}
    missing = sorted(n for n in names if not re.search(rf"`{re.escape(n)}`", layout))
    assert not missing, f"CONTRIBUTING.md's Layout section does not name: {missing}"


# ------------------------------------------------------------------------------------------------
# One home for the architectures


def test_every_registered_architecture_has_exactly_one_tiny_config() -> None:
    from hf_prope.registry import ARCHITECTURES

    assert sorted(ARCHS) == sorted(ARCHITECTURES), (
        "tests/tiny.ARCHS must hold one tiny config per architecture registered in patches/ "
        f"(registered: {sorted(ARCHITECTURES)}, tiny configs: {sorted(ARCHS)})"
    )
    # The generic path's types are built from transformers' config classes (tests/tiny.tiny_generic_config).
    assert supported_model_types() == sorted(set(ARCHITECTURES) | set(GENERIC_CHECKED))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_record_names_real_classes(model_type: str) -> None:
    arch = ARCHITECTURES[model_type]
    model = tiny_model(model_type)
    assert isinstance(model, arch.causal_lm_class)
    assert isinstance(model.config, arch.config_class)
    assert model.config.model_type == model_type
    assert isinstance(model.model, arch.base_model_class)
    assert any(isinstance(m, arch.rotary_class) for m in model.modules())
    assert any(isinstance(m, arch.attention_class) for m in model.modules())
    for norm in (arch.query_norm, arch.key_norm):
        if norm is not None:
            assert all(hasattr(m, norm) for m in model.modules() if isinstance(m, arch.attention_class))
    hf_prope.patch_model(model, "p-rope", p=0.5)  # and hf-prope can patch it
    assert hf_prope.patch_state(model).spec == hf_prope.PatchSpec("p-rope", p=0.5)


def test_sliding_window_facts_come_from_the_registry() -> None:
    from hf_prope.state import model_parts

    mistral = model_parts(tiny_model("mistral", sliding_window=8))
    assert [mistral.attention_span(i) for i in range(2)] == [8, 8]
    llama = model_parts(tiny_model("llama"))
    assert llama.attention_span(0) is None
    qwen = model_parts(tiny_model("qwen2"))
    assert [qwen.attention_span(i) for i in range(2)] == [8, None]  # sliding, full


# ------------------------------------------------------------------------------------------------
# One home for each list


def _string_collections(path: Path) -> list[tuple[int, set[str]]]:
    """Every list/tuple/set literal and dict's keys made of string constants, with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = (
            node.elts
            if isinstance(node, (ast.List, ast.Tuple, ast.Set))
            else node.keys
            if isinstance(node, ast.Dict)
            else None
        )
        if items:
            strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
            out.append((node.lineno, strings))
    return out


@pytest.mark.parametrize(
    "names,home,at_least",
    [("hf_prope.spec.PATCH_NAMES", "hf_prope.spec", 2), ("hf_prope.benchmarks.BENCHMARKS", "hf_prope.benchmarks", 3)],
)
def test_each_list_of_names_is_written_once(names: str, home: str, at_least: int) -> None:
    import importlib

    module, attr = names.rsplit(".", 1)
    wanted = set(getattr(importlib.import_module(module), attr))
    # Collections that share words with the patch names but are other lists.
    exempt = {
        "hf_prope.model_card": "the Hub tags of a card (p-rope, rope), not patch names",
        "hf_prope.recipes.ablation": "the ablation's variant names, which also name a RoPE base (rope@500k)",
    }
    copies = []
    for module_name, path in MODULES.items():
        if names.endswith("PATCH_NAMES") and module_name in exempt:
            continue
        for line, strings in _string_collections(path):
            if len(strings & wanted) >= at_least:
                copies.append((module_name, line))
    # the one definition (the Literal's arguments, or RUNNERS' keys) is the only collection that names them
    assert len(copies) == 1 and copies[0][0] == home, f"{names} is written out again at {copies}; derive it instead"


def test_the_p_rope_rounding_rule_lives_in_spec_only() -> None:
    bad = [
        f"{m}:{i + 1}"
        for m, path in MODULES.items()
        if m != "hf_prope.spec"
        for i, line in enumerate(path.read_text().splitlines())
        if re.search(r"int\(\s*p\s*\*", line) and not line.lstrip().startswith("#")
    ]
    assert not bad, f"int(p * d // 2) written outside hf_prope.spec.rotated_pairs: {bad}"
