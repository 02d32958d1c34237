"""The study's third objective: eval loss, or a task metric scored on greedy generations.

`--quality exact_match | rouge_l` has the probe, after its eval loss, generate greedily from
each eval row's prompt and score the answer against the row's own. The objective stays a cost
(lower is better, like eval loss), so the frontier and the picks need no other direction: it is
1 - the mean score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

QUALITY_METRICS = ("eval_loss", "exact_match", "rouge_l")
QUALITY_WORDS = {
    "exact_match": "1 - exact match of the greedy answers to the eval prompts",
    "rouge_l": "1 - ROUGE-L F1 of the greedy answers to the eval prompts",
}
"""What the third objective is under each task metric (it is eval loss otherwise)."""


def quality_reading(metric: str) -> str | None:
    """The line a report opens its readings with when the third objective is not eval loss."""
    if metric not in QUALITY_WORDS:
        return None
    return (
        f"Quality is {QUALITY_WORDS[metric]} (--quality {metric}; lower is better): the "
        "figures labelled eval loss below are that, not a loss."
    )


def check_quality(metric: str, gpus_per_probe: int = 1) -> None:
    from autotune.errors import UsageError

    if metric not in QUALITY_METRICS:
        raise UsageError(f"--quality {metric!r} is not one of {', '.join(QUALITY_METRICS)}")
    if metric != "eval_loss" and gpus_per_probe > 1:
        # generation on a DDP wrapper or sharded ranks would need every rank in lockstep
        raise UsageError(
            f"--quality {metric} scores generations of a one-GPU probe; "
            "run it without --gpus-per-probe"
        )


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two agree after whitespace is collapsed, else 0.0."""
    return float(prediction.split() == reference.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004) over lower-cased whitespace tokens: the longest common
    subsequence's share of the prediction (precision) and of the reference (recall), combined
    as their harmonic mean. The rouge-score package's rougeL without stemming, less its
    punctuation-splitting tokenizer; written out to keep a dependency away for 15 lines."""
    ours, theirs = prediction.lower().split(), reference.lower().split()
    if not ours or not theirs:
        return float(ours == theirs)
    previous = [0] * (len(theirs) + 1)
    for word in ours:
        current = [0]
        for j, other in enumerate(theirs):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


SCORERS = {"exact_match": exact_match, "rouge_l": rouge_l}


def quality_cost(metric: str, eval_loss: float, score: float | None) -> float:
    """The third objective's value: eval loss, or 1 - the task metric's mean score."""
    if metric == "eval_loss":
        return eval_loss
    return 1.0 - (score or 0.0)


def generation_score(
    model: Any, examples: Sequence[Any], tokenizer: Any, metric: str, device: str
) -> float:
    """Mean `metric` over the eval rows that have a prompt: greedy generation from the prompt
    tokens (those without loss), as many new tokens as the row's answer, scored against it."""
    import torch

    from autotune.data.tokens import IGNORE_INDEX

    score = SCORERS[metric]
    scores = []
    model.eval()
    with torch.no_grad():
        for example in examples:
            labels = list(example.labels)
            answer_start = next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), 0)
            if answer_start == 0:
                continue  # a text row: no prompt to answer
            prompt = torch.tensor([list(example.input_ids[:answer_start])], device=device)
            reference = tokenizer.decode(
                list(example.input_ids[answer_start:]), skip_special_tokens=True
            )
            output = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=len(labels) - answer_start,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            text = tokenizer.decode(output[0, answer_start:], skip_special_tokens=True)
            scores.append(score(text, reference))
    model.train()
    if not scores:
        raise ValueError(f"--quality {metric}: no eval row has a prompt to generate from")
    return sum(scores) / len(scores)
