"""The training loss of a causal language model, computed as a recipe's `loss` says.

- standard: the model's own forward with labels (transformers' ForCausalLMLoss): the whole
  micro-batch's logits, their fp32 copy, the log-softmax and their gradient are alive at once;
- chunked: the decoder's hidden states are cut into chunks of CHUNK_TOKENS tokens; each chunk
  goes through the output head and the cross-entropy in fp32 under activation checkpointing,
  so only one chunk's logits exist at a time, in forward and (recomputed) in backward;
- fused_linear: Liger's fused linear cross-entropy (the liger-kernel package, CUDA only),
  which never materialises more than a slice of the logits either.

All three give the same loss (the mean over tokens whose label is not IGNORE_INDEX, labels
shifted by one) and the same gradients; tests/test_loss.py checks chunked against standard.
The step loop, the evaluation and the replay memory model all call `causal_lm_loss`.
"""

from __future__ import annotations

from typing import Any

from autotune.data.tokens import IGNORE_INDEX
from autotune.losses import LOSSES
from autotune.recipe import Recipe

CHUNK_TOKENS = 1024
"""Tokens per chunk of the chunked loss. A 150k vocabulary's fp32 logits for 1024 tokens are
0.6 GB, against 2.5 GB for a micro-batch of 4 x 1024; smaller chunks save little more (the
rest of the step dominates) and make the head's matmul too thin to keep a GPU busy."""


def causal_lm_loss(model: Any, batch: dict[str, Any], recipe: Recipe) -> Any:
    """The micro-batch's mean loss per trained token; `batch` is the forward's keyword
    arguments, labels included (unshifted, IGNORE_INDEX where no loss is taken). With the
    recipe's activation_offload, what the forward saves for backward is held in host memory."""
    from autotune.training.offload import offloaded_forward

    with offloaded_forward(recipe):
        return _loss(model, batch, recipe)


def _loss(model: Any, batch: dict[str, Any], recipe: Recipe) -> Any:
    kind = LOSSES[recipe.loss]
    if not (kind.chunked or kind.fused):
        return model(**batch).loss
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    labels = batch["labels"]
    hidden = model.get_decoder()(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    targets = _shifted(labels)
    if kind.fused:
        return _fused_linear_loss(model, head, hidden, targets)
    return _chunked_loss(model, head, hidden, targets)


def _shifted(labels: Any) -> Any:
    """Labels one position ahead, IGNORE_INDEX last (tokens < n predict token n), flattened:
    what ForCausalLMLoss compares each position's logits with."""
    import torch

    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)


def _logit_transform(config: Any) -> tuple[float | None, float | None]:
    """(final softcap, scale) the model's causal-LM head applies after the projection: Gemma 2
    and 3 soft-cap their logits, Cohere scales them (logit_scale), Granite divides them
    (logits_scaling)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if divisor:
        scale = (scale or 1.0) / divisor
    return softcap, scale


def _chunk_loss_sum(
    head: Any, hidden: Any, targets: Any, softcap: float | None, scale: float | None
) -> Any:
    """Summed cross-entropy of one chunk: its logits exist only inside this call."""
    import torch

    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _chunked_loss(model: Any, head: Any, hidden: Any, targets: Any) -> Any:
    import torch
    from torch.utils.checkpoint import checkpoint

    softcap, scale = _logit_transform(model.config)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = None
    for start in range(0, flat.shape[0], CHUNK_TOKENS):
        end = start + CHUNK_TOKENS
        args = (head, flat[start:end], targets[start:end], softcap, scale)
        if torch.is_grad_enabled():
            # backward recomputes the chunk's logits instead of keeping them; no randomness
            # in a head and a loss, so no RNG state to save
            part = checkpoint(_chunk_loss_sum, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_loss_sum(*args)
        total = part if total is None else total + part
    # the mean over trained tokens, as cross_entropy's reduction="mean" takes it (NaN for none)
    return total / (targets != IGNORE_INDEX).sum()


def _fused_linear_loss(model: Any, head: Any, hidden: Any, targets: Any) -> Any:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    softcap, scale = _logit_transform(model.config)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
    bias = getattr(head, "bias", None)
    if scale is not None:  # (h W^T + b) s = (h s) W^T + b s: Liger's kernel takes no scale
        flat = flat * scale
        bias = bias * scale if bias is not None else None
    return liger_fused_linear_cross_entropy(
        flat,
        head.weight,
        targets,
        bias,
        ignore_index=IGNORE_INDEX,
        reduction="mean",
        softcap=softcap,
    )
