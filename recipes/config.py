"""Recipe configuration: YAML files plus command-line overrides, read by ``HfArgumentParser``.

A recipe declares its settings as dataclasses (its own, and transformers' ``TrainingArguments``
where it trains). A config file is a flat YAML mapping of their fields; the command line adds
``key=value``, ``--key value``, ``--key=value`` or ``--no_key`` overrides, later ones winning.
Values typed on the command line are read as YAML (so ``[q_proj, v_proj]`` is a list) and then
converted with the parser's own type for that field, which also mends YAML 1.1's habit of
reading ``5e-4`` as a string. An unknown key is an error naming the closest valid one.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from hf_prope.suggestions import closest

CONFIG_PACKAGE = "hf_prope.recipes.configs"


def packaged_configs() -> list[str]:
    """Names (without ``.yaml``) of the config files installed with hf-prope."""
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A config file's path: a file as given, else a packaged config by name (``smollm2_135m_eval``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    packaged = resources.files(CONFIG_PACKAGE) / f"{name}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"No config file {str(name_or_path)!r}; packaged configs: {', '.join(packaged_configs())}."
        + closest(name, packaged_configs())
    )


def packaged_deepspeed_configs() -> list[str]:
    """Names (without ``.json``) of the DeepSpeed configs installed with hf-prope (``zero2``, ``zero3``)."""
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".json"))


def deepspeed_config(value: Any) -> Any:
    """``deepspeed=``: a dict as given, a JSON file's path, or a packaged config's name (``zero3``) -> its path.

    Checked here, before any work: TrainingArguments reads the file when it is built.
    """
    if value is None or isinstance(value, dict):
        return value
    text = str(value)
    if Path(text).is_file():
        return text
    name = text[:-5] if text.endswith(".json") else text
    packaged = resources.files(CONFIG_PACKAGE) / f"{name}.json"
    if "/" not in text and packaged.is_file():
        return str(packaged)
    names = packaged_deepspeed_configs()
    raise ValueError(
        f"deepspeed: no file {text!r} and no packaged DeepSpeed config of that name. Give a JSON file, a dict, or "
        f"one of {', '.join(names)} (ZeRO stage 2 or 3, its batch and precision settings filled in by Trainer)."
        + closest(name, names)
    )


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text()
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of key: value lines, got {type(values).__name__}.")
    return values


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``key=value`` / ``--key value`` / ``--key=value`` / ``--flag`` into a dict of raw strings."""
    out: dict[str, str] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            body = item[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                key, raw = body, items[i + 1]
                i += 1
            else:
                key, raw = body, "true"  # a bare --flag
        elif "=" in item:
            key, raw = item.split("=", 1)
        else:
            raise ValueError(f"Cannot read the override {item!r}: write key=value or --key value.")
        if not key:
            raise ValueError(f"Cannot read the override {item!r}: the key is empty.")
        out[key.replace("-", "_")] = raw
        i += 1
    return out


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's action per field name (not the ``--no_x`` twins of booleans)."""
    return {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings}


def _convert(key: str, item: Any, action: argparse.Action) -> Any:
    convert = action.type
    if isinstance(item, str) and convert is not None and convert is not str:
        try:
            item = convert(item)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(convert, "__name__", "its type").replace("string_to_bool", "true/false")
            raise ValueError(f"{key}: cannot read {item!r} as {kind}.") from None
    elif convert in (int, float) and (isinstance(item, bool) or not isinstance(item, (int, float))):
        raise ValueError(f"{key} takes a number, got {item!r}.")
    elif convert is float:
        item = float(item)
    elif convert is str and not isinstance(item, str):
        item = str(item)
    if action.choices is not None and item not in action.choices:
        choices = [str(c) for c in action.choices]
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {item!r}." + closest(str(item), choices))
    return item


# Settings that are a switch or a value: ``true`` is the switch, which TrainingArguments turns into its
# default (fsdp=True -> full_shard in every transformers 5 release), not a value named "true".
FLAG_SETTINGS = frozenset({"fsdp"})


def _takes_dict(dataclass_types: Sequence[type]) -> set[str]:
    """Settings whose type admits a dict (``fsdp_config``, ``deepspeed``, ``liger_kernel_config``...).

    Read from the classes' annotations: ``HfArgumentParser`` rewrites the dataclass fields' own types.
    """
    out = set()
    for t in dataclass_types:
        for klass in t.__mro__:
            out |= {
                name for name, hint in vars(klass).get("__annotations__", {}).items() if "dict" in str(hint).lower()
            }
    return out


def _coerce(key: str, value: Any, action: argparse.Action, *, takes_dict: bool = False) -> Any:
    """A YAML value or a raw command-line string, converted with the parser's type for ``key``."""
    import yaml

    if takes_dict:
        # As TrainingArguments takes them: a dict (from YAML or Python), or JSON text on the command line.
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}: cannot read {value!r} as JSON ({err}).") from None
        if isinstance(value, dict):
            return value
    if key in FLAG_SETTINGS and isinstance(value, (str, bool)):
        text = str(value).strip().lower()
        if text in ("true", "false"):
            return True if text == "true" else None

    if isinstance(value, str) and value.strip() in ("null", "~", "") + (
        ("none", "None") if action.type is not str else ()
    ):
        return None
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        if isinstance(value, str):
            loaded = yaml.safe_load(value) if value.lstrip().startswith("[") else None
            value = loaded if isinstance(loaded, list) else [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(key, v, action) for v in value]
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"{key} takes one value, got {value!r}.")
    return _convert(key, value, action)


# Trainer + DeepSpeed, checked on 2 CPU processes: 5.0.0 builds the schedule on the optimizer DeepSpeed then
# replaces (training stops at the first step), 5.1.0 trains with ZeRO-3's embedding weight never gathered;
# 5.5.0 and 5.24.0 pass tests/test_deepspeed.py.
DEEPSPEED_MIN_TRANSFORMERS = "5.5.0"


def _check_deepspeed_installed() -> None:
    import importlib.util

    import transformers
    from packaging.version import Version

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "deepspeed= needs DeepSpeed, which is not installed: pip install 'hf-prope[deepspeed]' (or pip install "
            "deepspeed)."
        )
    if Version(transformers.__version__) < Version(DEEPSPEED_MIN_TRANSFORMERS):
        raise ValueError(
            f"deepspeed= needs transformers >= {DEEPSPEED_MIN_TRANSFORMERS} (this is {transformers.__version__}, whose "
            f"Trainer fails under DeepSpeed ZeRO): pip install 'transformers>={DEEPSPEED_MIN_TRANSFORMERS}', or run "
            "without deepspeed= (DDP)."
        )


def parse_config(
    dataclass_types: Sequence[type],
    config: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] | dict[str, Any] = (),
    defaults: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Instances of ``dataclass_types`` from a YAML file (optional) and overrides; validated.

    ``defaults`` (e.g. facts about this machine) come before the file, which comes before
    the overrides.

    Raises ``ValueError`` for an unknown key (naming the closest), a value of the wrong type,
    or anything the dataclasses' own checks reject; ``FileNotFoundError`` for a missing file.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types))
    values: dict[str, Any] = dict(defaults or {})
    if config is not None:
        values.update(read_yaml(config_path(config)))
    values.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    actions = _actions(parser)
    dict_keys = _takes_dict(dataclass_types)
    for key in list(values):
        if key not in actions:
            if key.startswith("no_") and key[3:] in actions and str(values[key]).lower() == "true":
                values[key[3:]] = False  # --no_control
                del values[key]
                continue
            near = difflib.get_close_matches(key, list(actions), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise ValueError(f"Unknown config key {key!r}.{hint} `hf-prope run RECIPE --help` lists the keys.")
        values[key] = _coerce(key, values[key], actions[key], takes_dict=key in dict_keys)
    if values.get("deepspeed") is not None:
        values["deepspeed"] = deepspeed_config(values["deepspeed"])
        _check_deepspeed_installed()
    try:
        return tuple(parser.parse_dict(values))
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid configuration: {err}") from err
