"""LoRA-adapt a pretrained RoPE model to a patch (p-RoPE by default), with the evidence and a control.

A pretrained model loses some quality when its low frequencies stop rotating; a short LoRA
run wins most of it back. But LoRA on held-out text of a new domain also helps the
*unpatched* model, so the honest figure is the gap between the patched model after training
and the same LoRA budget spent on the unpatched model (the control)::

    (a) base (RoPE)        (b) patched, before training
    (c) patched + LoRA     (d) control: RoPE + the same LoRA        headline: gap = (c) / (d)

With ``objective=distill`` the LoRA instead learns to match the unpatched model itself
(:mod:`hf_prope.distillation`): no domain is learnt, the control would be (a), and the headline
is the cost (c) / (a). ``mix`` blends both losses. Every figure is given at each context of
``eval_contexts`` (the same held-out tokens cut into windows of each length).

The recipe trains with transformers' ``Trainer`` (so ``torchrun`` / ``accelerate launch``
give DDP, and checkpoints resume), writes ``results.json``, ``results.png`` and the adapter or
merged model with a model card, and pushes it to the Hub when ``hub_model_id`` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import TrainerCallback, TrainingArguments

from hf_prope.distributed import fsdp_modules, gathered, gathered_on_main, parameter_share, rank_and_world
from hf_prope.gguf import check_exportable, check_gguf_type, vocabulary_for

from .base import (
    RESULTS_FILE,
    DataArguments,
    ModelArguments,
    PatchArguments,
    barrier,
    check_writable,
    is_main_process,
    pyplot,
    save_figure,
    start_deepspeed_comm,
    write_json,
)
from .training import TrainingRecipe, loss_curve, quiet_library_warnings, staged_schedule_error

STAGES = ("control", "patched")  # the control trains first so the patched model is the one left to save
_OUTPUTS = (*STAGES, RESULTS_FILE)
PLOT_FILE = "results.png"
_MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraArguments:
    """The PEFT LoRA adapter."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Module names that get a LoRA (attention projections by default)."},
    )
    lora_mlp: bool = field(default=False, metadata={"help": "Also adapt the MLP (gate_proj, up_proj, down_proj)."})

    def target_modules(self) -> list[str]:
        return list(dict.fromkeys(self.lora_target_modules + (_MLP_MODULES if self.lora_mlp else [])))


OBJECTIVES = ("lm", "distill", "mix", "transfer")


@dataclass
class LoraRecipeArguments:
    """The training objective, blocks, the held-out split and its contexts, the control, how the result is saved."""

    objective: Literal["lm", "distill", "mix", "transfer"] = field(
        default="lm",
        metadata={
            "help": "lm: the language-model loss on the data; distill: match the unpatched model's predictions "
            "(self-distillation: KL over the full vocabulary); mix: distill_weight x distill + the rest x lm; "
            "transfer: every attention layer reproduces the unpatched layer's output (layer-wise). With "
            "transfer_steps, the first steps are transfer and the rest this objective."
        },
    )
    transfer_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps of layer-wise transfer before the objective's (0: none; < max_steps)."},
    )
    transfer_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the transfer steps (default: learning_rate)."}
    )
    transfer_query_stride: int = field(
        default=4,
        metadata={
            "help": "transfer: the student is computed at every n-th position (all keys; a random offset each "
            "step): n times less attention work per step."
        },
    )
    transfer_blocks: int = field(
        default=0,
        metadata={
            "help": "transfer: train on this many training blocks in turn, their teacher targets computed once and "
            "kept in memory (0: a teacher pass on every batch)."
        },
    )
    distill_weight: float = field(default=0.5, metadata={"help": "mix: weight of the distillation term, in [0, 1]."})
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "distill/mix: softmax temperature of teacher and student (the KL is scaled by T^2)."},
    )
    distill_chunk_tokens: int = field(
        default=1024, metadata={"help": "distill/mix: tokens per chunk of the vocabulary-wide KL (bounds its memory)."}
    )
    block_size: int = field(default=256, metadata={"help": "Tokens per training block."})
    eval_window: int = field(
        default=512, metadata={"help": "Held-out window size: the held-out split is eval_windows x eval_window tokens."}
    )
    eval_windows: int = field(default=16, metadata={"help": "Held-out windows, taken from the end of the data."})
    eval_contexts: list[int] | None = field(
        default=None,
        metadata={
            "help": "Context lengths to evaluate at: the held-out tokens cut into windows of each length, each "
            "from scratch (default: [eval_window]). Longer than the model's training length is allowed and "
            "marked as extrapolation."
        },
    )
    heldout_documents: Literal["tail", "long"] = field(
        default="tail",
        metadata={
            "help": "tail: the held-out split is the last tokens of the data (documents joined); long: whole "
            "documents at least as long as the longest eval context, from the end of the data, none trained on."
        },
    )
    eval_batch_size: int = field(default=1, metadata={"help": "Windows per evaluation forward pass."})
    eval_passkey_lengths: list[int] | None = field(
        default=None,
        metadata={
            "help": "After training, also score passkey retrieval of (a) and (c) at these prompt lengths (depths 0, "
            "0.25, 0.5, 0.75, 1; 2 keys each; seed 0; hf_prope.passkey)."
        },
    )
    eval_extensions: list[str] | None = field(
        default=None,
        metadata={
            "help": "After training, also evaluate (a) and (c) under these context extensions: yarn:S, dynamic:S, "
            "linear:S, temperature:S (hf_prope.context_extension); e.g. [yarn:2,temperature:2]."
        },
    )
    control: bool = field(
        default=True, metadata={"help": "Also train the same LoRA on the unpatched model (doubles training time)."}
    )
    save_method: Literal["adapter", "merged"] = field(
        default="adapter", metadata={"help": "Save the LoRA adapter (with the patch) or the merged model."}
    )
    gguf: str | None = field(
        default=None,
        metadata={
            "help": "Also write the trained model, LoRA merged, as a llama.cpp GGUF that carries the patch "
            "(model.gguf beside the saved model, and in the push): f16, bf16 or f32. Llama and Mistral with a "
            "patch on every layer; checked before training."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir after an interruption."})
    overwrite: bool = field(default=False, metadata={"help": "Discard a previous run in output_dir."})

    def __post_init__(self) -> None:
        for name in ("block_size", "eval_window"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 tokens, got {getattr(self, name)}.")
        for name in ("eval_windows", "eval_batch_size", "distill_chunk_tokens", "transfer_query_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("transfer_steps", "transfer_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.objective == "transfer" and self.transfer_steps:
            raise ValueError(
                "objective=transfer trains every step layer-wise; transfer_steps is for a staged run (e.g. "
                "objective=distill transfer_steps=48). Drop one of them."
            )
        if self.transfer_learning_rate is not None and not self.transfer_learning_rate > 0:
            raise ValueError(f"transfer_learning_rate must be positive, got {self.transfer_learning_rate}.")
        if self.transfer_learning_rate is not None and not self.uses_transfer:
            raise ValueError(
                "transfer_learning_rate is set but no step is layer-wise: set transfer_steps or objective=transfer, "
                "or unset it (transfer_learning_rate=null)."
            )
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other; choose one.")
        if self.gguf is not None:
            check_gguf_type(self.gguf, setting="gguf", unset=" (or unset)")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature}.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}.")
        from hf_prope.context_extension import ContextExtension

        self.extensions = [e for e in map(ContextExtension.parse, self.eval_extensions or []) if e is not None]
        if len({e.label for e in self.extensions}) != len(self.extensions):
            raise ValueError(f"eval_extensions lists the same extension twice: {self.eval_extensions}.")
        contexts = self.contexts
        if len(set(contexts)) != len(contexts) or min(contexts) < 2:
            raise ValueError(f"eval_contexts must be distinct lengths of at least 2 tokens, got {contexts}.")
        if self.heldout_documents == "long" and self.heldout_tokens % max(contexts):
            raise ValueError(
                f"heldout_documents=long cuts the held-out documents into windows of the longest context "
                f"({max(contexts)}): eval_windows x eval_window ({self.heldout_tokens}) must be a multiple of it."
            )
        too_long = [c for c in contexts if c > self.heldout_tokens]
        if too_long:
            raise ValueError(
                f"eval_contexts {too_long} are longer than the held-out tokens (eval_windows x eval_window = "
                f"{self.heldout_tokens}); raise eval_windows or eval_window, or drop those contexts."
            )

    @property
    def heldout_tokens(self) -> int:
        return self.eval_window * self.eval_windows

    @property
    def contexts(self) -> list[int]:
        """The evaluation contexts, shortest first."""
        return sorted(self.eval_contexts) if self.eval_contexts else [self.eval_window]

    @property
    def uses_transfer(self) -> bool:
        """Whether any step is layer-wise transfer."""
        return self.objective == "transfer" or self.transfer_steps > 0

    @property
    def distillation(self) -> dict[str, Any] | None:
        """The distillation settings of the objective (``None`` where no step distils)."""
        if self.objective in ("lm", "transfer"):
            return None
        weight = 1.0 if self.objective == "distill" else self.distill_weight
        return {
            "distill_weight": weight,
            "temperature": self.distill_temperature,
            "chunk_tokens": self.distill_chunk_tokens,
        }

    @property
    def transfer(self) -> dict[str, Any] | None:
        """The transfer settings (``None`` where no step is layer-wise)."""
        if not self.uses_transfer:
            return None
        return {
            "steps": self.transfer_steps if self.objective != "transfer" else None,
            "learning_rate": self.transfer_learning_rate,
            "query_stride": self.transfer_query_stride,
            "blocks": self.transfer_blocks,
        }

    def trainer_objective(self, train_blocks: torch.Tensor) -> dict[str, Any] | None:
        """The keyword arguments of :class:`~hf_prope.recipes.training.RetrofitTrainer` (``None``: plain ``Trainer``)."""
        if self.objective == "lm" and not self.uses_transfer:
            return None
        settings: dict[str, Any] = {"objective": self.objective, **(self.distillation or {})}
        if self.uses_transfer:
            settings.update(
                transfer_steps=self.transfer_steps,
                transfer_learning_rate=self.transfer_learning_rate,
                transfer_query_stride=self.transfer_query_stride,
                transfer_blocks=train_blocks[: self.transfer_blocks] if self.transfer_blocks else None,
            )
        return settings


class LoRARecipe(TrainingRecipe):
    """``hf-prope run lora``: patch a pretrained model, LoRA-train it back, and measure against a control.

    ``run()`` = ``setup()``, ``train()`` (control, then the patched model), ``evaluate()``,
    ``save()``, ``push()``. Extra ``transformers.TrainerCallback`` objects may be passed as
    ``callbacks=`` (to the constructor or to ``from_config``). :meth:`train_stage` trains one
    LoRA stage on its own (the benchmark times it).
    """

    name = "lora"
    description = "LoRA-adapt a patched model, evaluate it against an unpatched control, save and push it"
    default_config = "smollm2_135m_p_rope_lora"
    arguments = {
        "model_args": ModelArguments,
        "data_args": DataArguments,
        "patch_args": PatchArguments,
        "lora_args": LoraArguments,
        "recipe_args": LoraRecipeArguments,
        "training_args": TrainingArguments,
    }
    outputs = _OUTPUTS
    run_settings = "recipe_args"

    model_args: ModelArguments
    data_args: DataArguments
    patch_args: PatchArguments
    lora_args: LoraArguments
    recipe_args: LoraRecipeArguments
    training_args: TrainingArguments

    def __init__(self, *positional: Any, callbacks: Sequence[TrainerCallback] = (), **settings: Any) -> None:
        super().__init__(*positional, **settings)
        self.callbacks = list(callbacks)
        self.results: dict[str, Any] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}

    # -----------------------------------------------------------------------------------------
    # setup: every check before any training

    def setup(self) -> None:
        """Every check, in order of cost, before anything is written or trained."""
        from hf_prope.data import join_documents, split_long_documents, split_tail, tokenize_documents
        from hf_prope.patching import check_patch

        self.started = time.perf_counter()
        ta, ra = self.training_args, self.recipe_args
        _ = ta.device  # initialises the process group under torchrun / accelerate launch
        if ta.deepspeed:
            start_deepspeed_comm()  # before the model loads: ZeRO-3 partitions it as it loads
        self.spec = self.patch_args.spec()
        if ta.push_to_hub and not ta.hub_model_id:
            raise ValueError("push_to_hub=true needs hub_model_id (e.g. hub_model_id=me/smollm2-p-rope).")
        if ta.max_steps is None or ta.max_steps <= 0:
            raise ValueError("Set max_steps (a positive number of optimizer steps): the control needs the same budget.")
        self.out = Path(ta.output_dir).expanduser().resolve()
        if is_main_process():
            check_writable(self.out)
            self.check_previous_run()
        self.check_sharding()
        dataset = self.data_args.load()
        if ta.hub_model_id:
            self._check_hub()
        self.say(f"Loading {self.model_args.model} ...")
        self.model, self.tokenizer = self.model_args.load()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ra.block_size > limit:
            raise ValueError(
                f"block_size={ra.block_size} is longer than {self.model_args.model} allows "
                f"(max_position_embeddings={limit}); use block_size <= {limit}."
            )
        self._check_targets()
        check_patch(self.model, self.spec)
        for length in self.recipe_args.eval_passkey_lengths or []:  # too short a prompt fails before training
            from hf_prope.passkey import passkey_prompt

            passkey_prompt(self.tokenizer, length, 0.5)
        for ext in self.recipe_args.extensions:  # an extension the model cannot take fails before training
            from hf_prope.context_extension import extended_rope_parameters
            from hf_prope.state import original_rope_parameters

            extended_rope_parameters(self.model.config, ext, original_rope_parameters(self.model.config))
        if ra.gguf is not None:
            check_exportable(self.model, self.spec, tokenizer=vocabulary_for(self.model, self.tokenizer))
        if ra.transfer_steps and ra.transfer_steps >= ta.max_steps:
            raise ValueError(
                f"transfer_steps={ra.transfer_steps} leaves no step of objective={ra.objective} in max_steps="
                f"{ta.max_steps}; use objective=transfer for a transfer-only run, or raise max_steps."
            )
        if ra.transfer_learning_rate is not None and str(ta.lr_scheduler_type).endswith("reduce_lr_on_plateau"):
            raise staged_schedule_error(ta.lr_scheduler_type)
        if ra.objective != "lm" or ra.uses_transfer:
            self._check_patch_changes_something()
        self.training_length = limit
        docs = tokenize_documents(dataset, self.tokenizer, text_column=self.data_args.text_column)
        min_blocks = ta.per_device_train_batch_size * max(1, ta.world_size)
        if ra.heldout_documents == "long":
            self.split = split_long_documents(
                docs,
                self.tokenizer.eos_token_id,
                block_size=ra.block_size,
                heldout_tokens=ra.heldout_tokens,
                window=max(ra.contexts),
                min_blocks=min_blocks,
            )
        else:
            self.split = split_tail(
                join_documents(docs, self.tokenizer.eos_token_id),
                block_size=ra.block_size,
                heldout_tokens=ra.heldout_tokens,
                min_blocks=min_blocks,
            )
        if self.patch_args.calibrates:
            # Chosen on training tokens only, before any training: the held-out split never decides the mask.
            self.say(f"Choosing each head's pairs ({self.patch_args.select}) on the training text ...")
            self.spec = self.patch_args.calibrate(
                self.model, self.tokenizer, self.split.train_blocks.flatten(), context_length=ra.block_size
            )
            check_patch(self.model, self.spec)
            if ra.objective != "lm" or ra.uses_transfer:
                self._check_patch_changes_something()
            self.say(f"Patch: {self.spec.describe()}")
        where = (
            f"from {self.split.heldout_documents} documents of at least {max(ra.contexts):,} tokens"
            if self.split.heldout_documents
            else "at the end of the data"
        )
        self.say(
            f"Data: {self.split.total_tokens:,} tokens; training on {self.split.train_blocks.shape[0]:,} blocks of "
            f"{ra.block_size}, held out {self.split.heldout.numel():,} {where}; evaluated at "
            f"{', '.join(str(c) for c in ra.contexts)} tokens."
        )
        # Every evaluation runs where training runs: the model moves once, before (a).
        self.model.to(ta.device)
        self.clear_previous_run()  # only now: a failed setup leaves an earlier run alone
        if ta.hub_model_id and is_main_process():
            # Last of the checks, and the first thing created: the token may write to this repo.
            from huggingface_hub import HfApi

            HfApi(token=ta.hub_token).create_repo(ta.hub_model_id, private=ta.hub_private_repo, exist_ok=True)
        barrier()  # no process starts training before rank 0 has cleared a previous run

    def _load_base(self, device: Any = None) -> Any:
        """The model again as setup loaded it, on ``device`` (default: the training device), unpatched."""
        model, _ = self.model_args.load()
        return model.to(device if device is not None else self.training_args.device)

    def _check_patch_changes_something(self) -> None:
        from hf_prope.patching import head_frequencies, patch_model, unpatch_model

        before = head_frequencies(self.model)
        patch_model(self.model, self.spec)
        try:
            same = bool(torch.equal(head_frequencies(self.model), before))
        finally:
            unpatch_model(self.model)
        if same:
            raise ValueError(
                f"objective={self.recipe_args.objective} with a patch that changes nothing ({self.spec.describe()}): the "
                "student would already equal its teacher. Choose a patch that stops some frequencies (e.g. p=0.75)."
            )

    def _check_hub(self) -> None:
        """The Hub token is accepted (the repo is created at the end of setup, once every check has passed)."""
        from huggingface_hub import HfApi

        from hf_prope.hub import check_token

        check_token(HfApi(token=self.training_args.hub_token))

    def _check_targets(self) -> None:
        from hf_prope.suggestions import closest

        leaves = {name.rsplit(".", 1)[-1] for name, _ in self.model.named_modules()}
        for target in self.lora_args.target_modules():
            if target not in leaves:
                raise ValueError(
                    f"lora_target_modules: the model has no module named {target!r}." + closest(target, sorted(leaves))
                )

    # -----------------------------------------------------------------------------------------
    # train: the control (RoPE + LoRA) and the patched model (patch + LoRA), same budget and seed

    def train(self) -> None:
        from hf_prope.patching import patch_model, unpatch_model

        self.results["base"] = self.evaluate("(a) base")
        patch_model(self.model, self.spec)
        self.results["patched_before"] = self.evaluate("(b) patched, before training")
        objective = self.recipe_args.objective
        if self.recipe_args.control and objective in ("distill", "transfer"):
            # The original model is a distillation's control: (a). An unpatched student would copy itself.
            self.say(f"[control] skipped: with objective={objective} the control is the original model, (a)")
        elif self.recipe_args.control:
            unpatch_model(self.model)
            control = self.train_stage("control", self.model)
            self.results["control"] = self.evaluate("(d) control after training", control)
            if fsdp_modules(control):
                # FSDP2 wrapped the control in place and cannot wrap it again: the patched stage starts
                # from the base as loaded (LoRA leaves the base's weights as they were).
                del control
                self.model = self._load_base()
            else:
                self.model = control.unload()  # the base again, without LoRA layers
            patch_model(self.model, self.spec)
        self.peft_model = self.train_stage("patched", self.model)

    def _lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        la = self.lora_args
        set_seed(self.training_args.seed)  # same LoRA initialisation for both stages
        config = LoraConfig(
            r=la.lora_r,
            lora_alpha=la.lora_alpha,
            lora_dropout=la.lora_dropout,
            target_modules=la.target_modules(),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def _record_base(self, peft_model: Any) -> None:
        """Name the base in the adapter's config so that ``hf_prope.from_pretrained`` can rebuild it.

        For an embedded or GGUF model PEFT records the folder the GGUF file sits in, which no
        loader can rebuild the base from. Set after training: checkpoints keep the folder, so
        PEFT's save-time vocabulary check stays local instead of asking the Hub for that name.
        """
        from hf_prope.models import is_embedded_source

        if is_embedded_source(self.model_args.model):
            peft_model.peft_config["default"].base_model_name_or_path = self.model_args.model

    def train_stage(self, stage: str, model: Any) -> Any:
        """Put this recipe's LoRA on ``model`` and train it as ``stage`` (``control`` or ``patched``) in ``out/stage``.

        Returns the PEFT model. With ``resume=true`` a finished stage is loaded, an unfinished one
        resumes from its last checkpoint.
        """
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers.trainer_utils import get_last_checkpoint

        import hf_prope

        peft_model = self._lora(model)
        stage_dir = self.out / stage
        final = stage_dir / "final"
        record = stage_dir / "stage.json"
        if self.recipe_args.resume and record.is_file() and (final / "adapter_model.safetensors").is_file():
            self.say(f"[{stage}] already trained: loading {final}")
            set_peft_model_state_dict(peft_model, load_file(final / "adapter_model.safetensors"))
            self._record_base(peft_model)
            self.histories[stage] = json.loads(record.read_text())["log_history"]
            return peft_model
        args = dataclasses.replace(self.training_args, output_dir=str(stage_dir), push_to_hub=False)
        trainer = self.make_trainer(
            peft_model,
            args,
            self.split.train_blocks,
            callbacks=self.callbacks,
            objective=self.recipe_args.trainer_objective(self.split.train_blocks),
        )
        last = get_last_checkpoint(str(stage_dir)) if self.recipe_args.resume and stage_dir.is_dir() else None
        what = "control: unpatched model + LoRA" if stage == "control" else f"patched: {self.spec.describe()} + LoRA"
        ra = self.recipe_args
        what += f", objective {ra.objective}"
        if ra.transfer_steps:
            what += f" after {ra.transfer_steps} layer-wise transfer steps"
        self.say(f"[{stage}] {what}, {args.max_steps} steps" + (f", resuming from {last}" if last else ""))
        trainer.train(resume_from_checkpoint=last)
        engine = getattr(trainer, "deepspeed", None)
        if engine is not None:
            # Its ZeRO-3 hooks would fight the evaluations' gathering; the weights stay as trained (partitioned).
            engine.destroy()
        self._record_base(peft_model)
        self.histories[stage] = trainer.state.log_history
        with gathered(_adapter_parameters(peft_model), model=peft_model):
            if is_main_process():
                hf_prope.save_pretrained(peft_model, final, save_method="adapter", tokenizer=None)
                write_json(record, {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history})
        barrier()
        return peft_model

    # -----------------------------------------------------------------------------------------
    # evaluate, report, save, push

    def evaluate(self, label: str = "perplexity", model: Any = None) -> dict[int, float]:
        """Perplexity of ``model`` (default: the current one) on the held-out split, at each evaluation context.

        The same held-out tokens are cut into windows of each length (each window from scratch).
        """
        from hf_prope.evaluation import perplexity

        ra = self.recipe_args
        model = model if model is not None else getattr(self, "peft_model", self.model)
        return {
            context: perplexity(
                model,
                self.split.heldout,
                window=context,
                n_windows=ra.heldout_tokens // context,
                batch_size=ra.eval_batch_size,
                progress=f"{label} @ {context}",
            )
            for context in ra.contexts
        }

    def evaluate_passkey(self) -> dict[str, Any]:
        """Passkey accuracy of (c) and of (a) (the same model, adapter off, original RoPE) by length and depth."""
        import contextlib

        from hf_prope.passkey import passkey_accuracy
        from hf_prope.patching import original_rope

        model, lengths = self.peft_model, self.recipe_args.eval_passkey_lengths
        after = passkey_accuracy(model, self.tokenizer, lengths=lengths, progress="(c) passkey")
        adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with adapter_off, original_rope(model):
            base = passkey_accuracy(model, self.tokenizer, lengths=lengths, progress="(a) passkey")
        return {"base": base, "patched_after_training": after}

    def evaluate_extensions(self) -> dict[str, dict[str, dict[int, float]]]:
        """(a) and (c) under each ``eval_extensions`` entry: label -> {"base": ..., "patched_after": ...}.

        (a) is the trained model itself with its adapter off and its original RoPE (the extension
        kept): no second model is loaded. The model is left unextended.
        """
        import contextlib

        from hf_prope.context_extension import extend_context
        from hf_prope.patching import original_rope

        model = self.peft_model
        out: dict[str, dict[str, dict[int, float]]] = {}
        try:
            for ext in self.recipe_args.extensions:
                extend_context(model, ext)
                after = self.evaluate(f"(c) + {ext.label}", model)
                adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                with adapter_off, original_rope(model):
                    base = self.evaluate(f"(a) + {ext.label}", model)
                out[ext.label] = {"base": base, "patched_after": after}
        finally:
            extend_context(model, None)
        return out

    def report(self) -> dict[str, Any]:
        """(c) on the trained model, then ``results.json``, the table and the plot (rank 0 writes)."""
        self.results["patched_after"] = self.evaluate("(c) patched after training", self.peft_model)
        self.results["extensions"] = self.evaluate_extensions()
        if self.recipe_args.eval_passkey_lengths:
            self.results["passkey"] = self.evaluate_passkey()
        shares = self.parameter_shares()
        self.say(
            f"Parameters held per process ({self.engine()}): "
            + ", ".join(
                f"rank {i}: {s['held']:,} of {s['total']:,} ({100 * s['share']:.1f}%)" for i, s in enumerate(shares)
            )
        )
        r = self.results
        ta, ra = self.training_args, self.recipe_args
        limit = self.training_length
        per_context: dict[str, Any] = {}
        for c in ra.contexts:
            control = r["control"][c] if "control" in r else None
            after = r["patched_after"][c]
            per_context[str(c)] = {
                "base": r["base"][c],
                "patched_before_training": r["patched_before"][c],
                "patched_after_training": after,
                "control_after_training": control,
                "cost_over_base": after / r["base"][c],
                "gap_over_control": after / control if control else None,
                "extrapolation": bool(limit is not None and c > limit),
                "extensions": {
                    label: {
                        "base": e["base"][c],
                        "patched_after_training": e["patched_after"][c],
                        "cost_over_base": e["patched_after"][c] / e["base"][c],
                        "cost_over_original": e["patched_after"][c] / r["base"][c],
                    }
                    for label, e in r.get("extensions", {}).items()
                },
            }
        metric = "gap_over_control" if ra.objective == "lm" and "control" in r else "cost_over_base"
        self.summary = {
            "model": self.model_args.model,
            "patch": self.spec.to_dict(),
            "patch_description": self.spec.describe(),
            "objective": ra.objective,
            "distillation": ra.distillation,
            "transfer": ra.transfer,
            "contexts": ra.contexts,
            "training_length": limit,
            "perplexity": per_context,
            "headline": {"metric": metric, "by_context": {k: v[metric] for k, v in per_context.items()}},
            "heldout": {
                "dataset": self.data_args.dataset,
                "window": ra.eval_window,
                "n_windows": ra.eval_windows,
                "tokens": int(self.split.heldout.numel()),
                "documents": ra.heldout_documents,
                "long_documents": self.split.heldout_documents,
            },
            "training": {
                "max_steps": ta.max_steps,
                "world_size": max(1, ta.world_size),
                "tokens_per_step": self.tokens_per_step(ra.block_size),
                "block_size": ra.block_size,
                "train_blocks": int(self.split.train_blocks.shape[0]),
                "device": str(ta.device),
                "engine": self.engine(),
                "parameters_per_process": shares,
            },
            "passkey": r.get("passkey"),
            "loss_curves": {stage: loss_curve(history) for stage, history in self.histories.items()},
            "seconds": round(time.perf_counter() - self.started, 1),
            "settings": self.settings(),
        }
        self.write_results(self.out, self.summary, format_table(self.summary), PLOT_FILE)
        return self.summary

    def engine(self) -> str:
        """How training was spread: ``deepspeed zero-3``, ``fsdp2``, ``ddp`` or ``single process``."""
        ta = self.training_args
        if ta.deepspeed:
            config = getattr(getattr(ta, "hf_deepspeed_config", None), "config", {}) or {}
            return f"deepspeed zero-{config.get('zero_optimization', {}).get('stage', 0)}"
        if fsdp_modules(self.peft_model):
            return "fsdp2"
        return "ddp" if max(1, ta.world_size) > 1 else "single process"

    def parameter_shares(self) -> list[dict[str, Any]]:
        """Each process's :func:`~hf_prope.distributed.parameter_share` of the trained model, rank order (a collective)."""
        mine = parameter_share(self.peft_model)
        world = rank_and_world()[1]
        if world == 1:
            return [mine]
        out: list[Any] = [None] * world
        torch.distributed.all_gather_object(out, mine)
        return out

    def card_results(self) -> dict[str, float]:
        """The figures for the model card: held-out perplexities at each context, the cost and the gap."""
        steps = self.summary["training"]["max_steps"]
        out: dict[str, float] = {}
        for context, p in self.summary["perplexity"].items():
            at = f"@ {context} tokens" + (" (extrapolation)" if p["extrapolation"] else "")
            out[f"held-out perplexity {at}, base model (RoPE)"] = p["base"]
            out[f"held-out perplexity {at}, patched, before training"] = p["patched_before_training"]
            out[f"held-out perplexity {at}, patched + LoRA ({steps} steps)"] = p["patched_after_training"]
            out[f"cost of the patch {at} (patched + LoRA / base)"] = p["cost_over_base"]
            if p["control_after_training"] is not None:
                out[f"held-out perplexity {at}, control: RoPE + same LoRA ({steps} steps)"] = p[
                    "control_after_training"
                ]
                out[f"gap {at} (patched / control)"] = p["gap_over_control"]
        return out

    @contextlib.contextmanager
    def _saved_model(self) -> Iterator[Any]:
        """The model rank 0 saves (``None`` on other ranks), its weights whole inside the block (a collective).

        An adapter save gathers the LoRA weights; a merged or GGUF save every weight, copied whole
        to rank 0's CPU memory one at a time (no device holds more). Under FSDP2, which cannot copy
        a wrapped model to merge it, a merged or GGUF save is of the stage's saved adapter loaded on
        its base in rank 0's CPU memory (loaded once, for the save and the push).
        """
        ra, main = self.recipe_args, is_main_process()
        if ra.save_method == "adapter" and ra.gguf is None:
            with gathered(_adapter_parameters(self.peft_model), model=self.peft_model):
                yield self.peft_model if main else None
        elif fsdp_modules(self.peft_model):
            if main and getattr(self, "_merge_source", None) is None:
                import hf_prope

                adapter = self.out / "patched" / "final"
                self.say(f"FSDP: merging from {adapter} (the trained adapter on its base, in CPU memory)")
                self._merge_source = hf_prope.from_pretrained(adapter, base_model=self._load_base(device="cpu"))
            yield self._merge_source if main else None
        else:
            with gathered_on_main(self.peft_model.parameters()):
                yield self.peft_model if main else None

    def save(self) -> Path | None:
        import hf_prope

        folder = self.out / self.recipe_args.save_method
        with self._saved_model() as model:
            if model is None:
                return None
            hf_prope.save_pretrained(
                model,
                folder,
                save_method=self.recipe_args.save_method,
                tokenizer=self.tokenizer,
                eval_results=self.card_results(),
                repo_id=self.training_args.hub_model_id,
                gguf=self.recipe_args.gguf,
            )
        print(f"Saved the {self.recipe_args.save_method} model to {folder}", flush=True)
        return folder

    def push(self) -> Any:
        if not self.training_args.hub_model_id:
            return None
        with self._saved_model() as model:
            return None if model is None else self._push(model)

    def _push(self, model: Any) -> Any:
        import hf_prope

        ta = self.training_args
        info = hf_prope.push_to_hub(
            model,
            ta.hub_model_id,
            tokenizer=self.tokenizer,
            save_method=self.recipe_args.save_method,
            private=ta.hub_private_repo,
            token=ta.hub_token,
            eval_results=self.card_results(),
            gguf=self.recipe_args.gguf,
        )
        print(f"Pushed to {ta.hub_model_id}: {getattr(info, 'commit_url', info)}", flush=True)
        return info

    def run(self) -> dict[str, Any]:
        with quiet_library_warnings():
            self.setup()
            self.train()
            summary = self.report()
            self.save()
            self.push()
        barrier()
        return summary

    # -----------------------------------------------------------------------------------------

    def plot(self, path: Path) -> None:
        plot_results(self.summary, path)


def _adapter_parameters(peft_model: Any) -> list[torch.Tensor]:
    """The LoRA weights an adapter save reads."""
    return [p for n, p in peft_model.named_parameters() if "lora_" in n]


_ROWS = (
    ("base", "(a) base model, RoPE", "#777"),
    ("patched_before_training", "(b) patched, before training", "#d62728"),
    ("patched_after_training", "(c) patched + LoRA", "#1f77b4"),
    ("control_after_training", "(d) control: RoPE + LoRA", "#2ca02c"),
)


def _context_label(summary: dict[str, Any], context: str) -> str:
    return f"{context}*" if summary["perplexity"][context]["extrapolation"] else context


def plot_results(summary: dict[str, Any], path: Path) -> None:
    """Perplexity of (a)-(d) at each context (grouped bars, log scale) and the training loss curves."""
    from matplotlib import ticker

    plt = pyplot()
    s = summary
    contexts = list(s["perplexity"])
    steps = s["training"]["max_steps"]
    rows = [
        (key, label, colour)
        for key, label, colour in _ROWS
        if any(s["perplexity"][c][key] is not None for c in contexts)
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.4))
    width = 0.8 / len(rows)
    for i, (key, label, colour) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(contexts))]
        values = [s["perplexity"][c][key] for c in contexts]
        bars = left.bar(xs, values, width, label=label, color=colour)
        for bar, v in zip(bars, values):
            left.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(contexts)), [_context_label(s, c) for c in contexts])
    left.set_xlabel("evaluation context (tokens per window; * = beyond the training length)")
    left.set_yscale("log")
    left.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    left.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    left.yaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_ylabel("held-out perplexity (log scale, lower is better)")
    left.set_title(
        textwrap.fill(f"{s['model']}: {s['patch_description']}", 70) + f"\nobjective {s['objective']}, "
        f"{steps} LoRA steps; {s['heldout']['tokens']:,} tokens held out",
        fontsize=10,
    )
    left.legend(fontsize=8)
    for stage, points in s["loss_curves"].items():
        if points:
            right.plot([x for x, _ in points], [y for _, y in points], label=stage, marker=".")
    right.set_xlabel("optimizer step")
    loss_name = {
        "lm": "cross-entropy",
        "distill": "KL to the unpatched model",
        "mix": "mixed KL + cross-entropy",
        "transfer": "layer-wise attention error",
    }
    name = loss_name[s["objective"]]
    steps_first = (s.get("transfer") or {}).get("steps")
    if steps_first:
        name = f"layer-wise attention error for {steps_first} steps, then {name}"
    right.set_ylabel(textwrap.fill(f"training loss ({name})", 60))
    metric = s["headline"]["metric"]
    name = "cost (c)/(a)" if metric == "cost_over_base" else "gap (c)/(d)"
    right.set_title(
        "training loss; " + name + ": " + ", ".join(f"{v:.3f} @ {c}" for c, v in s["headline"]["by_context"].items()),
        fontsize=10,
    )
    if any(s["loss_curves"].values()):
        right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def format_table(summary: dict[str, Any]) -> str:
    """The before/after table of a LoRA run's ``results.json``: one column per evaluation context."""
    p = summary["perplexity"]
    contexts = list(p)
    steps = summary["training"]["max_steps"]
    names = {
        "patched_after_training": f"(c) patched + LoRA, {steps} steps",
        "control_after_training": f"(d) control: RoPE + LoRA, {steps} steps",
    }
    rows = [(key, names.get(key, label)) for key, label, _ in _ROWS]
    ratio_rows = [("cost_over_base", "(c)/(a) cost of the patch"), ("gap_over_control", "(c)/(d) gap to the control")]
    width = max(len(name) for _, name in rows + ratio_rows) + 2
    held = summary["heldout"]
    lines = [
        f"{summary['model']}, patch: {summary['patch_description']}; objective: {summary['objective']}",
        f"held-out: the last {held['tokens']:,} tokens of {held['dataset']}, cut into windows of each context "
        "(each window from scratch)",
        "",
        f"{'perplexity @ context':<{width}}" + "".join(f"{_context_label(summary, c):>10}" for c in contexts),
        "-" * (width + 10 * len(contexts)),
    ]
    for key, name in rows:
        cells = [p[c][key] for c in contexts]
        if key == "control_after_training" and summary["objective"] in ("distill", "transfer"):
            continue  # a distillation's control is the original model, row (a)
        lines.append(f"{name:<{width}}" + "".join(f"{'(off)':>10}" if v is None else f"{v:>10.2f}" for v in cells))
    lines.append("-" * (width + 10 * len(contexts)))
    for key, name in ratio_rows:
        cells = [p[c][key] for c in contexts]
        if all(v is None for v in cells):
            continue
        lines.append(f"{name:<{width}}" + "".join(f"{'-':>10}" if v is None else f"{v:>10.3f}" for v in cells))
    for label in p[contexts[0]].get("extensions", {}):
        for key, name in (("base", f"(a) + {label}"), ("patched_after_training", f"(c) + {label}")):
            cells = [p[c]["extensions"][label][key] for c in contexts]
            lines.append(f"{name:<{width}}" + "".join(f"{v:>10.2f}" for v in cells))
        cells = [p[c]["extensions"][label]["cost_over_original"] for c in contexts]
        lines.append(f"{f'(c) + {label} / (a)':<{width}}" + "".join(f"{v:>10.3f}" for v in cells))
    if any(p[c]["extrapolation"] for c in contexts):
        lines.append(f"* beyond the model's training length ({summary['training_length']} tokens)")
    if summary.get("passkey"):
        pk = summary["passkey"]
        lengths = pk["base"]["lengths"]
        lines += ["", f"{'passkey accuracy @ length':<{width}}" + "".join(f"{n:>10}" for n in lengths)]
        for key, name in (("base", "(a) base model"), ("patched_after_training", "(c) patched + LoRA")):
            lines.append(f"{name:<{width}}" + "".join(f"{sum(a) / len(a):>10.2f}" for a in pk[key]["accuracy"]))
    metric = summary["headline"]["metric"]
    by_context = summary["headline"]["by_context"]
    what = "cost over the original model" if metric == "cost_over_base" else "gap to the same LoRA on RoPE (control)"
    lines.append(f"headline, {what}: " + ", ".join(f"{100 * (v - 1):+.1f}% @ {c}" for c, v in by_context.items()))
    return "\n".join(lines)
