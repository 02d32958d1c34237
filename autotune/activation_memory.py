"""What a micro-batch's activations cost in the formula memory model (memory.py).

Per decoder block and token, what the forward saves for backward (LoRA's and DoRA's adapters
included), the blocks that keep it, the logits the loss holds at once, and the host memory that
activation offload fills with the saved tensors.
"""

from __future__ import annotations

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.host_memory import pinned_host_bytes
from autotune.losses import LOSSES
from autotune.model_spec import ModelSpec
from autotune.precisions import PRECISIONS
from autotune.recipe import Recipe

ADAPTER_BYTES = 4
"""peft keeps LoRA weights in fp32 (autocast_adapter_dtype) whatever the base dtype."""


def activation_bytes_per_element(recipe: Recipe) -> int:
    """Activations follow the compute dtype, except that a k-bit base prepared for training runs
    its residual stream, norms and layer outputs in fp32 (bitsandbytes returns the input dtype)."""
    return 4 if recipe.quantization != "none" else PRECISIONS[recipe.precision].compute_bytes


def trained_modules(recipe: Recipe) -> str:
    """What trains in a trained block: a freeze recipe's train_modules, else all."""
    return recipe.train_modules if recipe.method == "freeze" else "all"


def row_tokens(recipe: Recipe, seq_len: int) -> int:
    """Tokens one attention row spans: a padding-free row holds the whole micro-batch."""
    return seq_len * (recipe.micro_batch_size if BATCHINGS[recipe.batching].one_row else 1)


def attention_masked(recipe: Recipe, padded: bool = False) -> bool:
    """Attention gets a mask: rows of several sequences (block-diagonal), or, with `padded`,
    padded rows beside full-length ones; flash attention 2 takes the rows' bounds instead."""
    batching = BATCHINGS[recipe.batching]
    size = recipe.micro_batch_size
    masked = batching.masks(size) or (padded and batching.pads(size))
    return masked and not ATTENTIONS[recipe.attention].flash


def activations_per_token(
    spec: ModelSpec, recipe: Recipe, seq_len: int, padded: bool = False
) -> float:
    """Bytes one decoder block keeps for backward, per token, when nothing is recomputed;
    `padded`: micro-batches of rows of different lengths (attention_masked)."""
    a = activation_bytes_per_element(recipe)
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    # RMSNorm upcasts to fp32 and keeps that copy for the rsqrt product (two norms per block).
    norms = 2 * 4 * h
    # SDPA keeps q and k after RoPE, v and its output; under a mask transformers repeats
    # grouped key heads (SDPA's enable_gqa only runs without one), so it keeps the repeated k, v
    masked = attention_masked(recipe, padded)
    keys = q if masked and not ATTENTIONS[recipe.attention].keeps_matrix else kv
    attention = a * (2 * q + 2 * keys)
    # SwiGLU: gate output (for silu), silu(gate) and up output (for their product).
    mlp = 3 * a * i
    if spec.experts:
        # Each of the token's experts (grouped matmuls over token-expert pairs): its copy of
        # the input, the gate/up output, the gated product and the down output; the router's
        # fp32 logits and probabilities.
        pairs = spec.experts_per_token
        mlp += a * pairs * (2 * h + 4 * spec.expert_intermediate_size) + 8 * spec.experts
    span = row_tokens(recipe, seq_len)
    if ATTENTIONS[recipe.attention].keeps_matrix:
        # The full attention matrix: fp32 softmax kept for backward and its cast for the
        # matmul with v, one row of the span per head and token.
        attention += spec.num_attention_heads * span * (4 + a)
    elif a == 4:
        # SDPA has no fused kernel for fp32 q/k/v with a mask, so it takes the math path and
        # keeps the fp32 softmax: what a k-bit base (fp32 residual stream) pays per token.
        attention += spec.num_attention_heads * span * 4
    elif masked:
        # torch makes the block-diagonal (or padding) mask additive, in q's dtype, at each call
        # (each block), and the memory-efficient kernel keeps that for backward
        attention += span * a
    # A linear or norm whose weight trains keeps its input for the weight gradient; frozen
    # ones need only the weight to pass the gradient on.
    weight_inputs = 0
    if recipe.method != "lora":
        weight_inputs = {
            "all": a * (2 * h + h + q + h + i),  # the two norms, q/k/v, o, gate/up, down
            "attention": a * (h + q),
            "mlp": a * (h + i),
        }[trained_modules(recipe)]
    return norms + attention + mlp + weight_inputs


def lora_activations_per_token(spec: ModelSpec, recipe: Recipe) -> float:
    """Adapters keep an fp32 copy of their input (after dropout, plus its mask) and x @ A."""
    if recipe.method != "lora":
        return 0.0
    shapes = spec.linear_shapes()
    dropout_mask = 1 if (recipe.lora_dropout or 0) > 0 else 0
    rank = recipe.lora_r or 0
    # DoRA's rescaling multiplies the base output and the adapter's (fp32) by the magnitude,
    # which trains, so both are kept
    dora = activation_bytes_per_element(recipe) + ADAPTER_BYTES if recipe.use_dora else 0
    return sum(
        shapes[t][0] * (ADAPTER_BYTES + dropout_mask) + ADAPTER_BYTES * rank + shapes[t][1] * dora
        for t in spec.target_linears(recipe.lora_target_modules or "all-linear")
    )


def dora_weight_bytes(spec: ModelSpec, recipe: Recipe) -> int:
    """What DoRA's forward makes for its largest adapted linear and frees after it (peft's
    dora.py): the adapter's product BA through an fp32 identity as wide as the input (kept with
    its graph until the layer returns), the base weight cast to the adapter's fp32 (after
    dequantizing a k-bit one), and W + scaling * BA for the column norms."""
    if recipe.method != "lora" or not recipe.use_dora:
        return 0
    shapes = spec.linear_shapes()
    rank = recipe.lora_r or 0
    cast = 0 if PRECISIONS[recipe.precision].weight_bytes == 4 else 4  # an fp32 base is used as is
    if recipe.quantization != "none":
        cast = 4 + PRECISIONS[recipe.precision].compute_bytes  # dequantized, then cast
    return max(
        ADAPTER_BYTES * (fan_in * fan_in + fan_in * rank + 3 * fan_in * fan_out)
        + cast * fan_in * fan_out
        for fan_in, fan_out in (
            shapes[t] for t in spec.target_linears(recipe.lora_target_modules or "all-linear")
        )
    )


def dora_saved_weight_bytes(spec: ModelSpec, recipe: Recipe) -> int:
    """What DoRA keeps per block when the adapter has dropout: peft then recomputes the base
    output from the dropped-out input with the fp32 (cast or dequantized) base weight, which
    that linear saves for backward: every adapted weight of the block in fp32."""
    if recipe.method != "lora" or not recipe.use_dora or not (recipe.lora_dropout or 0) > 0:
        return 0
    shapes = spec.linear_shapes()
    targets = spec.target_linears(recipe.lora_target_modules or "all-linear")
    return ADAPTER_BYTES * sum(shapes[t][0] * shapes[t][1] for t in targets)


def blocks_with_activations(spec: ModelSpec, recipe: Recipe) -> int:
    """Blocks below the first trainable one need no activations: nothing flows back to them."""
    if recipe.method == "freeze":
        return max(spec.num_layers - recipe.frozen_layers, 0)
    return spec.num_layers


def loss_logit_tokens(spec: ModelSpec, recipe: Recipe, tokens: int) -> int:
    """Tokens whose vocabulary-wide logits the loss holds at once: the micro-batch's `tokens`
    for the standard loss, one chunk for the chunked one (training.loss.CHUNK_TOKENS), and for
    Liger's fused kernel its own chunk, sized so that the chunk's logits are about as large as
    the micro-batch's hidden states (a power of two of tokens)."""
    from autotune.training.loss import CHUNK_TOKENS

    kind = LOSSES[recipe.loss]
    if kind.chunked:
        return min(tokens, CHUNK_TOKENS)
    if kind.fused:
        chunks = -(-spec.vocab_size // spec.hidden_size)
        return min(tokens, 1 << max(-(-tokens // chunks) - 1, 0).bit_length())
    return tokens


OFFLOAD_ROUNDING = 1.75
"""Host bytes per saved byte when a block's many saved tensors go to pinned host blocks, each
rounded up to a power of two (fitted to the replay's count on Qwen2-0.5B and -7B shapes)."""


def offloaded_bytes(spec: ModelSpec, recipe: Recipe, tokens: int, per_block_token: float) -> int:
    """Host memory activation offload fills (training.offload): every tensor the forward saves
    for backward, each saved reference copied apart; with checkpointing, each block's input."""
    if not recipe.activation_offload:
        return 0
    a = activation_bytes_per_element(recipe)
    blocks = blocks_with_activations(spec, recipe)
    if recipe.gradient_checkpointing:
        saved = blocks * pinned_host_bytes(tokens * spec.hidden_size * a)
    else:
        saved = int(blocks * tokens * per_block_token * OFFLOAD_ROUNDING)
    kind = LOSSES[recipe.loss]
    if kind.chunked or kind.fused:
        # the hidden states the loss takes
        saved += pinned_host_bytes(tokens * spec.hidden_size * a)
    else:
        # log_softmax and nll_loss each save the fp32 log-probabilities: two host copies
        saved += 2 * pinned_host_bytes(tokens * spec.vocab_size * 4)
    return saved
