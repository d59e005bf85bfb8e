"""Passkey retrieval: a number hidden at a chosen depth of filler text, asked for at the end.

The test long-context papers report (Mohtashami & Jaggi, 2023; the YaRN and LongRoPE papers):
an instruction, repeated filler sentences, one sentence giving a random pass key, more filler,
then ``What is the pass key? The pass key is``. The answer counts when greedy decoding gives
exactly the key's tokens. That is decided in one forward pass over the prompt and the answer
(teacher forcing): greedy decoding yields the answer if and only if, at every answer position,
the most likely next token is the answer's next token given the answer so far. Only the last
few positions' logits are made (``logits_to_keep``), so a 32k-token prompt holds no
vocabulary-wide logits.

Prompts are built from token ids (each piece tokenised once), so a prompt is exactly the length
asked, the key starts at the token offset its depth says, and the key for a given
``(seed, length, depth, trial)`` is the same on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"

__all__ = ["PasskeyPrompt", "passkey_prompt", "passkey_correct", "passkey_accuracy", "passkey_key"]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt: ``input_ids`` (1-D, exactly the length asked) and the answer's ids."""

    input_ids: torch.Tensor
    answer_ids: torch.Tensor
    key: str
    depth: float
    key_start: int  # index in input_ids of the key sentence's first token


def passkey_key(seed: int, length: int, depth: float, trial: int, digits: int = 5) -> str:
    """The pass key of one prompt: ``digits`` random digits, the first not 0, fixed by the arguments."""
    rng = random.Random(f"hf-prope-passkey:{seed}:{length}:{depth!r}:{trial}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(
    tokenizer: Any, length: int, depth: float, *, seed: int = 0, trial: int = 0, digits: int = 5
) -> PasskeyPrompt:
    """A prompt of exactly ``length`` tokens with the key sentence at ``depth`` (0 = first, 1 = last) of the filler.

    Raises ``ValueError`` when ``length`` cannot hold the instruction, the key and the question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(
            f"depth must be in [0, 1] (0: right after the instruction, 1: just before the question), got {depth}."
        )
    if not 1 <= digits <= 18:
        raise ValueError(f"digits must be between 1 and 18, got {digits}.")
    key = passkey_key(seed, length, depth, trial, digits)
    intro, sentence, question = _ids(tokenizer, INTRO), _ids(tokenizer, KEY.format(key=key)), _ids(tokenizer, QUESTION)
    budget = length - len(intro) - len(sentence) - len(question)
    if budget < 0:
        raise ValueError(
            f"A passkey prompt needs at least {length - budget} tokens (instruction, key, question); got length={length}."
        )
    unit = _ids(tokenizer, FILLER)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    before = round(depth * budget)
    ids = intro + filler[:before] + sentence + filler[before:] + question
    return PasskeyPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        answer_ids=torch.tensor(_ids(tokenizer, ANSWER.format(key=key)), dtype=torch.long),
        key=key,
        depth=depth,
        key_start=len(intro) + before,
    )


def passkey_correct(model: Any, prompt: PasskeyPrompt) -> bool:
    """Whether greedy decoding after ``prompt.input_ids`` gives exactly ``prompt.answer_ids`` (one forward pass)."""
    device = next(model.parameters()).device
    answer = prompt.answer_ids.to(device)
    ids = torch.cat([prompt.input_ids.to(device), answer[:-1]])[None]
    # The logits at the last len(answer) positions predict the answer's tokens one by one.
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer.numel()).logits[0]
    return bool(torch.equal(logits.argmax(-1), answer))


def passkey_accuracy(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 2,
    seed: int = 0,
    progress: bool | str = False,
) -> dict[str, Any]:
    """Passkey accuracy by prompt length and key depth: ``{"lengths", "depths", "trials", "seed", "accuracy"}``.

    ``accuracy[i][j]`` is the share of ``trials`` prompts of ``lengths[i]`` tokens with the key at
    ``depths[j]`` that the model answers exactly. Every prompt is built (and checked) before the
    first forward pass. Under ``torch.distributed`` each process answers a share (all of them where
    the weights are partitioned) and all get the same table.
    """
    from .distributed import has_partitioned_parameters, rank_and_world

    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}.")
    if not lengths or not depths:
        raise ValueError("passkey needs at least one length and one depth.")
    cells = [(i, j, t) for i in range(len(lengths)) for j in range(len(depths)) for t in range(trials)]
    prompts = {c: passkey_prompt(tokenizer, lengths[c[0]], depths[c[1]], seed=seed, trial=c[2]) for c in cells}
    rank, world = rank_and_world()
    if has_partitioned_parameters(model):
        world = 1  # ZeRO-3 / FSDP2 gather weights in every forward: every process answers every prompt
    correct = torch.zeros(len(lengths), len(depths), dtype=torch.float64)
    mine = cells[rank::world]
    was_training = model.training
    model.eval()
    desc = progress if isinstance(progress, str) else "passkey"
    try:
        with torch.no_grad(), tqdm(total=len(mine), desc=desc, unit="prompt", disable=not progress or rank) as bar:
            for cell in mine:
                correct[cell[0], cell[1]] += float(passkey_correct(model, prompts[cell]))
                bar.update(1)
    finally:
        model.train(was_training)
    if world > 1:
        sums = correct.to(next(model.parameters()).device)
        torch.distributed.all_reduce(sums)
        correct = sums.cpu()
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "seed": seed,
        "accuracy": (correct / trials).tolist(),
    }
