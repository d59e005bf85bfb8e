"""The LoRA and eval recipes end to end on a tiny model, checked against independent measurements.

Oracles: perplexities recomputed here from transformers' own causal-LM loss on models built
here (fresh base, freshly patched, the saved adapter reloaded); the token stream recomputed
from the tokenizer; a second, uninterrupted run for kill-and-resume; the batches each rank
really fed to the model (a hook) for distributed runs; the Hub server's own record of commits.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import local_hub_fixture
from tiny import char_tokenizer, save_tiny
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.data import python_docs_text
from hf_prope.hub import PATCH_FILE
from hf_prope.recipes import ContextEvalRecipe, LoRARecipe
from hf_prope.recipes.lora import format_table

TOKEN = "hf_good"
BLOCK = 32
WINDOW = 32
N_WINDOWS = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source")
    text = root / "docs.txt"
    text.write_text(python_docs_text()[:30_000])
    return {"model": save_tiny(root / "tiny-llama"), "text": text}


def overrides(source: dict[str, Path], out: Path, **extra) -> dict:
    values = {
        "model": str(source["model"]),
        "dataset": str(source["text"]),
        "output_dir": str(out),
        "p": 0.25,
        "block_size": BLOCK,
        "eval_window": WINDOW,
        "eval_windows": N_WINDOWS,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "max_steps": 6,
        "save_steps": 3,
        "logging_steps": 1,
        "seed": 0,
        "report_to": "none",
        "disable_tqdm": True,
        "lora_r": 4,
        "lora_alpha": 8,
    }
    values.update(extra)
    return values


# objective name in a test id -> the recipe settings it stands for
OBJECTIVES = {
    "lm": {"objective": "lm"},
    "distill": {"objective": "distill"},
    "transfer": {"objective": "transfer"},
    # two layer-wise steps at their own learning rate, then self-distillation
    "staged": {"objective": "distill", "transfer_steps": 2, "transfer_learning_rate": 1e-2},
}


def loss_perplexity(model, ids: torch.Tensor, window: int = WINDOW, n: int = N_WINDOWS) -> float:
    """exp of transformers' own mean causal-LM loss over the last ``n`` windows (the oracle)."""
    windows = ids[-window * n :].reshape(n, window)
    model.eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def stream(source, model_dir=None) -> torch.Tensor:
    """The text tokenised by the tokenizer saved with the model (transformers picks its class by model type)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir or source["model"])
    return torch.tensor(tokenizer(source["text"].read_text(), add_special_tokens=False)["input_ids"])


def _losses(summary: dict, stage: str = "patched") -> list[float]:
    return [loss for _, loss in summary["loss_curves"][stage]]


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run") / "out"
    summary = LoRARecipe.from_config(
        None,
        overrides(
            source,
            out,
            eval_contexts=CONTEXTS,
            eval_extensions=["yarn:2", "temperature:2"],
            eval_passkey_lengths=[300],
        ),
    ).run()
    return {"out": out, "summary": summary}


CONTEXTS = [16, WINDOW, 64]  # the held-out WINDOW x N_WINDOWS = 128 tokens, cut three ways


def at(summary: dict, context: int = WINDOW) -> dict:
    """The figures of one evaluation context."""
    return summary["perplexity"][str(context)]


def native_yarn(source, factor: float = 2.0):
    """The tiny model as transformers itself builds it with YaRN (the oracle of the extension rows)."""
    rope = {"rope_type": "yarn", "factor": factor, "rope_theta": 10_000.0, "original_max_position_embeddings": 256}
    return AutoModelForCausalLM.from_pretrained(source["model"], rope_parameters=rope)


def test_lora_recipe_evaluates_under_context_extensions(source, trained) -> None:
    """(a) and (c) under YaRN and a temperature: transformers' own YaRN base, and the reloaded adapter extended."""
    from hf_prope.context_extension import extend_context

    summary, ids = trained["summary"], stream(source)
    yarn_base = native_yarn(source)
    adapter = hf_prope.from_pretrained(trained["out"] / "adapter")
    extend_context(adapter, "temperature:2")
    for context in CONTEXTS:
        p, n = at(summary, context), WINDOW * N_WINDOWS // context
        yarn, temp = p["extensions"]["YaRN x2"], p["extensions"]["temperature 1.07"]
        # This tiny model barely uses positions: the extensions move its perplexity by ~5e-6, so the oracle
        # must agree ten times closer than that for the check to tell an extension from none.
        assert yarn["base"] == pytest.approx(loss_perplexity(yarn_base, ids, context, n), rel=3e-7)
        assert temp["patched_after_training"] == pytest.approx(loss_perplexity(adapter, ids, context, n), rel=3e-7)
        assert temp["cost_over_original"] == pytest.approx(temp["patched_after_training"] / p["base"])
        assert abs(temp["patched_after_training"] / p["patched_after_training"] - 1) > 2e-6
    assert "(c) + YaRN x2" in format_table(summary)
    from transformers import AutoTokenizer

    from hf_prope.passkey import passkey_accuracy

    tok = AutoTokenizer.from_pretrained(source["model"])
    reloaded = hf_prope.from_pretrained(trained["out"] / "adapter")
    assert summary["passkey"]["patched_after_training"] == passkey_accuracy(reloaded, tok, lengths=[300])
    base = AutoModelForCausalLM.from_pretrained(source["model"])
    assert summary["passkey"]["base"] == passkey_accuracy(base, tok, lengths=[300])
    assert "passkey accuracy @ length" in format_table(summary)
    assert hf_prope.from_pretrained(trained["out"] / "adapter").config.rope_parameters["rope_type"] != "yarn"
    with pytest.raises(ValueError, match="method:factor"):
        LoRARecipe.from_config(None, overrides(source, trained["out"], eval_extensions=["yarn"]))


def test_lora_recipe_against_independent_measurements(source, trained) -> None:
    out, summary = trained["out"], trained["summary"]
    ids = stream(source)
    base = AutoModelForCausalLM.from_pretrained(source["model"])
    patched = hf_prope.patch_model(AutoModelForCausalLM.from_pretrained(source["model"]), "p-rope", p=0.25)
    # (c) and (d) are the saved artefacts themselves, reloaded
    adapter = hf_prope.from_pretrained(out / "adapter")
    assert hf_prope.get_patch(adapter) == hf_prope.PatchSpec("p-rope", p=0.25)
    control = hf_prope.from_pretrained(out / "control" / "final")
    assert hf_prope.get_patch(control) is None
    assert list(summary["perplexity"]) == [str(c) for c in CONTEXTS] and summary["contexts"] == CONTEXTS
    for context in CONTEXTS:
        p, n = at(summary, context), WINDOW * N_WINDOWS // context
        assert p["base"] == pytest.approx(loss_perplexity(base, ids, context, n), rel=1e-5)
        assert p["patched_before_training"] == pytest.approx(loss_perplexity(patched, ids, context, n), rel=1e-5)
        assert p["patched_after_training"] == pytest.approx(loss_perplexity(adapter, ids, context, n), rel=1e-5)
        assert p["control_after_training"] == pytest.approx(loss_perplexity(control, ids, context, n), rel=1e-5)
        assert p["cost_over_base"] == pytest.approx(p["patched_after_training"] / p["base"])
        assert p["gap_over_control"] == pytest.approx(p["patched_after_training"] / p["control_after_training"])
        assert p["extrapolation"] is False  # the tiny model's training length is 256
    p = at(summary)
    # training helped both, and the headline of the lm objective is (c)/(d)
    assert p["patched_after_training"] < p["patched_before_training"]
    assert p["control_after_training"] < p["base"]
    assert summary["objective"] == "lm" and summary["headline"]["metric"] == "gap_over_control"
    assert summary["headline"]["by_context"] == {str(c): at(summary, c)["gap_over_control"] for c in CONTEXTS}
    assert [s for s, _ in summary["loss_curves"]["patched"]] == [1, 2, 3, 4, 5, 6]
    assert summary["training"]["tokens_per_step"] == 2 * BLOCK


def test_lora_recipe_outputs(trained) -> None:
    out, summary = trained["out"], trained["summary"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["perplexity"] == summary["perplexity"]
    assert "hub_token" not in on_disk["settings"] and on_disk["settings"]["lora_r"] == 4
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    card = (out / "adapter" / "README.md").read_text()
    assert f"| gap @ {WINDOW} tokens (patched / control) | {at(summary)['gap_over_control']:.4g} |" in card
    assert {"adapter_model.safetensors", PATCH_FILE, "tokenizer.json"} <= {f.name for f in (out / "adapter").iterdir()}
    # every checkpoint carries the patch, so a checkpoint folder is never mistaken for plain RoPE
    record = json.loads((out / "patched" / "checkpoint-6" / PATCH_FILE).read_text())
    assert record["spec"] == hf_prope.PatchSpec("p-rope", p=0.25).to_dict()
    assert not [p.name for p in out.rglob(".*")]  # no temporary files left behind
    table = format_table(summary)
    assert "(c) patched + LoRA, 6 steps" in table and "(c)/(d) gap to the control" in table
    assert table.splitlines()[3].split()[-3:] == ["16", "32", "64"]  # one column per context


def test_without_control_and_merged_save(source, tmp_path) -> None:
    summary = LoRARecipe.from_config(
        None, overrides(source, tmp_path, control=False, save_method="merged", max_steps=2)
    ).run()
    assert at(summary)["control_after_training"] is None and at(summary)["gap_over_control"] is None
    assert summary["headline"]["metric"] == "cost_over_base"
    assert not (tmp_path / "control").exists()
    merged = hf_prope.from_pretrained(tmp_path / "merged")
    assert hf_prope.get_patch(merged) == hf_prope.PatchSpec("p-rope", p=0.25)
    assert at(summary)["patched_after_training"] == pytest.approx(loss_perplexity(merged, stream(source)), rel=1e-4)
    assert "(off)" in format_table(summary)


@pytest.mark.parametrize("objective", ["lm", "distill", "staged"])
def test_gradient_checkpointing_and_accumulation_do_not_change_training(
    objective, source, sharp_model, tmp_path
) -> None:
    """Same examples per step: 2 x 1 accumulated, or 1 x 2 with checkpointing, or 2 in one batch."""
    # Distillation needs a model whose patch changes its predictions measurably (sharp_model).
    model = str(source["model"] if objective == "lm" else sharp_model)

    def run(name, **extra):
        values = overrides(
            source, tmp_path / name, control=False, max_steps=3, model=model, **OBJECTIVES[objective], **extra
        )
        return LoRARecipe.from_config(None, values).run()

    plain = run("plain")
    checkpointed = run("gc", gradient_checkpointing=True)
    accumulated = run("acc", per_device_train_batch_size=1, gradient_accumulation_steps=2)
    for other in (checkpointed, accumulated):
        assert _losses(other) == pytest.approx(_losses(plain), rel=1e-4)
        assert at(other)["patched_after_training"] == pytest.approx(at(plain)["patched_after_training"], rel=1e-4)
    if objective != "staged":  # layer-wise steps do not aim at the perplexity itself
        assert at(plain)["patched_after_training"] < at(plain)["patched_before_training"]


def test_bf16_mixed_precision_trains(source, tmp_path) -> None:
    summary = LoRARecipe.from_config(None, overrides(source, tmp_path, control=False, max_steps=3, bf16=True)).run()
    p = at(summary)
    assert math.isfinite(p["patched_after_training"]) and p["patched_after_training"] < p["patched_before_training"]


@pytest.mark.parametrize("objective", ["distill", "staged"])
def test_bf16_distillation_trains(objective, source, sharp_model, tmp_path) -> None:
    summary = LoRARecipe.from_config(
        None,
        overrides(
            source,
            tmp_path,
            model=str(sharp_model),
            max_steps=3,
            bf16=True,
            save_method="merged",
            **OBJECTIVES[objective],
        ),
    ).run()
    assert all(math.isfinite(v) for _, v in summary["loss_curves"]["patched"])
    merged = hf_prope.from_pretrained(tmp_path / "merged")  # a merged save of a distilled model, with its patch
    assert hf_prope.get_patch(merged) == hf_prope.PatchSpec("p-rope", p=0.25)
    # Merging adds the LoRA product into the weights: fp32 rounding differs from the unmerged forward pass.
    assert at(summary)["patched_after_training"] == pytest.approx(loss_perplexity(merged, stream(source)), rel=1e-3)


_KILL_SCRIPT = """
import json, os, signal, sys
from transformers import TrainerCallback
from hf_prope.recipes import LoRARecipe

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if args.output_dir.endswith("patched") and state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: a real crash

recipe = LoRARecipe.from_config(None, json.loads(sys.argv[1]), callbacks=[KillAfterSave()])
recipe.run()
from hf_prope.distributed import end_process_group

end_process_group()
"""


def _env() -> dict[str, str]:
    # CPU and gloo whatever the machine: with one GPU visible, two processes would share it.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("objective", ["lm", "distill", "staged"])
def test_kill_and_resume_matches_uninterrupted_run(objective, source, tmp_path) -> None:
    # staged: killed after step 4, in the distillation stage, with the transfer stage's cached blocks gone
    staged = {"transfer_steps": 3, "transfer_blocks": 2, "lr_scheduler_type": "constant"}
    settings = {**OBJECTIVES[objective], **staged} if objective == "staged" else {}
    values = overrides(source, tmp_path / "killed", max_steps=8, save_steps=2, **(settings or OBJECTIVES[objective]))
    has_control = objective == "lm"  # a distillation's control is the original model itself
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    killed = subprocess.run(
        [sys.executable, str(script), json.dumps(values)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = Path(values["output_dir"])
    assert (out / "control" / "stage.json").is_file() == has_control and (out / "patched" / "checkpoint-4").is_dir()
    assert not (out / "results.json").exists() and not (out / "adapter").exists()
    control_record = (out / "control" / "stage.json").read_text() if has_control else None

    with pytest.raises(FileExistsError, match="resume=true"):
        LoRARecipe.from_config(None, values).setup()
    resumed = LoRARecipe.from_config(None, {**values, "resume": True}).run()
    reference = LoRARecipe.from_config(None, {**values, "output_dir": str(tmp_path / "reference")}).run()

    if has_control:
        assert (out / "control" / "stage.json").read_text() == control_record  # the finished stage was not redone
    assert json.loads((out / "patched" / "stage.json").read_text())["global_step"] == 8
    assert [s for s, _ in resumed["loss_curves"]["patched"]] == list(range(1, 9))
    assert _losses(resumed) == pytest.approx(_losses(reference), rel=1e-4)
    if objective == "staged":
        history = json.loads((out / "patched" / "stage.json").read_text())["log_history"]
        rates = [e["learning_rate"] for e in history if "loss" in e]
        assert rates == pytest.approx([1e-2] * 3 + [3e-3] * 5)  # the transfer stage's rate, then learning_rate
    for key in ("patched_after_training", "control_after_training"):
        if at(reference)[key] is not None:
            assert at(resumed)[key] == pytest.approx(at(reference)[key], rel=1e-4)
    assert (at(resumed)["control_after_training"] is None) == (not has_control)


_DDP_SCRIPT = """
import hashlib, json, os, sys
from pathlib import Path
from transformers import TrainerCallback
from hf_prope.recipes import LoRARecipe

record_dir = Path(sys.argv[1])

class RecordBatches(TrainerCallback):
    # What each rank really fed to the model while training: a hash per example.
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.seen = []
        def hook(module, inputs):
            self.seen.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in inputs[0])
        self.handle = model.get_input_embeddings().register_forward_pre_hook(hook)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.handle.remove()
        stage = Path(args.output_dir).name
        (record_dir / f"{stage}-rank{os.environ['RANK']}.json").write_text(json.dumps(self.seen))
        # The trained adapter as this rank holds it: equal on both ranks only if gradients were synchronised.
        weights = [p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_" in n]
        (record_dir / f"{stage}-rank{os.environ['RANK']}-weights.json").write_text(json.dumps(weights))

recipe = LoRARecipe.from_config(None, json.loads(sys.argv[2]), callbacks=[RecordBatches()])
recipe.run()
from hf_prope.distributed import end_process_group

end_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from local_hub_fixture(monkeypatch, tmp_path / "hf-home")


@pytest.mark.parametrize(
    "launcher,objective", [("torchrun", "lm"), ("accelerate", "lm"), ("torchrun", "distill"), ("torchrun", "transfer")]
)
def test_two_processes_split_the_data_and_only_rank0_writes_and_pushes(
    launcher, objective, source, local_hub, tmp_path
) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo("user/tiny-base")
    api.upload_folder(repo_id="user/tiny-base", folder_path=source["model"])  # the model comes from the Hub
    records = tmp_path / "records"
    records.mkdir()
    out = tmp_path / "out"
    steps, batch = 3, 2
    values = overrides(
        source, out, model="user/tiny-base", max_steps=steps, hub_model_id="user/tiny-p25", objective=objective
    )
    stages = ("control", "patched") if objective == "lm" else ("patched",)
    if objective == "transfer":
        values["learning_rate"] = 3e-2  # large enough that the ranks would visibly drift apart unsynchronised
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        # accelerate's --cpu mode starts one process (several need an MPI hostfile); --multi_gpu starts
        # torchrun-style workers, and the recipe picks the CPU (gloo) backend when there is no GPU.
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
        ]
    result = subprocess.run(
        [*cmd, str(script), str(records), json.dumps(values)],
        capture_output=True,
        text=True,
        env={**_env(), "HF_TOKEN": TOKEN},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert TOKEN not in result.stdout + result.stderr
    for stage in stages:
        seen = [json.loads((records / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
        # A distilling student's teacher reads the same blocks first (its own forward pass), so twice; a
        # layer-wise student starts from the teacher's attention inputs, so only the teacher reads them.
        assert len(seen[0]) == len(seen[1]) == steps * batch * (2 if objective == "distill" else 1)
        assert not set(seen[0]) & set(seen[1]), "both ranks trained on the same blocks"
        weights = [json.loads((records / f"{stage}-rank{r}-weights.json").read_text()) for r in (0, 1)]
        assert weights[0] == weights[1], "the ranks' adapters drifted apart: gradients were not synchronised"
    summary = json.loads((out / "results.json").read_text())
    assert summary["training"]["world_size"] == 2 and summary["training"]["tokens_per_step"] == 2 * batch * BLOCK
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter", *stages, "results.json", "results.png"])
    commits = [p for m, p in local_hub.requests if m == "POST" and "/commit/" in p and "tiny-p25" in p]
    assert len(commits) == 1  # one push, from rank 0 only
    files = set(local_hub.files("user/tiny-p25"))
    assert {PATCH_FILE, "adapter_model.safetensors", "README.md"} <= files
    pushed = hf_prope.from_pretrained("user/tiny-p25", token=TOKEN)
    ids = stream(source)
    assert at(summary)["patched_after_training"] == pytest.approx(loss_perplexity(pushed, ids), rel=1e-5)


def test_lora_recipe_writes_and_pushes_a_gguf_that_carries_the_patch(local_hub, tmp_path) -> None:
    from hf_prope.gguf import STOPPED_FACTOR, read_rope_factors

    source = {"model": save_tiny(tmp_path / "tiny-bpe", vocab_size=320), "text": tmp_path / "docs.txt"}
    source["text"].write_text(python_docs_text()[:30_000])
    out = tmp_path / "out"
    values = overrides(
        source,
        out,
        control=False,
        max_steps=2,
        gguf="f32",
        hub_model_id="user/tiny-gguf",
        hub_token=TOKEN,
        push_to_hub=True,
    )
    LoRARecipe.from_config(None, values).run()
    saved = out / "adapter" / "model.gguf"
    assert read_rope_factors(saved) == pytest.approx([1, 1] + [float(torch.tensor(STOPPED_FACTOR).item())] * 6)
    assert "this repo's `model.gguf`" in (out / "adapter" / "README.md").read_text()
    assert {"model.gguf", "adapter_model.safetensors", PATCH_FILE} <= set(local_hub.files("user/tiny-gguf"))
    # The file holds the trained model: LoRA merged, the patch restored from rope_freqs.
    from_gguf = hf_prope.from_pretrained(saved)
    trained = hf_prope.from_pretrained(out / "adapter").merge_and_unload()
    ids = stream(source, source["model"])[-64:][None]
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)
    assert hf_prope.get_patch(from_gguf) == hf_prope.PatchSpec("p-rope", p=0.25)


def test_gguf_setting_is_checked_before_training(source, tmp_path) -> None:
    from hf_prope.gguf import GGUFExportError

    out = tmp_path / "out"
    # The tiny source's tokenizer is character-level, which a llama.cpp vocabulary cannot hold.
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        LoRARecipe.from_config(None, overrides(source, out, gguf="f16")).setup()
    with pytest.raises(GGUFExportError, match="only to some layers"):
        LoRARecipe.from_config(None, overrides(source, out, gguf="f16", layers=[0])).setup()
    with pytest.raises(ValueError, match="gguf must be one of f16, f32, bf16"):
        LoRARecipe.from_config(None, overrides(source, out, gguf="q4"))
    assert not (out / "control").exists() and not (out / "patched").exists()


# ------------------------------------------------------------------------------------------------
# bad input: a clear error before any training


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=128, n_positions=64)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _bad_cases(source, tmp_path, gpt2_folder):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return {
        "missing data file": ({"dataset": str(tmp_path / "nope.jsonl")}, FileNotFoundError, "does not exist"),
        "empty dataset": ({"dataset": str(empty)}, ValueError, "holds no text"),
        "block too long": ({"block_size": 512}, ValueError, "longer than"),
        "unsupported model": ({"model": str(gpt2_folder)}, ValueError, "gpt2"),
        "unwritable output": ({"output_dir": str(blocker / "out")}, PermissionError, "cannot be written"),
        "too little data": ({"eval_windows": 2000}, ValueError, "training blocks"),
        "lora target typo": ({"lora_target_modules": ["q_prj"]}, ValueError, "Did you mean 'q_proj'"),
        "bad layer": ({"patch": "nope", "layers": [99]}, ValueError, "99"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing data file",
        "empty dataset",
        "block too long",
        "unsupported model",
        "unwritable output",
        "too little data",
        "lora target typo",
        "bad layer",
    ],
)
def test_bad_input_fails_before_training(case, source, tmp_path, gpt2_folder) -> None:
    extra, error, message = _bad_cases(source, tmp_path, gpt2_folder)[case]
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(None, overrides(source, out, **extra))
    with pytest.raises(error, match=message):
        recipe.setup()
    assert not (out / "control").exists() and not (out / "patched").exists()


def test_cli_reports_bad_input_in_one_line(source, tmp_path, capsys) -> None:
    from hf_prope.cli import main

    args = [f"{k}={v}" for k, v in overrides(source, tmp_path, dataset=str(tmp_path / "missing.json")).items()]
    assert main(["run", "lora", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-prope: error: The data file") and "Traceback" not in err
    assert main(["run", "lora", "--config", "smollm2_135m_quick", "lora_rnk=3"]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_hub_token_checked_before_training(source, local_hub, tmp_path) -> None:
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(None, overrides(source, out, hub_model_id="user/x"))
    with pytest.raises(PermissionError, match="token is missing or was rejected"):
        recipe.setup()
    assert not any(m == "POST" for m, _ in local_hub.requests)
    assert not (out / "control").exists()


# ------------------------------------------------------------------------------------------------
# the eval recipe


def test_eval_recipe_by_context_against_independent_measurements(source, trained, tmp_path) -> None:
    out = tmp_path / "eval"
    recipe = ContextEvalRecipe.from_config(
        None,
        {
            "model": str(source["model"]),
            "dataset": str(source["text"]),
            "output_dir": str(out),
            "p": [1.0, 0.5],
            "contexts": [8, 16, 64],
            "eval_tokens": 128,
            "trained": [str(trained["out"] / "adapter")],
        },
    )
    summary = recipe.run()
    ids = stream(source)
    rows = {r["variant"]: r["perplexity"] for r in summary["rows"]}
    assert list(rows) == ["RoPE", "p=0.5", "trained: out"]
    base = AutoModelForCausalLM.from_pretrained(source["model"])
    for context in (8, 16, 64):
        assert rows["RoPE"][context] == pytest.approx(loss_perplexity(base, ids, context, 128 // context), rel=1e-5)
    hf_prope.patch_model(base, "p-rope", p=0.5)
    assert rows["p=0.5"][16] == pytest.approx(loss_perplexity(base, ids, 16, 8), rel=1e-5)
    adapter = hf_prope.from_pretrained(trained["out"] / "adapter")
    assert rows["trained: out"][64] == pytest.approx(loss_perplexity(adapter, ids, 64, 2), rel=1e-5)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"][0]["perplexity"]["16"] == rows["RoPE"][16]
    assert on_disk["settings"]["eval_tokens"] == 128
    assert (out / "perplexity_by_context.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["training_length"] == 256


def test_eval_recipe_long_context_variants_document_windows_and_passkey(source, trained, tmp_path) -> None:
    """Extensions x variants, windows inside documents, passkey: each figure against its own oracle."""
    from transformers import AutoTokenizer

    from hf_prope.context_extension import extend_context
    from hf_prope.passkey import passkey_accuracy

    docs = tmp_path / "docs"
    docs.mkdir()
    text = source["text"].read_text()
    (docs / "a.txt").write_text(text[:3000])
    (docs / "b.txt").write_text(text[5000:5200])  # too short: left out
    (docs / "c.txt").write_text(text[8000:11000])
    out = tmp_path / "eval"
    summary = ContextEvalRecipe.from_config(
        None,
        {
            "model": str(source["model"]),
            "dataset": str(docs),
            "output_dir": str(out),
            "p": [1.0, 0.5],
            "extensions": ["none", "yarn:2", "temperature:2"],
            "contexts": [64, 512],  # 512 > the model's 256: past its training length
            "eval_tokens": 1024,
            "windows": "documents",
            "trained": [str(trained["out"] / "adapter")],
            "passkey_lengths": [300, 400],
            "passkey_depths": [0.0, 1.0],
            "passkey_trials": 1,
        },
    ).run()
    rows = {r["variant"]: r for r in summary["rows"]}
    temperature = "temperature 1.07"
    assert list(rows) == [
        "RoPE",
        "YaRN x2",
        temperature,
        "p=0.5",
        "p=0.5 + YaRN x2",
        f"p=0.5 + {temperature}",
        "trained: out",
        "trained: out + YaRN x2",
        f"trained: out + {temperature}",
    ]
    assert summary["documents"] == 2
    # The oracle: the first 1024 tokens of a.txt and of c.txt, each cut alone; transformers' own loss.
    tok = AutoTokenizer.from_pretrained(source["model"])
    firsts = [
        torch.tensor(tok(p.read_text(), add_special_tokens=False)["input_ids"][:1024])
        for p in (docs / "a.txt", docs / "c.txt")
    ]
    assert all(len(f) == 1024 for f in firsts)

    def doc_perplexity(model, window):
        windows = torch.cat([f.reshape(-1, window) for f in firsts])
        model.eval()
        with torch.no_grad():
            losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
        return math.exp(sum(losses) / len(losses))

    base = AutoModelForCausalLM.from_pretrained(source["model"])
    assert rows["RoPE"]["perplexity"][512] == pytest.approx(doc_perplexity(base, 512), rel=1e-5)
    yarn = native_yarn(source)
    assert rows["YaRN x2"]["perplexity"][512] == pytest.approx(doc_perplexity(yarn, 512), rel=1e-5)
    hf_prope.patch_model(yarn, "p-rope", p=0.5)
    assert rows["p=0.5 + YaRN x2"]["perplexity"][64] == pytest.approx(doc_perplexity(yarn, 64), rel=1e-5)
    adapter = hf_prope.from_pretrained(trained["out"] / "adapter")
    extend_context(adapter, "temperature:2")
    assert rows[f"trained: out + {temperature}"]["perplexity"][512] == pytest.approx(
        doc_perplexity(adapter, 512), rel=1e-5
    )
    assert rows["trained: out"]["spec"] == hf_prope.get_patch(adapter).to_dict()
    assert rows["YaRN x2"]["extension"] == {"method": "yarn", "factor": 2.0}
    # passkey: the recipe's table is passkey_accuracy's on the same model
    expected = passkey_accuracy(base, tok, lengths=[300, 400], depths=[0.0, 1.0], trials=1)
    assert rows["RoPE"]["passkey"] == expected
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["rows"][1]["perplexity"]["512"] == rows["YaRN x2"]["perplexity"][512]
    for name in ("perplexity_by_context.png", "passkey.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_eval_recipe_long_context_bad_input(source, tmp_path) -> None:
    with pytest.raises(ValueError, match="method:factor"):
        ContextEvalRecipe.from_config(None, {"extensions": ["yarn"]})
    with pytest.raises(ValueError, match="twice"):
        ContextEvalRecipe.from_config(None, {"extensions": ["yarn:2", "yarn:2.0"]})
    with pytest.raises(ValueError, match="passkey_lengths"):
        ContextEvalRecipe.from_config(None, {"passkey_lengths": [16]})
    with pytest.raises(ValueError, match="windows=documents"):
        ContextEvalRecipe.from_config(None, {"max_documents": 2})
    with pytest.raises(ValueError, match="not a device torch knows"):
        ContextEvalRecipe.from_config(None, {"device": "tpu9"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no GPU"):
            ContextEvalRecipe.from_config(None, {"device": "cuda"})
    base = {"model": str(source["model"]), "dataset": str(source["text"]), "output_dir": str(tmp_path / "o")}
    recipe = ContextEvalRecipe.from_config(
        None, {**base, "windows": "documents", "eval_tokens": 10**6, "contexts": [64]}
    )
    with pytest.raises(ValueError, match="No document has 1000000 tokens"):
        recipe.setup()
    recipe = ContextEvalRecipe.from_config(
        None, {**base, "passkey_lengths": [64], "contexts": [64], "eval_tokens": 128}
    )
    with pytest.raises(ValueError, match="A passkey prompt needs at least"):
        recipe.setup()
    assert not (tmp_path / "o" / "results.json").exists()


def test_recipes_load_a_saved_layer_selective_model_with_its_hooks(source, tmp_path) -> None:
    """Every recipe loads through the one loader: a per-layer patch (hooks, not config) comes back wherever it is read."""
    from hf_prope.recipes.base import ModelArguments

    model_dir = save_tiny(tmp_path / "sharp", initializer_range=0.3)  # large weights: the hooks matter

    patched = AutoModelForCausalLM.from_pretrained(model_dir)
    hf_prope.patch_model(patched, "nope", layers=[0, 1, 2])
    saved = hf_prope.save_pretrained(patched, tmp_path / "selective", tokenizer=char_tokenizer())
    ids = stream(source)
    expected = loss_perplexity(patched, ids, 64, 2)
    plain = loss_perplexity(AutoModelForCausalLM.from_pretrained(model_dir), ids, 64, 2)
    assert abs(expected - plain) > 1e-3 * plain  # the hooks change the model: a load without them is caught
    loaded, _ = ModelArguments(model=str(saved)).load()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(patched)
    assert loss_perplexity(loaded, ids, 64, 2) == pytest.approx(expected, rel=1e-6)
    out = tmp_path / "eval"
    summary = ContextEvalRecipe.from_config(
        None,
        {
            "model": str(model_dir),
            "dataset": str(source["text"]),
            "output_dir": str(out),
            "p": [1.0],
            "contexts": [64],
            "eval_tokens": 128,
            "trained": [str(saved)],
        },
    ).run()
    rows = {r["variant"]: r["perplexity"] for r in summary["rows"]}
    assert rows["trained: selective"][64] == pytest.approx(expected, rel=1e-5)
    assert rows["RoPE"][64] == pytest.approx(plain, rel=1e-5)


def test_eval_recipe_bad_input(source, tmp_path) -> None:
    with pytest.raises(ValueError, match="exceeds eval_tokens"):
        ContextEvalRecipe.from_config(None, {"contexts": [64, 512], "eval_tokens": 256})
    recipe = ContextEvalRecipe.from_config(
        None,
        {
            "model": str(source["model"]),
            "dataset": str(source["text"]),
            "output_dir": str(tmp_path),
            "layer_types": ["full_attention"],
        },
    )
    with pytest.raises(ValueError, match="layer"):
        recipe.setup()


def test_overwrite_discards_the_old_run_only_after_every_check_passed(source, tmp_path) -> None:
    out = tmp_path / "out"
    (out / "patched").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    bad = LoRARecipe.from_config(None, overrides(source, out, overwrite=True, dataset=str(tmp_path / "missing.txt")))
    with pytest.raises(FileNotFoundError):
        bad.setup()
    assert (out / "results.json").read_text() == "{}" and (out / "patched").is_dir()
    LoRARecipe.from_config(None, overrides(source, out, overwrite=True)).setup()
    assert not (out / "results.json").exists() and not (out / "patched").exists()


@pytest.mark.parametrize(
    "model_type, patch",
    [
        ("gemma3_text", {"layer_types": ["full_attention"]}),  # native per-layer-type config (Gemma 4 layout)
        ("qwen2", {"layers": [1, 4]}),
    ],  # per-layer hooks, which a config cannot carry
)
def test_lora_recipe_with_layer_selective_patches(model_type, patch, source, tmp_path) -> None:
    model_dir = save_tiny(tmp_path / model_type, model_type)
    out = tmp_path / "out"
    summary = LoRARecipe.from_config(
        None, overrides(source, out, model=str(model_dir), control=False, max_steps=2, **patch)
    ).run()
    expected = hf_prope.PatchSpec("p-rope", p=0.25, **{k: tuple(v) for k, v in patch.items()})
    reloaded = hf_prope.from_pretrained(out / "adapter")
    assert hf_prope.get_patch(reloaded) == expected
    assert at(summary)["patched_after_training"] == pytest.approx(
        loss_perplexity(reloaded, stream(source, model_dir)), rel=1e-5
    )


# ------------------------------------------------------------------------------------------------
# objective=distill: self-distillation from the unpatched model


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory) -> Path:
    """A tiny model whose predictions are further from uniform (larger weights), so a patch moves them more."""
    return save_tiny(tmp_path_factory.mktemp("sharp") / "tiny-sharp", initializer_range=0.1)


def _kl_to_original(student, teacher, blocks: torch.Tensor) -> float:
    """Mean KL(teacher || student) per predicted token, written out over the whole vocabulary (the oracle)."""
    with torch.no_grad():
        s = torch.log_softmax(student(blocks).logits.double(), -1)[:, :-1]
        t = torch.log_softmax(teacher(blocks).logits.double(), -1)[:, :-1]
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distill_recipe_moves_the_patched_model_back_to_the_original(sharp_model, tmp_path) -> None:
    # Two training blocks, both in every batch: the distillation objective is minimised on exactly these.
    text = tmp_path / "short.txt"
    text.write_text(python_docs_text()[: WINDOW * N_WINDOWS + 2 * BLOCK + 8])
    out = tmp_path / "distill"
    values = overrides(
        {"model": sharp_model, "text": text},
        out,
        objective="distill",
        eval_contexts=[16, WINDOW],
        max_steps=20,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        lora_r=8,
        lora_alpha=16,
        save_steps=10,
    )
    recipe = LoRARecipe.from_config(None, values)
    summary = recipe.run()
    ids = stream({"text": text}, sharp_model)
    original = AutoModelForCausalLM.from_pretrained(sharp_model)
    before = hf_prope.patch_model(AutoModelForCausalLM.from_pretrained(sharp_model), "p-rope", p=0.25)
    after = hf_prope.from_pretrained(out / "adapter")
    for context in (16, WINDOW):
        p, n = at(summary, context), WINDOW * N_WINDOWS // context
        assert p["base"] == pytest.approx(loss_perplexity(original, ids, context, n), rel=1e-5)
        assert p["patched_before_training"] == pytest.approx(loss_perplexity(before, ids, context, n), rel=1e-5)
        assert p["patched_after_training"] == pytest.approx(loss_perplexity(after, ids, context, n), rel=1e-5)
        assert p["control_after_training"] is None
        assert p["cost_over_base"] == pytest.approx(p["patched_after_training"] / p["base"])
    # The oracle: the KL to the original model on the training blocks, before and after training.
    blocks = recipe.split.train_blocks
    assert blocks.shape[0] == 2
    kl_before, kl_after = _kl_to_original(before, original, blocks), _kl_to_original(after, original, blocks)
    assert kl_before > 1e-3 and kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert summary["objective"] == "distill" and summary["headline"]["metric"] == "cost_over_base"
    assert summary["distillation"] == {"distill_weight": 1.0, "temperature": 1.0, "chunk_tokens": 1024}
    assert not (out / "control").exists()
    history = json.loads((out / "patched" / "stage.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    assert logged and all(e["distill_kl"] == pytest.approx(e["loss"], rel=1e-4) for e in logged)
    assert logged[0]["loss"] == pytest.approx(kl_before, rel=1e-3)  # step 1's loss is the KL before training
    table = format_table(summary)
    assert "headline, cost over the original model:" in table and "(d) control" not in table


def _attention_error(student, teacher, blocks: torch.Tensor) -> float:
    """Mean over layers of the student's attention error on the teacher's attention inputs (the oracle).

    Both through the models' own forward passes: the teacher's inputs and outputs captured by
    hooks, then fed to the student's attention modules by hooks.
    """
    from hf_prope.state import model_parts

    def attentions(model):
        return [m for _, m in sorted(model_parts(model).attentions.items())]

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, a, k, o: seen.append((k["hidden_states"], o[0])), with_kwargs=True)
        for m in attentions(teacher)
    ]
    with torch.no_grad():
        teacher(blocks)
    for h in hooks:
        h.remove()
    got: list[torch.Tensor] = []
    hooks = []
    for (x, _), m in zip(seen, attentions(student)):
        hooks.append(m.register_forward_pre_hook(lambda m, a, k, x=x: (a, {**k, "hidden_states": x}), with_kwargs=True))
        hooks.append(m.register_forward_hook(lambda m, a, k, o: got.append(o[0]), with_kwargs=True))
    with torch.no_grad():
        student(blocks)
    for h in hooks:
        h.remove()
    return sum(float(((s - t) ** 2).mean() / (t**2).mean()) for s, (_, t) in zip(got, seen)) / len(seen)


@pytest.mark.parametrize("objective", ["transfer", "staged"])
def test_transfer_recipe_brings_each_attention_layer_back_to_the_original(objective, sharp_model, tmp_path) -> None:
    text = tmp_path / "short.txt"
    text.write_text(python_docs_text()[: WINDOW * N_WINDOWS + 2 * BLOCK + 8])
    out = tmp_path / "out"
    steps = 16
    staged = {"transfer_steps": steps - 2, "transfer_learning_rate": 3e-3, "learning_rate": 1e-3}
    settings = {**OBJECTIVES[objective], **(staged if objective == "staged" else {"learning_rate": 3e-3})}
    values = overrides(
        {"model": sharp_model, "text": text},
        out,
        max_steps=steps,
        lr_scheduler_type="constant",
        lora_r=8,
        lora_alpha=16,
        save_steps=steps,
        **settings,
    )
    recipe = LoRARecipe.from_config(None, values)
    summary = recipe.run()
    blocks = recipe.split.train_blocks
    original = AutoModelForCausalLM.from_pretrained(sharp_model)
    before = hf_prope.patch_model(AutoModelForCausalLM.from_pretrained(sharp_model), "p-rope", p=0.25)
    after = hf_prope.from_pretrained(out / "adapter")
    error_before, error_after = _attention_error(before, original, blocks), _attention_error(after, original, blocks)
    assert error_before > 1e-3 and error_after < 0.5 * error_before, (error_before, error_after)
    ids = stream({"text": text}, sharp_model)
    assert at(summary)["patched_after_training"] == pytest.approx(loss_perplexity(after, ids), rel=1e-5)
    assert not (out / "control").exists() and summary["transfer"]["query_stride"] == 4
    logged = [e for e in json.loads((out / "patched" / "stage.json").read_text())["log_history"] if "loss" in e]
    if objective == "transfer":
        assert summary["transfer"]["steps"] is None
        assert all(e["transfer_loss"] == pytest.approx(e["loss"], rel=1e-4) for e in logged)
        assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]
    else:
        assert [("transfer_loss" in e, "distill_kl" in e) for e in logged] == [(True, False)] * 14 + [(False, True)] * 2
        assert summary["transfer"]["steps"] == 14 and summary["distillation"]["distill_weight"] == 1.0
        assert [e["learning_rate"] for e in logged] == pytest.approx([3e-3] * 14 + [1e-3] * 2)


def test_mix_objective_logs_both_parts(source, tmp_path) -> None:
    out = tmp_path / "mix"
    summary = LoRARecipe.from_config(
        None, overrides(source, out, objective="mix", distill_weight=0.3, max_steps=2, control=False)
    ).run()
    history = json.loads((out / "patched" / "stage.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    assert logged and all("distill_kl" in e and "lm_loss" in e for e in logged)
    # loss = 0.3 x KL + 0.7 x LM, as logged (each a mean over the logging interval of one step here)
    for e in logged:
        assert e["loss"] == pytest.approx(0.3 * e["distill_kl"] + 0.7 * e["lm_loss"], rel=1e-3)
    assert summary["distillation"]["distill_weight"] == 0.3


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"objective": "distil"}, "Did you mean 'distill'"),
        ({"objective": "distill", "distill_temperature": 0}, "distill_temperature must be positive"),
        ({"objective": "mix", "distill_weight": 1.5}, r"distill_weight must be in \[0, 1\]"),
        ({"eval_contexts": [32, 256]}, r"eval_contexts \[256\] are longer than the held-out tokens"),
        ({"objective": "transfer", "transfer_steps": 2}, "transfer_steps is for a staged run"),
        ({"transfer_learning_rate": 1e-3}, "no step is layer-wise"),
        ({"objective": "distill", "transfer_steps": 6}, "transfer_steps=6 leaves no step of objective=distill"),
        ({"objective": "transfer", "transfer_query_stride": 0}, "transfer_query_stride must be at least 1"),
    ],
)
def test_bad_distillation_settings_fail_before_anything(extra, message, source, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        LoRARecipe.from_config(None, overrides(source, out, **extra)).setup()
    assert not out.exists()


def test_distill_with_a_patch_that_changes_nothing_fails_in_setup(source, tmp_path, forward_passes=None) -> None:
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(None, overrides(source, out, objective="distill", patch="rope", p=None))
    with pytest.raises(ValueError, match="a patch that changes nothing"):
        recipe.setup()
    assert not out.exists()
    assert hf_prope.get_patch(recipe.model) is None  # the probe patch was taken off again


def test_heldout_long_documents_in_the_recipe(source, tmp_path) -> None:
    """heldout_documents=long: the held-out tokens are the starts of the last documents long enough, none trained on."""
    from transformers import AutoTokenizer

    docs = tmp_path / "docs"
    docs.mkdir()
    text = python_docs_text()
    # Sorted file order is the data order: short and long documents interleaved.
    sizes = [3000, 20, 90, 15, 3000, 70, 40]
    start = 0
    for i, size in enumerate(sizes):
        (docs / f"{i:02d}.txt").write_text(text[start : start + size])
        start += size
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(
        None,
        overrides(
            source,
            out,
            dataset=str(docs),
            heldout_documents="long",
            eval_contexts=[16, WINDOW],
            control=False,
            max_steps=1,
        ),
    )
    summary = recipe.run()
    tokenizer = AutoTokenizer.from_pretrained(source["model"])
    ids = [
        torch.tensor(tokenizer((docs / f"{i:02d}.txt").read_text(), add_special_tokens=False)["input_ids"])
        for i in range(len(sizes))
    ]
    # From the end: doc 6 (40 tokens: 1 window of 32), doc 5 (70: 2 windows), doc 4 (3000: the last window) = 128.
    want = torch.cat([ids[4][:32], ids[5][:64], ids[6][:32]])
    assert torch.equal(recipe.split.heldout, want)
    assert recipe.split.heldout_documents == 3 and summary["heldout"]["long_documents"] == 3
    eos = tokenizer.eos_token_id
    joined = torch.cat([torch.cat([d, torch.tensor([eos])]) for i, d in enumerate(ids) if i not in (4, 5, 6)])
    # Trained on the other documents only: their stream, joined by EOS, in order.
    assert recipe.split.train_blocks.flatten().tolist() == joined[: recipe.split.train_blocks.numel()].tolist()
    adapter = hf_prope.from_pretrained(out / "adapter")
    for context in (16, WINDOW):
        assert at(summary, context)["patched_after_training"] == pytest.approx(
            loss_perplexity(adapter, want, context, 128 // context), rel=1e-5
        )
    with pytest.raises(ValueError, match="must be a multiple of it"):
        LoRARecipe.from_config(None, overrides(source, tmp_path / "bad", heldout_documents="long", eval_contexts=[48]))
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Sharding settings: what TrainingArguments accepts, and FSDP refused where accelerate cannot shard


def test_fsdp_and_dict_settings_parse_as_training_arguments_take_them(source, tmp_path) -> None:
    layer = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    recipe = LoRARecipe.from_config(None, overrides(source, tmp_path / "a", fsdp="true", fsdp_config=layer))
    assert recipe.training_args.fsdp and recipe.training_args.fsdp_config["transformer_layer_cls_to_wrap"] == [
        "LlamaDecoderLayer"
    ]
    cli = LoRARecipe.from_config(
        None,
        [
            f"output_dir={tmp_path / 'b'}",
            "max_steps=2",
            "fsdp=true",
            'fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}',
            'liger_kernel_config={"rope": true, "rms_norm": false}',
        ],
    )
    assert cli.training_args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert cli.training_args.liger_kernel_config == {"rope": True, "rms_norm": False}


@pytest.mark.parametrize("how", ["fsdp_config", "accelerate"])
def test_fsdp_version_1_is_refused_before_any_work(how, source, tmp_path, monkeypatch) -> None:
    extra: dict = {}
    if how == "fsdp_config":
        extra = {"fsdp": "true", "fsdp_config": '{"version": 1}'}
    else:  # what accelerate launch --use_fsdp sets without --fsdp_version 2
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", "1")
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(None, overrides(source, out, **extra))
    with pytest.raises(ValueError, match="FSDP version 1.*FSDP2 only.*version 2"):
        recipe.setup()
    assert not out.exists() and not hasattr(recipe, "model")


@pytest.mark.parametrize("how", ["fsdp=true", "fsdp=full_shard auto_wrap", "accelerate --use_fsdp"])
def test_fsdp_on_a_cpu_only_machine_is_refused_before_any_work(how, source, tmp_path, monkeypatch) -> None:
    from hf_prope.recipes.training import has_accelerator

    if has_accelerator():
        pytest.skip("a GPU is here: FSDP can shard")
    extra = {}
    if how.startswith("fsdp="):
        extra["fsdp"] = how.split("=", 1)[1]
    else:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp --fsdp_version 2 sets
        monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(None, overrides(source, out, **extra))
    with pytest.raises(ValueError, match="FSDP was asked for.*no GPU.*DeepSpeed"):
        recipe.setup()
    assert not out.exists()
    assert not hasattr(recipe, "model")  # refused before the model was loaded


# 2-norm itself: test_head_mask.py; max_wavelength=100: the tiny model's pairs 0..2 (wavelengths 6, 20, 63) alone
@pytest.mark.parametrize(
    ("select", "max_wavelength"), [("2-norm-drift", None), ("2-norm-shared", None), ("2-norm-drift", 100.0)]
)
def test_lora_recipe_chooses_a_head_mask_on_training_text_only(select, max_wavelength, source, tmp_path) -> None:
    from hf_prope import analysis

    model_dir = save_tiny(tmp_path / "qwen3", "qwen3")
    out = tmp_path / "out"
    summary = LoRARecipe.from_config(
        None,
        overrides(
            source,
            out,
            model=str(model_dir),
            control=False,
            max_steps=3,
            objective="transfer",
            patch="head-mask",
            select=select,
            **({} if max_wavelength is None else {"max_wavelength": max_wavelength}),
        ),
    ).run()
    spec = hf_prope.PatchSpec.from_dict(summary["patch"])
    # The oracle: the rule run by hand on the tokens before the held-out tail (whole blocks), never on the tail.
    ids = stream(source, model_dir)
    heldout = WINDOW * N_WINDOWS
    train = ids[: (len(ids) - heldout) // BLOCK * BLOCK]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = char_tokenizer()
    on_train, with_tail = analysis.frequency_usage(base, tok, train), analysis.frequency_usage(base, tok, ids)
    assert not torch.equal(on_train.query, with_tail.query)  # the held-out tail would give other statistics
    assert spec == analysis.head_mask(
        on_train, p=0.25, select=select, context_length=BLOCK, max_wavelength=max_wavelength
    )
    if max_wavelength is not None:
        assert max(i for heads in spec.head_keep for k in heads for i in k) <= 2
    if select != "2-norm-shared":
        assert spec.name == "head-mask" and {len(k) for heads in spec.head_keep for k in heads} == {2}
    else:
        assert spec.name == "freq-mask" and sum(spec.mask) == 2
    reloaded = hf_prope.from_pretrained(out / "adapter")
    assert hf_prope.get_patch(reloaded) == spec
    assert at(summary)["patched_after_training"] == pytest.approx(loss_perplexity(reloaded, ids), rel=1e-5)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"max_wavelength": 100.0}, "limits the pairs select=2-norm"),  # no select: nothing to limit
        ({"max_wavelength": -1.0, "select": "2-norm"}, "positive number of tokens"),
        ({"max_wavelength": 1.0, "select": "2-norm"}, "leaves 0 pairs to choose from in layer 0"),
    ],
)
def test_head_mask_wavelength_limit_is_refused_before_any_measuring(extra, match, source, tmp_path) -> None:
    model_dir = save_tiny(tmp_path / "qwen3", "qwen3")
    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(
        None, overrides(source, out, model=str(model_dir), control=False, max_steps=1, patch="head-mask", **extra)
    )
    with pytest.raises(ValueError, match=match):
        recipe.run()
    assert not out.exists()
