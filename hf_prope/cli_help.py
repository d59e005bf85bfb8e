"""``hf-prope --help`` and each command's, printed before torch and transformers are imported.

Importing torch alone takes 1.5 s on a 2-core machine, hf_prope's own import 5 s. A help request
to the ``hf-prope`` command is answered from here, called first thing by ``hf_prope/__init__``:
the parser is :func:`hf_prope.cli.parser` (argparse only), and the lists it shows that live in
heavy modules (the benchmarks, the recipes) are read from their source with :mod:`ast`, so each
stays written in one place. ``hf-prope run RECIPE --help`` lists the recipe's keys from its
settings dataclasses (``TrainingArguments`` among them): that one imports transformers.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

_HELP = ("-h", "--help")
# Commands whose help the light path prints (``run RECIPE --help`` is not among them).
_LIGHT_COMMANDS = ("zero-shot", "export", "bench", "analyze", "run")


def help_requested(argv: list[str] | None = None) -> bool:
    """Whether this process is the ``hf-prope`` command asked only for help or its version."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).name != "hf-prope":
        return False
    args = argv[1:]
    if len(args) == 1 and args[0] in (*_HELP, "--version"):
        return True
    if args[:1] == ["run"]:
        return len(args) == 1 or (len(args) == 2 and args[1] in _HELP)
    return len(args) == 2 and args[0] in _LIGHT_COMMANDS and args[1] in _HELP


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"cannot find the {name} package")
    return Path(next(iter(spec.submodule_search_locations)))


def benchmark_names() -> list[str]:
    """The keys of :data:`hf_prope.benchmarks.RUNNERS`, in order, read from its source."""
    tree = ast.parse((Path(__file__).parent / "benchmarks.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "RUNNERS" and isinstance(node.value, ast.Dict):
            return [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    raise RuntimeError("hf_prope/benchmarks.py has no RUNNERS dict")


def recipe_summaries() -> dict[str, tuple[str, str | None]]:
    """Recipe name -> (description, default config), from the recipe classes' source."""
    out: dict[str, tuple[str, str | None]] = {}
    for path in sorted(_package_dir("hf_prope.recipes").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            attrs = {
                t.id: s.value.value
                for s in node.body
                if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                for t in s.targets
                if isinstance(t, ast.Name)
            }
            if isinstance(attrs.get("name"), str) and isinstance(attrs.get("description"), str):
                out[attrs["name"]] = (attrs["description"], attrs.get("default_config"))
    return out


def packaged_config_names() -> list[str]:
    """The packaged recipe configs (``recipes/configs/*.yaml``), as :func:`hf_prope.recipes.packaged_configs`."""
    return sorted(p.name[:-5] for p in (_package_dir("hf_prope.recipes") / "configs").glob("*.yaml"))


def _descriptions(recipes: dict[str, tuple[str, str | None]]) -> list[tuple[str, str]]:
    return [(name, recipes[name][0]) for name in sorted(recipes)]


def run_help(recipes: dict[str, tuple[str, str | None]], configs: list[str]) -> str:
    lines = ["usage: hf-prope run RECIPE [--config FILE_OR_NAME] [key=value | --key value ...]", "", "recipes:"]
    lines += [f"  {name:<10}{desc} (default config: {recipes[name][1]})" for name, desc in _descriptions(recipes)]
    lines += ["", f"packaged configs: {', '.join(configs)}", "", "hf-prope run RECIPE --help lists its keys."]
    return "\n".join(lines)


def analyze_help() -> str:
    return (
        "usage: hf-prope analyze MODEL [--out DIR] [key=value | --key value ...]\n\n"
        "MODEL: smollm2-135m, gemma-3-270m, a local .gguf file, a local model folder or a Hub model id.\n"
        "DIR: where report.json, summary.md and the PNG heat maps go (default: report).\n"
        "hf-prope run analyze --help lists every key."
    )


def print_help(argv: list[str] | None = None) -> int:
    """Print what ``hf-prope ARGS`` asks for (help or version) and return the exit status."""
    from .cli import parser

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        print(run_help(recipe_summaries(), packaged_config_names()))
        return 0 if len(args) > 1 else 2
    if args[:1] == ["analyze"]:
        print(analyze_help())
        return 0
    try:
        parser(benchmark_names()).parse_args(args)
    except SystemExit as done:  # argparse's way to end after --help / --version
        return int(done.code or 0)
    return 0
