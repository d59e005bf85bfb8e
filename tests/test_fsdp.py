"""FSDP2 (torch's ``fully_shard``) on two real CPU processes over gloo, against one unsharded process.

accelerate applies FSDP only on GPU-like devices (the recipes refuse FSDP on a CPU-only machine,
tested in test_recipes.py), so the recipe's FSDP run is in the GPU check (.ci/gpu). What
accelerate does to the model is torch's: each decoder layer and then the root wrapped with
``fully_shard``. That runs on CPU processes, so here the parts of hf-prope that call into a
wrapped model past its forward — the distillation teacher (the decoder with the patch suspended
and the adapter off), the layer-wise transfer student (one attention module at a time), the
evaluations and the adapter save — run under real FSDP2 sharding.

Oracles: the same steps in one process without FSDP on the whole batch (each process of the
sharded run takes half of it, as a data-parallel run does); the teacher against an unpatched
copy of the model; the saved adapter reloaded by PEFT's own ``PeftModel.from_pretrained`` and by
``hf_prope.from_pretrained``, scored with transformers' own loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model, tokens

import hf_prope
from hf_prope.hub import PATCH_FILE

pytest.importorskip("torch.distributed.fsdp")
if not hasattr(__import__("torch.distributed.fsdp", fromlist=["fully_shard"]), "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

TESTS = Path(__file__).resolve().parent
P = 0.25  # 2 of 8 pairs rotate: the tiny model's outputs change visibly (p=0.75 stops only near-still pairs)
# Larger random weights: sharper attention, so positions (and the patch) matter (KL 0.49, not 6e-8).
CONFIG = {"initializer_range": 0.2}

_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from tiny import tiny_model, tokens
from peft import LoraConfig, get_peft_model
import hf_prope
from hf_prope.distillation import distillation_loss, output_layer, teacher_hidden_states
from hf_prope.distributed import fsdp_modules, gathered, gathered_on_main, parameter_share
from hf_prope.evaluation import perplexity
from hf_prope.transfer import attention_transfer_loss, student_attention, teacher_attention
from safetensors.torch import save_file

args = json.loads(sys.argv[1])
out = args["out"]
sharded = "RANK" in os.environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)

model = tiny_model(args["arch"], **args["config"])
hf_prope.patch_model(model, "p-rope", p=args["p"])
peft_model = get_peft_model(
    model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
)
if sharded:  # what accelerate's FSDP2 does with transformer_layer_cls_to_wrap: each layer, then the root
    from torch.distributed.fsdp import fully_shard

    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
batch = tokens(4, 24, seed=5)
mine = batch[rank::world]  # this process's half, as a data-parallel sampler gives it
trainable = [p for p in peft_model.parameters() if p.requires_grad]
optimizer = torch.optim.SGD(trainable, lr=float(args["lr"]))


def mean_over_processes(value):
    value = value.detach().clone()
    if sharded:
        dist.all_reduce(value)
        value /= world
    return float(value)


def with_forward(fn):
    # The recipe's transfer stage runs the student through the wrapped model's own call (the root's hooks).
    peft_model.forward = fn
    try:
        return peft_model(input_ids=mine)
    finally:
        del peft_model.forward


log = {"losses": []}
for step, stage in enumerate(args["stages"]):
    if stage == "transfer":
        targets = teacher_attention(peft_model, mine)
        loss, _ = attention_transfer_loss(with_forward(lambda *a, **k: student_attention(peft_model, targets)), targets)
    elif stage == "distill":
        hidden = teacher_hidden_states(peft_model, mine)
        if not os.path.exists(f"{out}/teacher{rank}.safetensors"):  # after training: the adapter is switched off
            save_file({"hidden": hidden.contiguous()}, f"{out}/teacher{rank}.safetensors")
        logits = peft_model(input_ids=mine, use_cache=False).logits
        loss, _ = distillation_loss(logits, hidden, output_layer(peft_model))
    else:
        loss = peft_model(input_ids=mine, labels=mine).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    log["losses"].append(mean_over_processes(loss))

held_out = tokens(1, 24 * 6, seed=3).flatten()
log["perplexity"] = perplexity(peft_model, held_out, window=24, n_windows=6)
log["wrapped"] = len(fsdp_modules(peft_model))
log["share"] = parameter_share(peft_model)
lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
with gathered(lora, model=peft_model):
    if rank == 0:
        hf_prope.save_pretrained(peft_model, f"{out}/adapter", save_method="adapter", tokenizer=None)
with gathered_on_main(list(peft_model.parameters()), model=peft_model):
    if rank == 0:
        try:
            hf_prope.save_pretrained(peft_model, f"{out}/merged", save_method="merged", tokenizer=None)
            log["merged"] = "saved"
        except ValueError as error:
            log["merged"] = str(error)
log["perplexity_after_saves"] = perplexity(peft_model, held_out, window=24, n_windows=6)
if rank == 0:
    with open(f"{out}/log.json", "w") as f:
        json.dump(log, f)
if sharded:
    dist.barrier()  # both processes done with every collective (without, gloo aborted at exit about 1 run in 5)
    dist.destroy_process_group()
"""


def run(tmp: Path, arch: str, stages: list[str], *, processes: int) -> dict:
    out = tmp / f"{arch}-{processes}"
    out.mkdir(parents=True)
    script = tmp / "fsdp_run.py"
    script.write_text(_SCRIPT)
    values = json.dumps({"out": str(out), "arch": arch, "p": P, "stages": stages, "lr": 0.05, "config": CONFIG})
    launch(script, [values, str(TESTS)], processes=processes)
    return {"out": out, **json.loads((out / "log.json").read_text())}


def launch(script: Path, args: list[str], *, processes: int) -> str:
    """``script ARGS`` in ``processes`` CPU processes (torchrun over gloo), or in this one's Python; its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    result = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def reference_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids.view(6, 24), labels=ids.view(6, 24)).loss))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norms and sliding-window layers in the student
def test_fsdp2_sharded_steps_equal_one_process_and_the_adapter_carries_the_patch(arch, tmp_path) -> None:
    from peft import PeftModel

    stages = ["transfer", "transfer", "distill", "distill", "lm"]
    sharded = run(tmp_path, arch, stages, processes=2)
    single = run(tmp_path, arch, stages, processes=1)

    # Really sharded: every layer and the root wrapped, each process holding half of the values.
    assert sharded["wrapped"] == 7 and single["wrapped"] == 0
    assert 0.45 <= sharded["share"]["share"] <= 0.55 and single["share"]["share"] == 1.0
    assert sharded["share"]["total"] == single["share"]["total"]

    # Every step of each objective, and the evaluation, as in one unsharded process (the losses move:
    # the LoRA weights were trained, so the sharded gradients were reduced and applied).
    assert sharded["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert len(set(single["losses"][:2])) == 2 and single["losses"][2] != single["losses"][3]
    assert sharded["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)  # observed: 5.5e-7 (llama)
    assert sharded["perplexity_after_saves"] == pytest.approx(sharded["perplexity"], rel=1e-9)  # shards put back

    # The teacher under sharding is the original model: an unpatched copy's final hidden states.
    original = tiny_model(arch, **CONFIG)
    with torch.no_grad():
        expected = original.model(input_ids=tokens(4, 24, seed=5), use_cache=False).last_hidden_state
    got = torch.cat([load_file(sharded["out"] / f"teacher{r}.safetensors")["hidden"] for r in (0, 1)])
    assert torch.allclose(got, expected[[0, 2, 1, 3]], atol=1e-5)

    # The adapter written from the gathered shards: the one-process adapter, with the patch record.
    a = load_file(sharded["out"] / "adapter" / "adapter_model.safetensors")
    b = load_file(single["out"] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # trained, not the zero init
    assert (sharded["out"] / "adapter" / PATCH_FILE).is_file()

    # Reloaded by PEFT's own loader (hf_prope imported) and by hf_prope's: the patch is back, and
    # transformers' own loss gives the run's perplexity.
    held_out = tokens(1, 24 * 6, seed=3).flatten()
    by_peft = PeftModel.from_pretrained(tiny_model(arch, **CONFIG), sharded["out"] / "adapter")
    by_hf_prope = hf_prope.from_pretrained(sharded["out"] / "adapter", base_model=tiny_model(arch, **CONFIG))
    for model in (by_peft, by_hf_prope):
        assert hf_prope.patch_state(model) is not None
        assert reference_loss(model, held_out) == pytest.approx(sharded["perplexity"], rel=1e-4)
    assert reference_loss(tiny_model(arch, **CONFIG), held_out) != pytest.approx(sharded["perplexity"], rel=1e-3)

    # A merged save of the wrapped model is refused with the way out; the one-process run saves it.
    assert "FSDP cannot copy it" in sharded["merged"] and "hf_prope.from_pretrained" in sharded["merged"]
    assert single["merged"] == "saved" and not (sharded["out"] / "merged").exists()


# The recipe after training, on a model FSDP2 wrapped: what accelerate leaves behind on a GPU (the
# wrapping itself is done here, since accelerate will not shard on CPU). Trained with DDP first, so
# both runs train identically and differ only in what follows: (c), the shares and the merged save.
_RECIPE_SCRIPT = """
import json, sys
from hf_prope.recipes import LoRARecipe

recipe = LoRARecipe.from_config(None, json.loads(sys.argv[1]))
recipe.setup()
recipe.train()
if sys.argv[2] == "shard":
    from torch.distributed.fsdp import fully_shard

    for layer in recipe.peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(recipe.peft_model)
recipe.report()
recipe.save()
from hf_prope.distributed import end_process_group

end_process_group()  # as `hf-prope run` does
"""


def test_the_recipe_after_training_under_fsdp2_reports_shards_and_merges_from_the_adapter(tmp_path) -> None:
    from test_recipes import overrides
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prope.data import python_docs_text

    text = tmp_path / "docs.txt"
    text.write_text(python_docs_text()[:30_000])
    source = {"model": save_tiny(tmp_path / "tiny-llama"), "text": text}
    script = tmp_path / "recipe_run.py"
    script.write_text(_RECIPE_SCRIPT)
    summaries = {}
    for how in ("shard", "ddp"):
        values = overrides(source, tmp_path / how, objective="distill", save_method="merged", max_steps=3)
        output = launch(script, [json.dumps(values), how], processes=2)
        summaries[how] = json.loads((tmp_path / how / "results.json").read_text())
        if how == "shard":
            assert "FSDP: merging from" in output

    sharded, ddp = summaries["shard"], summaries["ddp"]
    assert sharded["training"]["engine"] == "fsdp2" and ddp["training"]["engine"] == "ddp"
    assert all(0.45 <= s["share"] <= 0.55 for s in sharded["training"]["parameters_per_process"])
    window = str(sharded["heldout"]["window"])
    after = sharded["perplexity"][window]["patched_after_training"]
    assert after == pytest.approx(ddp["perplexity"][window]["patched_after_training"], rel=1e-5)

    # The merged save, made from the saved adapter on its base: plain transformers loads it as p-RoPE
    # ("proportional", transformers >= 5.5; before, hf_prope's loader) at (c)'s perplexity, as DDP's does.
    from hf_prope.rope_types import has_native_proportional

    ids = torch.tensor(AutoTokenizer.from_pretrained(source["model"])(text.read_text())["input_ids"])
    windows = ids[-sharded["heldout"]["n_windows"] * int(window) :].view(-1, int(window))
    for how in ("shard", "ddp"):
        if has_native_proportional():
            plain = AutoModelForCausalLM.from_pretrained(tmp_path / how / "merged")
            assert plain.config.rope_parameters["rope_type"] == "proportional"
        else:
            plain = hf_prope.from_pretrained(tmp_path / how / "merged")
        assert hf_prope.get_patch(hf_prope.from_pretrained(tmp_path / how / "merged")) == hf_prope.PatchSpec(
            "p-rope", p=0.25
        )
        with torch.no_grad():
            assert float(torch.exp(plain(input_ids=windows, labels=windows).loss)) == pytest.approx(after, rel=1e-4)
