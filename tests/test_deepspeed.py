"""DeepSpeed ZeRO-2/3 through the lora recipe, two real CPU processes (torchrun, gloo), against DDP.

Oracles: the same recipe, seed and data run with plain DDP (the engine already tested against
single-process runs in test_recipes.py); each rank's parameter slices as DeepSpeed itself holds
them; the saves reloaded here in one process, without DeepSpeed, and scored with transformers'
own loss; an uninterrupted run for kill-and-resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from test_recipes import overrides
from tiny import save_tiny

import hf_prope
from hf_prope.data import python_docs_text
from hf_prope.hub import PATCH_FILE

pytest.importorskip("deepspeed")

from hf_prope.recipes.config import DEEPSPEED_MIN_TRANSFORMERS  # noqa: E402

OLD_TRANSFORMERS = Version(transformers.__version__) < Version(DEEPSPEED_MIN_TRANSFORMERS)
needs_new_transformers = pytest.mark.skipif(
    OLD_TRANSFORMERS, reason=f"DeepSpeed runs need transformers >= {DEEPSPEED_MIN_TRANSFORMERS} (refused: tested below)"
)

WINDOW = 32

_SCRIPT = """
import json, os, signal, sys
from transformers import TrainerCallback
from hf_prope.recipes import LoRARecipe

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if kill_at and state.global_step == kill_at and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)  # a real crash: no cleanup

LoRARecipe.from_config(None, json.loads(sys.argv[1]), callbacks=[KillAfterSave()]).run()
from hf_prope.distributed import end_process_group

end_process_group()
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("source")
    text = root / "docs.txt"
    text.write_text(python_docs_text()[:30_000])
    script = root / "run.py"
    script.write_text(_SCRIPT)
    return {"model": save_tiny(root / "tiny-llama"), "text": text, "script": script}


def settings(source: dict[str, Path], out: Path, **extra) -> dict:
    """test_recipes.py's tiny-run settings, 3 steps by default."""
    return overrides(source, out, **{"max_steps": 3, "save_steps": 3, **extra})


def two_processes(source: dict[str, Path], values: dict, *, kill_at: int = 0) -> subprocess.CompletedProcess:
    import os

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "KILL_AT_STEP": str(kill_at),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(source["script"]), json.dumps(values)], capture_output=True, text=True, env=env, timeout=600
    )


def run_ok(source: dict[str, Path], values: dict) -> dict:
    result = two_processes(source, values)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((Path(values["output_dir"]) / "results.json").read_text())


def perplexity_of(model, source) -> float:
    """exp of transformers' own mean causal-LM loss over the held-out windows (the last 4 x 32 tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source["model"])
    ids = torch.tensor(tokenizer(source["text"].read_text(), add_special_tokens=False)["input_ids"])
    windows = ids[-4 * WINDOW :].view(4, WINDOW)
    with torch.no_grad():
        return float(torch.exp(model(input_ids=windows, labels=windows).loss))


def figures(summary: dict) -> dict[str, float]:
    return {k: v for k, v in summary["perplexity"][str(WINDOW)].items() if isinstance(v, float)}


# staged: layer-wise transfer steps (the student built from each layer's own, partitioned modules), then KL
STAGED = {"objective": "distill", "transfer_steps": 2, "transfer_blocks": 2, "max_steps": 4, "save_steps": 4}


@needs_new_transformers
@pytest.mark.parametrize(
    "zero,objective,save_method",
    [
        ("zero3", "lm", "adapter"),
        ("zero3", "distill", "merged"),
        ("zero3", "staged", "adapter"),
        ("zero2", "mix", "adapter"),
    ],
)
def test_zero_run_equals_ddp_and_its_save_carries_the_patch(zero, objective, save_method, source, tmp_path) -> None:
    common = {"save_method": save_method, **(STAGED if objective == "staged" else {"objective": objective})}
    sharded = run_ok(source, settings(source, tmp_path / zero, deepspeed=zero, **common))
    ddp = run_ok(source, settings(source, tmp_path / "ddp", **common))

    assert sharded["training"]["engine"] == f"deepspeed zero-{zero[-1]}" and ddp["training"]["engine"] == "ddp"
    shares = sharded["training"]["parameters_per_process"]
    total = shares[0]["total"]
    assert len(shares) == 2 and sum(s["held"] for s in shares) >= total
    if zero == "zero3":  # each process holds about half of every parameter
        assert all(0.45 < s["share"] < 0.55 for s in shares), shares
    else:  # ZeRO-2 partitions optimizer state and gradients, never the weights
        assert all(s["share"] == 1.0 for s in shares)
    assert all(s["share"] == 1.0 for s in ddp["training"]["parameters_per_process"])

    # Same seed, data and batches: the sharded run's figures are DDP's, to float32 reduction order.
    got, want = figures(sharded), figures(ddp)
    assert got.keys() == want.keys() and (objective != "lm" or "control_after_training" in got)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["patched_after_training"] != pytest.approx(got["patched_before_training"], rel=1e-4)  # it trained

    # The save, gathered from both processes, reloads in one process without DeepSpeed and with the patch.
    folder = tmp_path / zero / save_method
    if save_method == "adapter":
        assert (folder / PATCH_FILE).is_file()
        # PEFT's own loader, on the base as transformers loads it (hf_prope imported): the patch comes back.
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source["model"]), folder)
        assert hf_prope.get_patch(by_peft) == hf_prope.PatchSpec("p-rope", p=0.25)
        assert got["patched_after_training"] == pytest.approx(perplexity_of(by_peft, source), rel=1e-4)
    else:  # a merged p-RoPE save is transformers' own "proportional" rope type: plain transformers loads it
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert plain.config.rope_parameters["rope_type"] == "proportional"
        assert got["patched_after_training"] == pytest.approx(perplexity_of(plain, source), rel=1e-4)
    loaded = hf_prope.from_pretrained(folder)
    assert hf_prope.get_patch(loaded) == hf_prope.PatchSpec("p-rope", p=0.25)
    assert got["patched_after_training"] == pytest.approx(perplexity_of(loaded, source), rel=1e-4)
    # Every checkpoint records the patch too.
    checkpoint = tmp_path / zero / "patched" / f"checkpoint-{common.get('max_steps', 3)}"
    assert (checkpoint / PATCH_FILE).is_file()


@needs_new_transformers
def test_zero3_kill_and_resume_matches_uninterrupted_run(source, tmp_path) -> None:
    values = settings(source, tmp_path / "killed", deepspeed="zero3", objective="distill", max_steps=6, save_steps=2)
    killed = two_processes(source, values, kill_at=4)
    assert killed.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    out = tmp_path / "killed"
    assert (out / "patched" / "checkpoint-4").is_dir() and not (out / "results.json").exists()

    resumed = run_ok(source, {**values, "resume": True})
    reference = run_ok(source, {**values, "output_dir": str(tmp_path / "reference")})
    assert [s for s, _ in resumed["loss_curves"]["patched"]] == list(range(1, 7))
    losses = [v for _, v in resumed["loss_curves"]["patched"]]
    assert losses == pytest.approx([v for _, v in reference["loss_curves"]["patched"]], rel=1e-4)
    assert figures(resumed)["patched_after_training"] == pytest.approx(
        figures(reference)["patched_after_training"], rel=1e-5
    )


@pytest.mark.skipif(not OLD_TRANSFORMERS, reason="this transformers runs DeepSpeed")
def test_deepspeed_with_an_old_transformers_is_refused_before_any_work(source, tmp_path) -> None:
    from hf_prope.recipes import LoRARecipe

    out = tmp_path / "old"
    with pytest.raises(ValueError, match=f"transformers >= {DEEPSPEED_MIN_TRANSFORMERS}"):
        LoRARecipe.from_config(None, settings(source, out, deepspeed="zero3"))
    assert not out.exists()


@needs_new_transformers
def test_deepspeed_setting_takes_a_name_a_file_or_a_dict_and_refuses_others(source, tmp_path) -> None:
    from hf_prope.recipes import LoRARecipe
    from hf_prope.recipes.config import deepspeed_config

    for name, stage in (("zero2", 2), ("zero3", 3), ("zero3.json", 3)):
        path = Path(deepspeed_config(name))
        assert json.loads(path.read_text())["zero_optimization"]["stage"] == stage
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    assert deepspeed_config(str(own)) == str(own)
    assert deepspeed_config({"zero_optimization": {"stage": 3}}) == {"zero_optimization": {"stage": 3}}
    # The packaged configs leave batch and precision to Trainer ("auto"), which fills them.
    recipe = LoRARecipe.from_config(None, settings(source, tmp_path / "a", deepspeed="zero3"))
    assert recipe.training_args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == 2

    # One process without a launcher: DeepSpeed has no process group to join; said before any work.
    alone = tmp_path / "alone"
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        LoRARecipe.from_config(None, settings(source, alone, deepspeed="zero2")).run()
    assert not alone.exists()

    out = tmp_path / "refused"
    with pytest.raises(ValueError, match="zero3") as err:
        LoRARecipe.from_config(None, settings(source, out, deepspeed="zero4"))
    assert "no packaged DeepSpeed config" in str(err.value)
    assert not out.exists()
