"""Every entry point checks all of its input before any work and creates nothing until then.

Oracles: a global forward pre-hook counts forward passes (must be zero when input is bad);
the file system (no output folder left behind); the local Hub server's own request log; a
real HTTP server that fails; a fresh interpreter whose sockets record every connection.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hub_server import local_hub_fixture
from tiny import save_tiny

from hf_prope.cli import main
from hf_prope.data import python_docs_text

TOKEN = "hf_good"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source")
    text = root / "docs.txt"
    text.write_text(python_docs_text()[:20_000])
    return {
        "llama": save_tiny(root / "tiny-llama"),
        "gemma3": save_tiny(root / "tiny-gemma3", "gemma3_text"),
        "text": text,
    }


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from local_hub_fixture(monkeypatch, tmp_path / "hf-home")


@pytest.fixture
def forward_passes():
    """How many module forward passes ran while the test body ran (any module, any model)."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def lora_args(source, out: Path, **extra: str) -> list[str]:
    values = {
        "model": str(source["llama"]),
        "dataset": str(source["text"]),
        "output_dir": str(out),
        "p": "0.25",
        "block_size": "32",
        "eval_window": "32",
        "eval_windows": "2",
        "per_device_train_batch_size": "2",
        "max_steps": "2",
        "report_to": "none",
        "lora_r": "2",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error before the first forward pass, and nothing created


def test_zero_shot_rejects_a_layer_type_typo_before_any_forward_pass(source, capsys, forward_passes) -> None:
    code = main(
        [
            "zero-shot",
            "--model",
            str(source["gemma3"]),
            "--layer-types",
            "full_atention",
            "--window",
            "16",
            "--n-windows",
            "2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "Unknown layer type 'full_atention'" in err and "Did you mean 'full_attention'" in err
    assert forward_passes == []


@pytest.mark.parametrize("case", ["missing data", "lora target typo", "block too long", "layer type typo"])
def test_lora_run_with_bad_input_creates_no_output_folder(case, source, tmp_path, capsys, forward_passes) -> None:
    out = tmp_path / "X"
    extra, message = {
        "missing data": ({"dataset": str(tmp_path / "missing.txt")}, "does not exist"),
        "lora target typo": ({"lora_target_modules": "[q_prj]"}, "Did you mean 'q_proj'"),
        "block too long": ({"block_size": "4096"}, "longer than"),
        "layer type typo": ({"model": str(source["gemma3"]), "layer_types": "[full_atention]"}, "Unknown layer type"),
    }[case]
    assert main(["run", "lora", *lora_args(source, out, **extra)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), f"{case}: the run left {out} behind"
    assert forward_passes == []


def test_eval_recipe_with_bad_input_creates_nothing(source, tmp_path, capsys, forward_passes) -> None:
    out = tmp_path / "eval"
    args = [
        "run",
        "eval",
        f"model={source['gemma3']}",
        f"dataset={source['text']}",
        f"output_dir={out}",
        "contexts=[8,16]",
        "eval_tokens=64",
    ]
    assert main([*args, "layer_types=[global]"]) == 2
    assert "Unknown layer type 'global'" in capsys.readouterr().err
    assert main([*args, f"trained=[{tmp_path / 'no-such-save'}]"]) == 2
    assert "trained: no folder" in capsys.readouterr().err
    assert not out.exists() and forward_passes == []


def test_analyze_of_a_missing_model_creates_no_folder_and_says_what_was_tried(local_hub, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["analyze", "nonexistent-model", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'nonexistent-model' is neither an embedded model" in err
    assert "local .gguf file or model folder" in err
    assert "as a Hub model id it could not be fetched" in err
    assert "couldn't connect" not in err.lower()
    assert not out.exists()
    # A local path that is not there is named as one, with no Hub lookup.
    local_hub.clear_requests()
    assert main(["analyze", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "No model file or folder at" in capsys.readouterr().err
    assert local_hub.requests == [] and not out.exists()


def test_zero_shot_out_file_is_written_whole(source, tmp_path) -> None:
    out = tmp_path / "results" / "zs.json"
    assert (
        main(["zero-shot", "--model", str(source["llama"]), "--window", "16", "--n-windows", "2", "--out", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows][0] == "RoPE" and len(rows) == 6
    assert [p.name for p in out.parent.iterdir()] == ["zs.json"]  # no temporary file left beside it


# ------------------------------------------------------------------------------------------------
# Settings in results.json: credentials out, everything else in


def test_settings_keep_every_key_but_credentials(source, tmp_path) -> None:
    from hf_prope.recipes import AblationRecipe, ContextEvalRecipe, LoRARecipe

    secret = "hf_this_must_never_be_written"
    lora = LoRARecipe.from_config(
        None, {"model": str(source["llama"]), "output_dir": str(tmp_path / "l"), "max_steps": 1, "hub_token": secret}
    )
    settings = lora.settings()
    assert "hub_token" not in settings and secret not in json.dumps(settings, default=str)
    assert settings["max_steps"] == 1 and settings["lora_target_modules"]
    assert "average_tokens_across_devices" in settings  # "token" in its name, not a credential
    evaluation = ContextEvalRecipe.from_config(None, {"eval_tokens": 4096, "contexts": [512]})
    assert evaluation.settings()["eval_tokens"] == 4096
    ablation = AblationRecipe.from_config("ablation_python_docs", {"tokenizer": "smollm2-135m"})
    assert ablation.settings()["tokenizer"] == "smollm2-135m"


def test_recipes_are_built_from_named_settings() -> None:
    from hf_prope.recipes import ContextEvalRecipe
    from hf_prope.recipes.base import DataArguments, ModelArguments
    from hf_prope.recipes.context_eval import ContextEvalArguments

    recipe = ContextEvalRecipe(
        model_args=ModelArguments(),
        data_args=DataArguments(),
        eval_args=ContextEvalArguments(contexts=[64], eval_tokens=128),
    )
    assert recipe.eval_args.contexts == [64] and recipe.model_args.model == "smollm2-135m"
    with pytest.raises(TypeError, match="model_args=ModelArguments"):
        ContextEvalRecipe(ModelArguments(), DataArguments(), ContextEvalArguments())  # type: ignore[misc]
    with pytest.raises(TypeError, match="eval_args=ContextEvalArguments"):
        ContextEvalRecipe(model_args=ModelArguments(), data_args=DataArguments(), eval_args=DataArguments())


# ------------------------------------------------------------------------------------------------
# The token check tells a network failure from a rejected token


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_token_check_blames_the_network_not_the_token(tmp_path) -> None:
    import socket

    from huggingface_hub import HfApi

    from hf_prope.hub import check_token

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match="network failure, not a rejected token") as err:
        check_token(HfApi(endpoint=f"http://127.0.0.1:{closed}", token="hf_secret_value"))
    assert "hf_secret_value" not in str(err.value)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="HTTP 503.*the token was not checked"):
            check_token(HfApi(endpoint=f"http://127.0.0.1:{server.server_port}", token="hf_secret_value"))
    finally:
        server.shutdown()


def test_token_check_still_refuses_a_bad_token(local_hub) -> None:
    from huggingface_hub import HfApi

    from hf_prope.hub import check_token

    with pytest.raises(PermissionError, match="rejected.*HTTP 401"):
        check_token(HfApi(token="hf_wrong"))
    check_token(HfApi(token=TOKEN))  # accepted: no error


# ------------------------------------------------------------------------------------------------
# Importing hf_prope: no network, PEFT unchanged but for a local warning


_RECORD_CONNECTIONS = """
import socket, sys
attempts = []
original = socket.socket.connect
def connect(self, address):
    attempts.append(address)
    raise OSError("network disabled in this test")
socket.socket.connect = connect
"""


def test_import_makes_no_network_request() -> None:
    script = (
        _RECORD_CONNECTIONS
        + """
import hf_prope, hf_prope.recipes, hf_prope.cli
from peft import PeftModel
print(len(attempts), getattr(PeftModel.from_pretrained, "_hf_prope_wrapped", False),
      getattr(PeftModel.save_pretrained, "_hf_prope_wrapped", False))
"""
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_env(), "HF_HUB_OFFLINE": ""},
    )
    assert out.stdout.split() == ["0", "True", "True"], out.stderr[-2000:]


def test_peft_check_can_be_turned_off() -> None:
    script = """
import peft, transformers
before = (peft.PeftModel.from_pretrained.__func__, peft.PeftModel.save_pretrained, peft.PeftModel.load_adapter)
import hf_prope
after = (peft.PeftModel.from_pretrained.__func__, peft.PeftModel.save_pretrained, peft.PeftModel.load_adapter)
print(all(a is b for a, b in zip(before, after)))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_clean_env(), "HF_PROPE_PEFT_CHECK": "0"},
    )
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("HF_PROPE_")}


def test_plain_peft_load_from_the_hub_restores_without_a_request_of_its_own(local_hub, tmp_path, monkeypatch) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM

    import hf_prope

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    hf_prope.patch_model(base, "p-rope", p=0.25)
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    hf_prope.push_to_hub(adapted, "user/a", save_method="adapter")
    fresh_cache = tmp_path / "other-cache"  # nothing downloaded yet: only PEFT's own fetches will fill it
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    local_hub.clear_requests()
    PeftModel.from_pretrained(plain, "user/a", cache_dir=str(fresh_cache))
    assert hf_prope.get_patch(plain) == hf_prope.PatchSpec("p-rope", p=0.25)
    paths = [path for _, path in local_hub.requests]
    assert paths and not any("hf_prope_patch.json" in p for p in paths), paths


def test_loading_a_missing_local_save_names_the_path_and_asks_no_hub(local_hub, tmp_path) -> None:
    import hf_prope

    local_hub.clear_requests()
    with pytest.raises(FileNotFoundError, match="No saved model or adapter folder at"):
        hf_prope.from_pretrained(str(tmp_path / "out" / "adapter"))
    assert local_hub.requests == []


def test_main_job_without_an_extra_fails_before_any_work(tmp_path) -> None:
    """The recipes' extra is checked first: no model loaded, nothing written, the pip command named."""
    script = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("blocked")
sys.meta_path.insert(0, _Block())
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "matplotlib" else real(name, *a)
from hf_prope.cli import main
raise SystemExit(main([]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env()
    )
    assert out.returncode != 0
    assert "pip install 'hf-prope[recipes]'" in out.stderr and "matplotlib" in out.stderr, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# -- the command's help, before torch -------------------------------------------------------------

HELP_CASES = [["--help"], ["--version"], ["run", "--help"], ["run"], ["analyze", "--help"]] + [
    [c, "--help"] for c in ("zero-shot", "export", "bench")
]


def _light(args: list[str]) -> subprocess.CompletedProcess:
    """``hf-prope ARGS`` as the console script runs it, reporting whether torch was imported."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr))\n"
        f"sys.argv = ['/usr/bin/hf-prope', *{args!r}]\n"
        "from hf_prope.cli import main\n"
        "sys.exit(main())\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", HELP_CASES, ids=" ".join)
def test_help_prints_before_torch_is_imported_and_says_what_the_full_cli_says(args, capsys) -> None:
    light = _light(args)
    assert "NO-TORCH" in light.stderr, light.stderr
    try:
        status = main(args)  # in-process: hf_prope is fully imported, the heavy path
    except SystemExit as done:  # argparse ends --help / --version so
        status = int(done.code or 0)
    heavy = capsys.readouterr().out
    assert light.returncode == status
    assert light.stdout.strip() == heavy.strip()


def test_help_lists_are_read_from_their_one_place() -> None:
    from hf_prope import cli_help
    from hf_prope.benchmarks import BENCHMARKS
    from hf_prope.recipes import RECIPES, packaged_configs

    assert cli_help.benchmark_names() == list(BENCHMARKS)
    assert cli_help.recipe_summaries() == {n: (c.description, c.default_config) for n, c in RECIPES.items()}
    assert cli_help.packaged_config_names() == packaged_configs()
    assert not cli_help.help_requested(["/usr/bin/hf-prope", "run", "lora", "--help"])  # lists its keys: heavy
    assert not cli_help.help_requested(["/usr/bin/hf-prope"])  # the main job
    assert not cli_help.help_requested(["script.py", "--help"])  # someone else's program importing hf_prope
