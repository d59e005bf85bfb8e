"""Train the same small model from scratch once per positional encoding and compare them (the paper's Table 2).

Every variant — RoPE at two bases, NoPE, p-RoPE at two fractions and the control that
truncates the *highest* frequencies instead — gets the same architecture, data, tokenizer,
step budget and seeds. For a given seed the initial weights and the order of the training
blocks are the same in every variant (a patch changes no parameter), so the comparison is
paired: the ratio of two variants at one seed is freer of noise than either perplexity alone.

Patched variants are built with class-level patching (``hf_prope.apply_patch_to_class``), as a
user training a new model would; RoPE variants are plain transformers models with their base
set in ``rope_parameters``. Perplexity is measured on held-out text at the training context and
at a longer one. Output: ``results.json``, ``results.png`` (bars with the seed spread, training
and validation curves), the table on stdout and in ``results.md``::

    hf-prope run ablation --config ablation_python_docs           # ~1 h on 2 CPU cores
    torchrun --nproc_per_node 4 -m hf_prope run ablation --config ablation_gpu
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .base import (
    RESULTS_FILE,
    DataArguments,
    barrier,
    check_writable,
    is_main_process,
    pyplot,
    save_figure,
    write_atomic,
    write_json,
)
from .training import TrainingRecipe, loss_curve, quiet_library_warnings

PLOT_FILE = "results.png"
TABLE_FILE = "results.md"
RUNS_DIR = "runs"
TOKENIZER_DIR = "tokenizer"
EOS = "<|endoftext|>"
_OUTPUTS = (RUNS_DIR, TOKENIZER_DIR, RESULTS_FILE, PLOT_FILE, TABLE_FILE)
DEFAULT_VARIANTS = ["rope", "rope@500k", "nope", "p-rope-0.25", "p-rope-0.75", "p-rope-0.75-lowest"]


# ---------------------------------------------------------------------------------------------
# Variants: one short name per positional encoding


@dataclass(frozen=True)
class AblationVariant:
    """One positional encoding of the ablation: a RoPE base and the hf-prope patch on top (or none)."""

    name: str
    theta: float
    spec: Any | None  # hf_prope.PatchSpec, None for plain RoPE

    @property
    def label(self) -> str:
        """The spec's own label (:func:`hf_prope.spec.label_of`), with the RoPE base where it matters."""
        from hf_prope.spec import label_of

        name = label_of(self.spec)
        return name if self.spec is not None and self.spec.name == "nope" else f"{name} (θ={_short_number(self.theta)})"


_VARIANT = re.compile(
    r"^(?P<kind>rope|nope|p-rope-(?P<p>[0-9.]+)(?P<lowest>-lowest)?)(@(?P<theta>[0-9.eE+]+[kKmM]?))?$"
)


def _short_number(value: float) -> str:
    for unit, scale in (("m", 1e6), ("k", 1e3)):
        if value >= scale and value % (scale / 10) == 0:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def _parse_theta(text: str) -> float:
    scale = {"k": 1e3, "m": 1e6}.get(text[-1].lower(), 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def parse_variant(name: str, default_theta: float) -> AblationVariant:
    """``rope``, ``nope``, ``p-rope-<p>`` or ``p-rope-<p>-lowest``, each optionally ``@<theta>`` (``rope@500k``).

    ``p-rope-0.75-lowest`` keeps the *lowest* 75% of the frequencies rotating: the paper's control,
    which truncates the highest ones instead.
    """
    from hf_prope.spec import PatchSpec

    match = _VARIANT.match(name.strip())
    if match is None:
        raise ValueError(
            f"Unknown variant {name!r}. Variants are rope, nope, p-rope-<p> or p-rope-<p>-lowest, each optionally "
            "followed by @<theta> (e.g. rope@500k, p-rope-0.25, p-rope-0.75-lowest@10k)."
        )
    theta = _parse_theta(match["theta"]) if match["theta"] else default_theta
    if not theta > 0 or not math.isfinite(theta):
        raise ValueError(f"Variant {name!r}: the RoPE base must be a positive number, got {theta}.")
    kind = match["kind"]
    if kind == "rope":
        spec = None
    elif kind == "nope":
        spec = PatchSpec("nope")
    else:
        try:
            p = float(match["p"])
        except ValueError:
            raise ValueError(f"Variant {name!r}: {match['p']!r} is not a number.") from None
        spec = PatchSpec("p-rope", p=p, rotate="lowest" if match["lowest"] else "highest")
    return AblationVariant(name=name.strip(), theta=theta, spec=spec)


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class ScratchModelArguments:
    """The model trained from scratch (a transformers config built in code) and its tokenizer."""

    model_type: str = field(
        default="llama",
        metadata={
            "help": "Architecture: any model type hf-prope supports "
            "(hf_prope.supported_model_types(): llama, mistral, gemma, gemma2, gemma3_text, qwen2, qwen3)."
        },
    )
    hidden_size: int = field(default=192, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers."})
    num_attention_heads: int = field(default=3, metadata={"help": "Query heads."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Key/value heads (default: as many as query heads)."}
    )
    head_dim: int = field(default=64, metadata={"help": "Size of a head: head_dim / 2 frequency pairs."})
    intermediate_size: int = field(default=576, metadata={"help": "Width of the MLP."})
    rope_theta: float = field(default=10_000.0, metadata={"help": "RoPE base of every variant without its own @theta."})
    tokenizer: str = field(
        default="bpe",
        metadata={
            "help": "bpe (a byte-level BPE trained on the data with the tokenizers library), an embedded model "
            "name (smollm2-135m: its tokenizer), a local tokenizer folder or a Hub id."
        },
    )
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the bpe tokenizer (ignored otherwise)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel: sdpa or eager."})

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of channels), got {self.head_dim}.")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise ValueError(f"vocab_size must be at least 300 (256 bytes + merges), got {self.vocab_size}.")


@dataclass
class AblationArguments:
    """Which variants, seeds, contexts and held-out text."""

    variants: list[str] = field(
        default_factory=lambda: list(DEFAULT_VARIANTS),
        metadata={
            "help": "Positional encodings to train: rope, nope, p-rope-<p>, p-rope-<p>-lowest, each optionally "
            "@<theta> (rope@500k)."
        },
    )
    reference: str = field(
        default="rope", metadata={"help": "The variant every other is compared with (paired by seed)."}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "One training run per seed and variant."}
    )
    block_size: int = field(default=256, metadata={"help": "Training context (tokens per block)."})
    long_eval_window: int = field(
        default=1024, metadata={"help": "The longer evaluation context (a multiple of block_size)."}
    )
    long_eval_windows: int = field(
        default=8,
        metadata={
            "help": "Held-out windows at the long context; the held-out text is long_eval_windows x "
            "long_eval_window tokens from the end of the data, also cut into block_size windows."
        },
    )
    eval_batch_size: int = field(default=4, metadata={"help": "Windows per evaluation forward pass."})
    save_models: bool = field(
        default=False, metadata={"help": "Save every trained model (with its patch) under runs/."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir: finished runs are kept."})
    overwrite: bool = field(default=False, metadata={"help": "Discard a previous run in output_dir."})

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens, got {self.block_size}.")
        if self.long_eval_window < self.block_size or self.long_eval_window % self.block_size:
            raise ValueError(
                f"long_eval_window ({self.long_eval_window}) must be a multiple of block_size ({self.block_size}), "
                "so that both contexts score the same held-out tokens."
            )
        for name in ("long_eval_windows", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}.")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be a non-empty list without repeats, got {self.variants}.")
        if self.reference not in self.variants:
            raise ValueError(f"reference={self.reference!r} is not among the variants {self.variants}.")
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other; choose one.")

    @property
    def heldout_tokens(self) -> int:
        return self.long_eval_window * self.long_eval_windows


# ---------------------------------------------------------------------------------------------
# Building a variant's model


def scratch_config(args: ScratchModelArguments, variant: AblationVariant, tokenizer: Any, max_positions: int) -> Any:
    """The transformers config of ``variant``'s model: the architecture's own config class, RoPE base set."""
    from transformers import AutoConfig

    from hf_prope.registry import get_architecture

    get_architecture(args.model_type)  # an unsupported type fails here, naming the supported ones
    config = AutoConfig.for_model(
        args.model_type,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads or args.num_attention_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    rope = config.rope_parameters
    # Per-layer-type models (Gemma 3) keep one dict per layer type: every type gets the variant's base.
    # (transformers 5.0 also leaves flat rope_type/rope_theta keys beside them, which its Gemma 3 ignores.)
    nested = [v for v in rope.values() if isinstance(v, dict)]
    for params in nested or [rope]:
        params["rope_type"] = "default"
        params["rope_theta"] = float(variant.theta)
    return config


def build_model(
    args: ScratchModelArguments, variant: AblationVariant, tokenizer: Any, *, seed: int, max_positions: int
) -> Any:
    """``variant``'s freshly initialised model; the same ``seed`` gives the same weights in every variant."""
    from transformers import AutoModelForCausalLM, set_seed

    config = scratch_config(args, variant, tokenizer, max_positions)
    set_seed(seed)
    from hf_prope.class_patching import class_patched

    with class_patched(args.model_type, variant.spec):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn_implementation)
    return model


def train_bpe_tokenizer(texts: Any, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) trained on ``texts``, wrapped for transformers; EOS ends documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def load_tokenizer(args: ScratchModelArguments, dataset: Any, text_column: str) -> Any:
    """The tokenizer ``args`` names; ``bpe`` trains one on the dataset's text."""
    from transformers import AutoTokenizer

    from hf_prope import models
    from hf_prope.files import local_path

    if args.tokenizer == "bpe":
        return train_bpe_tokenizer((t for t in dataset[text_column] if isinstance(t, str) and t), args.vocab_size)
    if args.tokenizer in models.EMBEDDED_MODELS:
        from hf_prope.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(models.embedded_gguf_path(args.tokenizer))
    path = local_path(args.tokenizer)
    if path is None:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(f"No tokenizer folder at {args.tokenizer!r}.")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# The recipe


def _spread(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


class AblationRecipe(TrainingRecipe):
    """``hf-prope run ablation``: every positional-encoding variant trained from scratch, several seeds each.

    ``run()`` = ``setup()`` (every check, the tokenizer and the data split), ``train()`` (one
    run per variant and seed; finished runs are kept and skipped with ``resume=true``), ``report()``.
    """

    name = "ablation"
    description = "Train one small model from scratch per positional encoding (RoPE, NoPE, p-RoPE), several seeds"
    default_config = "ablation_python_docs"
    arguments = {
        "model_args": ScratchModelArguments,
        "data_args": DataArguments,
        "ablation_args": AblationArguments,
        "training_args": TrainingArguments,
    }
    outputs = _OUTPUTS
    run_settings = "ablation_args"

    model_args: ScratchModelArguments
    data_args: DataArguments
    ablation_args: AblationArguments
    training_args: TrainingArguments

    def __init__(self, *positional: Any, **settings: Any) -> None:
        super().__init__(*positional, **settings)
        self.runs: dict[str, dict[int, dict[str, Any]]] = {}

    # -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        from hf_prope.data import split_tail, tokenize_dataset
        from hf_prope.registry import get_architecture
        from hf_prope.spec import rotated_pairs

        self.started = time.perf_counter()
        ta, aa, ma = self.training_args, self.ablation_args, self.model_args
        _ = ta.device  # initialises the process group under torchrun / accelerate launch
        if ta.max_steps is None or ta.max_steps <= 0:
            raise ValueError(
                "Set max_steps (a positive number of optimizer steps): every variant gets the same budget."
            )
        if ta.push_to_hub:
            raise ValueError(
                "The ablation recipe does not push (it trains many small models); set push_to_hub=false "
                "and publish a chosen run with hf_prope.push_to_hub."
            )
        get_architecture(ma.model_type)  # an unsupported architecture fails first, naming the supported ones
        self.variants = [parse_variant(name, ma.rope_theta) for name in aa.variants]
        for variant in self.variants:
            spec = variant.spec
            if spec is not None and spec.name == "p-rope" and 0 < spec.p < 1:
                r = rotated_pairs(spec.p, ma.head_dim)
                if r in (0, ma.head_dim // 2):
                    raise ValueError(
                        f"Variant {variant.name}: with head_dim={ma.head_dim} ({ma.head_dim // 2} pairs) p={spec.p:g} "
                        f"rotates {r} pairs, the same as {'NoPE' if r == 0 else 'RoPE'}; use a larger head_dim."
                    )
        self.out = Path(ta.output_dir).expanduser().resolve()
        if is_main_process():
            check_writable(self.out)
            self.check_previous_run()
        self.check_sharding()
        dataset = self.data_args.load()
        saved = self.out / TOKENIZER_DIR
        if aa.resume and saved.is_dir():
            from transformers import AutoTokenizer

            self.say(f"Tokenizer: the run's own, {saved}")  # resumed runs see exactly the same tokens
            self.tokenizer = AutoTokenizer.from_pretrained(saved, local_files_only=True)
        else:
            self.say(
                "Tokenizer: " + ("training a byte-level BPE on the data" if ma.tokenizer == "bpe" else ma.tokenizer)
            )
            self.tokenizer = load_tokenizer(ma, dataset, self.data_args.text_column)
        self.max_positions = aa.long_eval_window
        # One model is built now: a bad architecture or size fails before any training.
        probe = build_model(ma, self.variants[0], self.tokenizer, seed=aa.seeds[0], max_positions=self.max_positions)
        self.parameters = sum(p.numel() for p in probe.parameters())
        ids = tokenize_dataset(dataset, self.tokenizer, text_column=self.data_args.text_column)
        world = max(1, ta.world_size)
        self.split = split_tail(
            ids,
            block_size=aa.block_size,
            heldout_tokens=aa.heldout_tokens,
            min_blocks=ta.per_device_train_batch_size * world,
        )
        heldout = self.split.heldout
        self.eval_blocks = heldout[: heldout.numel() // aa.block_size * aa.block_size].reshape(-1, aa.block_size)
        self.step_tokens = tokens_per_step = self.tokens_per_step(aa.block_size)
        self.say(
            f"Data: {self.split.total_tokens:,} tokens ({len(self.tokenizer):,}-token vocabulary); "
            f"{self.split.train_blocks.shape[0]:,} training blocks of {aa.block_size}, held out the last "
            f"{heldout.numel():,}. {len(self.variants)} variants x {len(aa.seeds)} seeds, {ta.max_steps} steps of "
            f"{tokens_per_step:,} tokens each ({ta.max_steps * tokens_per_step / self.split.train_tokens:.1f} epochs)."
        )
        self.clear_previous_run()
        barrier()

    # -----------------------------------------------------------------------------------------

    def run_dir(self, variant: AblationVariant, seed: int) -> Path:
        return self.out / RUNS_DIR / variant.name / f"seed{seed}"

    def train(self) -> None:
        """One training run per variant and seed, seeds outermost so a partial run already holds paired results."""
        aa = self.ablation_args
        if is_main_process() and not (self.out / TOKENIZER_DIR).is_dir():
            from hf_prope.files import atomic_path

            with atomic_path(self.out / TOKENIZER_DIR, folder=True) as tmp:
                self.tokenizer.save_pretrained(tmp)
        jobs = [(seed, variant) for seed in aa.seeds for variant in self.variants]
        for n, (seed, variant) in enumerate(jobs, 1):
            started = time.perf_counter()
            result = self._train_one(variant, seed, f"[{n}/{len(jobs)}]")
            self.runs.setdefault(variant.name, {})[seed] = result
            if not result.get("loaded"):
                spent = time.perf_counter() - started
                self.say(
                    f"[{n}/{len(jobs)}] {variant.name} seed {seed}: perplexity {result['perplexity']:.3f} at "
                    f"{aa.block_size}, {result['perplexity_long']:.3f} at {aa.long_eval_window} ({spent:.0f} s; "
                    f"about {spent * (len(jobs) - n) / 60:.0f} min left)"
                )

    def _train_one(self, variant: AblationVariant, seed: int, tag: str) -> dict[str, Any]:
        from transformers.trainer_utils import get_last_checkpoint

        import hf_prope
        from hf_prope.evaluation import perplexity

        aa = self.ablation_args
        started = time.perf_counter()
        folder = self.run_dir(variant, seed)
        record = folder / "run.json"
        if aa.resume and record.is_file():
            self.say(f"{tag} {variant.name} seed {seed}: finished earlier, kept")
            return {**json.loads(record.read_text()), "loaded": True}
        model = build_model(self.model_args, variant, self.tokenizer, seed=seed, max_positions=self.max_positions)
        args = dataclasses.replace(
            self.training_args,
            output_dir=str(folder),
            seed=seed,
            data_seed=seed,
            push_to_hub=False,
            eval_strategy="steps" if self.training_args.eval_steps else "no",
            per_device_eval_batch_size=aa.eval_batch_size,
        )
        trainer = self.make_trainer(
            model, args, self.split.train_blocks, eval_blocks=self.eval_blocks if args.eval_strategy != "no" else None
        )
        last = get_last_checkpoint(str(folder)) if aa.resume and folder.is_dir() else None
        self.say(
            f"{tag} {variant.name} seed {seed}: {variant.label}, {args.max_steps} steps"
            + (f", resuming from {last}" if last else "")
        )
        trainer.train(resume_from_checkpoint=last)
        model.eval()
        result = {
            "variant": variant.name,
            "seed": seed,
            "perplexity": perplexity(
                model,
                self.split.heldout,
                window=aa.block_size,
                n_windows=aa.heldout_tokens // aa.block_size,
                batch_size=aa.eval_batch_size,
            ),
            "perplexity_long": perplexity(
                model,
                self.split.heldout,
                window=aa.long_eval_window,
                n_windows=aa.long_eval_windows,
                batch_size=aa.eval_batch_size,
            ),
            "train_loss": loss_curve(trainer.state.log_history, "loss"),
            "eval_loss": loss_curve(trainer.state.log_history, "eval_loss"),
            "frequencies": hf_prope.layer_frequencies(model)[0].tolist(),
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(float(trainer.state.log_history[-1].get("train_runtime", 0.0)), 1),
        }
        if is_main_process():
            if aa.save_models:
                hf_prope.save_pretrained(model, folder / "model", tokenizer=self.tokenizer)
            for checkpoint in folder.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)  # the run is finished: its checkpoints would only fill the disk
            write_json(record, result)
        barrier()
        return result

    # -----------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        aa, ta, ma = self.ablation_args, self.training_args, self.model_args
        world = max(1, ta.world_size)
        reference = self.runs[aa.reference]
        variants: dict[str, Any] = {}
        for variant in self.variants:
            runs = self.runs[variant.name]
            seeds = sorted(runs)
            entry: dict[str, Any] = {
                "label": variant.label,
                "rope_theta": variant.theta,
                "patch": variant.spec.to_dict() if variant.spec is not None else None,
                "patch_description": variant.spec.describe() if variant.spec is not None else "RoPE, unchanged",
                "rotating_pairs": sum(1 for f in runs[seeds[0]]["frequencies"] if f != 0),
                "seeds": seeds,
            }
            for key in ("perplexity", "perplexity_long"):
                entry[key] = _spread([runs[s][key] for s in seeds])
                entry[key]["runs"] = [runs[s][key] for s in seeds]
                # Paired by seed: same initial weights and data order as the reference.
                entry[f"{key}_vs_reference"] = _spread([runs[s][key] / reference[s][key] for s in seeds])
            entry["train_loss"] = _mean_curve([runs[s]["train_loss"] for s in seeds])
            entry["eval_loss"] = _mean_curve([runs[s]["eval_loss"] for s in seeds])
            variants[variant.name] = entry
        tokens_per_step = self.step_tokens
        self.summary = {
            "model": {
                "model_type": ma.model_type,
                "hidden_size": ma.hidden_size,
                "num_hidden_layers": ma.num_hidden_layers,
                "num_attention_heads": ma.num_attention_heads,
                "head_dim": ma.head_dim,
                "parameters": self.parameters,
                "tokenizer": ma.tokenizer,
                "vocab_size": len(self.tokenizer),
            },
            "reference": aa.reference,
            "contexts": {"train": aa.block_size, "long": aa.long_eval_window},
            "heldout": {"dataset": self.data_args.dataset, "tokens": int(self.split.heldout.numel())},
            "training": {
                "max_steps": ta.max_steps,
                "tokens_per_step": tokens_per_step,
                "world_size": world,
                "train_tokens": self.split.train_tokens,
                "epochs": ta.max_steps * tokens_per_step / self.split.train_tokens,
            },
            "variants": variants,
            "seconds": round(time.perf_counter() - self.started, 1),
            "settings": self.settings(),
        }
        if is_main_process():
            table = format_table(self.summary)
            write_atomic(self.out / TABLE_FILE, table + "\n")
            self.write_results(self.out, self.summary, table, PLOT_FILE)
        return self.summary

    def run(self) -> dict[str, Any]:
        with quiet_library_warnings():
            self.setup()
            self.train()
            summary = self.report()
        barrier()
        return summary

    # -----------------------------------------------------------------------------------------

    def plot(self, path: Path) -> None:
        plot_results(self.summary, path)


def _mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """Mean over seeds at the steps every seed logged."""
    if not curves or not all(curves):
        return []
    common = set.intersection(*({step for step, _ in c} for c in curves))
    by_step = [{step: value for step, value in c} for c in curves]
    return [[step, statistics.fmean(d[step] for d in by_step)] for step in sorted(common)]


def _fmt(spread: dict[str, Any], digits: int = 2) -> str:
    sd = spread["sd"]
    return f"{spread['mean']:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def format_table(summary: dict[str, Any]) -> str:
    """The Markdown table of an ablation's ``results.json``: mean ± sd over seeds, and paired ratios."""
    ctx = summary["contexts"]
    ref = summary["variants"][summary["reference"]]["label"]
    n = len(next(iter(summary["variants"].values()))["seeds"])
    lines = [
        f"| variant | rotating pairs | perplexity @ {ctx['train']} | × {ref} | perplexity @ {ctx['long']} | × {ref} |",
        "|---|---|---|---|---|---|",
    ]
    pairs = summary["model"]["head_dim"] // 2
    for entry in summary["variants"].values():
        lines.append(
            f"| {entry['label']} | {entry['rotating_pairs']}/{pairs} | {_fmt(entry['perplexity'])} | "
            f"{_fmt(entry['perplexity_vs_reference'], 3)} | {_fmt(entry['perplexity_long'])} | "
            f"{_fmt(entry['perplexity_long_vs_reference'], 3)} |"
        )
    t = summary["training"]
    m = summary["model"]
    lines += [
        "",
        f"mean ± sd over {n} seed(s); × = ratio to {ref} at the same seed (same initial weights and data order), "
        f"mean ± sd. {m['model_type']} {m['num_hidden_layers']} layers x {m['hidden_size']}, {m['num_attention_heads']} "
        f"heads of {m['head_dim']}, {m['parameters'] / 1e6:.2f}M parameters; {t['max_steps']} steps x "
        f"{t['tokens_per_step']:,} tokens ({t['epochs']:.1f} epochs of {t['train_tokens']:,}); held out the last "
        f"{summary['heldout']['tokens']:,} tokens of {summary['heldout']['dataset']}, trained at {ctx['train']} tokens.",
    ]
    return "\n".join(lines)


def plot_results(summary: dict[str, Any], path: Path) -> None:
    """Bars (mean, sd, every seed as a dot) at both contexts, and the mean training / validation curves."""
    plt = pyplot()
    ctx = summary["contexts"]
    entries = list(summary["variants"].values())
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    for ax, key, context in ((axes[0], "perplexity", ctx["train"]), (axes[1], "perplexity_long", ctx["long"])):
        xs = range(len(entries))
        means = [e[key]["mean"] for e in entries]
        sds = [e[key]["sd"] or 0.0 for e in entries]
        ax.bar(xs, means, yerr=sds, capsize=4, color=[colors[i % len(colors)] for i in xs], alpha=0.8)
        for i, e in enumerate(entries):
            ax.plot([i] * len(e[key]["runs"]), e[key]["runs"], "k.", ms=5)
            top = max([means[i] + sds[i], *e[key]["runs"]])
            ax.annotate(
                f"{means[i]:.2f}",
                (i, top),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
            )
        ax.set_xticks(list(xs), [textwrap.fill(e["label"], 14) for e in entries], fontsize=8)
        low, high = min(min(e[key]["runs"]) for e in entries), max(max(e[key]["runs"]) for e in entries)
        if high / low > 3:
            ax.set_yscale("log")
        else:
            ax.set_ylim(low * 0.97, high * 1.05)
        ax.set_ylabel("held-out perplexity (lower is better)")
        ax.set_title(
            f"evaluated at {context} tokens"
            + (
                " (training context)"
                if context == ctx["train"]
                else f" ({context // ctx['train']}x the training context)"
            ),
            fontsize=10,
        )
        ax.grid(axis="y", alpha=0.3)
    right = axes[2]
    for i, e in enumerate(entries):
        color = colors[i % len(colors)]
        if e["train_loss"]:
            right.plot(*zip(*e["train_loss"]), color=color, label=e["label"], alpha=0.8)
        if e["eval_loss"]:
            right.plot(*zip(*e["eval_loss"]), color=color, ls="--", marker=".", alpha=0.9)
    right.set_xlabel("optimizer step")
    right.set_ylabel("loss (nats/token): solid training, dashed held-out")
    right.set_title(f"mean over {len(entries[0]['seeds'])} seed(s)", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    losses = [v for e in entries for _, v in e["train_loss"] + e["eval_loss"]]
    if losses:
        right.set_ylim(min(losses) * 0.95, min(max(losses), min(losses) * 2.5))
    m, t = summary["model"], summary["training"]
    fig.suptitle(
        f"From scratch on {summary['heldout']['dataset']}: {m['model_type']}, {m['parameters'] / 1e6:.1f}M parameters, "
        f"{t['max_steps']} steps x {t['tokens_per_step']:,} tokens, trained at {ctx['train']} tokens",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def load_results(folder: str | Path) -> dict[str, Any]:
    """An ablation's ``results.json``."""
    return json.loads((Path(folder) / RESULTS_FILE).read_text())


__all__ = [
    "AblationRecipe",
    "ScratchModelArguments",
    "AblationArguments",
    "AblationVariant",
    "parse_variant",
    "build_model",
    "scratch_config",
    "train_bpe_tokenizer",
    "format_table",
    "plot_results",
    "load_results",
]
