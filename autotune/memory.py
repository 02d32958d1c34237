"""Predict a recipe's peak GPU memory from the model's config alone (no weights, no GPU).

The prediction stands for `torch.cuda.max_memory_reserved()` over a probe plus the CUDA context,
the figure a budget has to bound. It is a sum of named parts so a user can see what dominates.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.host_memory import pinned_host_bytes
from autotune.losses import LOSSES
from autotune.model_spec import ATTENTION_LINEARS, BLOCK_LINEARS, MLP_LINEARS, ModelSpec
from autotune.optimizers import HOST_MIN_ELEMENTS, OPTIMIZERS, PAGED_MIN_ELEMENTS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe

CUDA_CONTEXT_BYTES = 610 * 2**20
"""CUDA context and kernels of torch + cuBLAS on a Hopper card; outside the caching allocator."""

ALLOCATOR_OVERHEAD_FRACTION = 0.01
"""Reserved beyond allocated, part 1: block rounding over everything allocated."""

LOGITS_FRAGMENTATION = 0.9
"""Reserved beyond allocated, part 2, in fp32 logits of one micro-batch: the loss makes several
vocabulary-wide tensors of different sizes and lifetimes that freed blocks cannot all serve,
so the caching allocator reserves new segments for them (measured on H100, with and without
expandable_segments, in bench/results/memory_h100.json)."""

ALLOCATOR_FIXED_BYTES = 300 * 2**20
"""Reserved beyond allocated, part 3: cuBLAS workspaces and the small-block pool, whatever the
model size (what the smallest recipes on H100 show above their allocated peak)."""

ADAPTER_BYTES = 4
"""peft keeps LoRA weights in fp32 (autocast_adapter_dtype) whatever the base dtype."""

UNALLOCATED_PARTS = ("allocator_overhead", "cuda_context")
"""Parts of an estimate that no tensor holds: the caching allocator's reserve beyond what is
allocated, and the CUDA context."""


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int
    breakdown: dict[str, int]
    paged_bytes: int = 0
    """Paged optimizer states in unified memory, outside the peak (see
    optimizers.PAGED_MIN_ELEMENTS)."""
    host_bytes: int = 0
    """Host memory the recipe holds at its peak outside the GPU, per GPU: offloaded activations,
    optimizer states (and, sharded with offload, parameters); budgeted against the machine's RAM,
    not the card's."""

    @property
    def allocated_bytes(self) -> int:
        """The peak less what no tensor holds: what `torch.cuda.max_memory_allocated()` sees."""
        return self.peak_bytes - sum(self.breakdown.get(k, 0) for k in UNALLOCATED_PARTS)

    def as_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "peak_bytes": self.peak_bytes,
            "breakdown": dict(self.breakdown),
        }
        if self.paged_bytes:
            record["paged_bytes"] = self.paged_bytes
        if self.host_bytes:
            record["host_peak_bytes"] = self.host_bytes
        return record


def weight_bytes_per_param(recipe: Recipe) -> int:
    return PRECISIONS[recipe.precision].weight_bytes


def activation_bytes_per_element(recipe: Recipe) -> int:
    """Activations follow the compute dtype, except that a k-bit base prepared for training runs
    its residual stream, norms and layer outputs in fp32 (bitsandbytes returns the input dtype)."""
    return 4 if recipe.quantization != "none" else PRECISIONS[recipe.precision].compute_bytes


def trainable_tensors(spec: ModelSpec, recipe: Recipe) -> list[tuple[int, int]]:
    """(elements, how many) of each kind of tensor that trains: what optimizers size by."""
    if recipe.method == "lora":
        shapes = spec.linear_shapes()
        rank = recipe.lora_r or 0
        tensors = []
        for target in spec.target_linears(recipe.lora_target_modules or "all-linear"):
            fan_in, fan_out = shapes[target]
            tensors += [(rank * fan_in, spec.num_layers), (fan_out * rank, spec.num_layers)]
            if recipe.use_dora:  # DoRA's magnitude: one per output feature
                tensors.append((fan_out, spec.num_layers))
        return tensors
    blocks = spec.num_layers
    head = [(spec.lm_head_params, 1)]
    if recipe.method == "full":
        head.append((spec.embedding_params, 1))
    else:
        blocks = max(spec.num_layers - recipe.frozen_layers, 0)
    modules = _trained_modules(recipe)
    shapes = spec.linear_shapes()
    block = [(a * b, blocks) for name, (a, b) in shapes.items() if name in _linears(modules)]
    if modules != "attention":
        block += [(n, blocks) for n in spec.expert_tensors()]
    if modules == "all":
        block.append((spec.hidden_size, 2 * blocks))
    if spec.attention_bias and modules != "mlp":
        block += [(spec.q_dim, blocks), (spec.kv_dim, 2 * blocks)]
    return [(n, count) for n, count in [*block, *head, (spec.hidden_size, 1)] if n and count]


def _trained_modules(recipe: Recipe) -> str:
    """What trains in a trained block: a freeze recipe's train_modules, else all."""
    return recipe.train_modules if recipe.method == "freeze" else "all"


def _linears(train_modules: str) -> tuple[str, ...]:
    """The block linears whose weights train under a freeze recipe's `train_modules`."""
    return {"attention": ATTENTION_LINEARS, "mlp": MLP_LINEARS}.get(train_modules, BLOCK_LINEARS)


def _trained_linear_params(spec: ModelSpec, recipe: Recipe) -> int:
    """Weights of one trained block's linears (all of them unless freeze trains a part)."""
    linears = _linears(_trained_modules(recipe))
    return sum(a * b for name, (a, b) in spec.linear_shapes().items() if name in linears)


def _head_gradient(spec: ModelSpec, recipe: Recipe, trainable_bytes: int) -> int:
    """The output projection's weight gradient, made at the start of backward while the
    logits' gradient is alive; the tied input embedding's when the head is tied."""
    if recipe.method == "full":
        return spec.vocab_size * spec.hidden_size * trainable_bytes
    if recipe.method == "freeze":
        return spec.lm_head_params * trainable_bytes
    return 0


def _optimizer_states(
    tensors: list[tuple[int, int]], recipe: Recipe, trainable_bytes: int
) -> tuple[int, int, int]:
    """The optimizer's states of the trainable `tensors`: (bytes in the caching allocator,
    bytes paged in unified memory, bytes in host memory). A CPU-offload optimizer keeps a
    pinned host copy of each large tensor and of its gradient, and the states beside them."""
    kind = OPTIMIZERS[recipe.optimizer]
    device = paged = host = 0
    for n, count in tensors:
        size = count * n * kind.state_bytes(n, trainable_bytes)
        if kind.paged and n >= PAGED_MIN_ELEMENTS:
            paged += size
        elif kind.host_states and n >= HOST_MIN_ELEMENTS:
            host += size + count * 2 * pinned_host_bytes(n * trainable_bytes)
        else:
            device += size
    return device, paged, host


def _weights(spec: ModelSpec, recipe: Recipe) -> int:
    linear = spec.num_layers * spec.block_linear_params
    other = spec.total_params - linear
    if recipe.quantization == "none":
        return spec.total_params * weight_bytes_per_param(recipe)
    # k-bit preparation upcasts what is not quantized to fp32, except the routed experts'
    # stacked weights, which keep the dtype they were loaded in (training.build.prepare_kbit_base)
    quantized = linear * QUANTIZATIONS[recipe.quantization].linear_bytes_per_param
    stacked = spec.num_layers * spec.block_stacked_expert_params
    loaded_bytes = PRECISIONS[recipe.precision].compute_bytes
    return int(quantized + 4 * (other - stacked) + loaded_bytes * stacked)


def _row_tokens(recipe: Recipe, seq_len: int) -> int:
    """Tokens one attention row spans: a padding-free row holds the whole micro-batch."""
    return seq_len * (recipe.micro_batch_size if BATCHINGS[recipe.batching].one_row else 1)


def _activations_per_token(spec: ModelSpec, recipe: Recipe, seq_len: int) -> float:
    """Bytes one decoder block keeps for backward, per token, when nothing is recomputed."""
    a = activation_bytes_per_element(recipe)
    h, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    # RMSNorm upcasts to fp32 and keeps that copy for the rsqrt product (two norms per block).
    norms = 2 * 4 * h
    # SDPA keeps q and k after RoPE, v and its output.
    attention = a * (2 * q + 2 * kv)
    # SwiGLU: gate output (for silu), silu(gate) and up output (for their product).
    mlp = 3 * a * i
    if spec.experts:
        # Each of the token's experts (grouped matmuls over token-expert pairs): its copy of
        # the input, the gate/up output, the gated product and the down output; the router's
        # fp32 logits and probabilities.
        pairs = spec.experts_per_token
        mlp += a * pairs * (2 * h + 4 * spec.expert_intermediate_size) + 8 * spec.experts
    span = _row_tokens(recipe, seq_len)
    if ATTENTIONS[recipe.attention].keeps_matrix:
        # The full attention matrix: fp32 softmax kept for backward and its cast for the
        # matmul with v, one row of the span per head and token.
        attention += spec.num_attention_heads * span * (4 + a)
    elif a == 4:
        # SDPA has no fused kernel for fp32 q/k/v with a mask, so it takes the math path and
        # keeps the fp32 softmax: what a k-bit base (fp32 residual stream) pays per token.
        attention += spec.num_attention_heads * span * 4
    # A linear or norm whose weight trains keeps its input for the weight gradient; frozen
    # ones need only the weight to pass the gradient on.
    weight_inputs = 0
    if recipe.method != "lora":
        weight_inputs = {
            "all": a * (2 * h + h + q + h + i),  # the two norms, q/k/v, o, gate/up, down
            "attention": a * (h + q),
            "mlp": a * (h + i),
        }[_trained_modules(recipe)]
    return norms + attention + mlp + weight_inputs


def _lora_activations_per_token(spec: ModelSpec, recipe: Recipe) -> float:
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


def _blocks_with_activations(spec: ModelSpec, recipe: Recipe) -> int:
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
    blocks = _blocks_with_activations(spec, recipe)
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


def estimate(spec: ModelSpec, recipe: Recipe, seq_len: int | None = None) -> MemoryEstimate:
    """Predicted peak reserved memory plus CUDA context of training `recipe` on `spec`; of
    each GPU for a distributed recipe (distributed_memory.py)."""
    seq_len = seq_len or recipe.seq_len
    tokens = recipe.micro_batch_size * seq_len
    a = activation_bytes_per_element(recipe)
    tensors = trainable_tensors(spec, recipe)
    trainable = sum(n * count for n, count in tensors)
    trainable_bytes = ADAPTER_BYTES if recipe.method == "lora" else weight_bytes_per_param(recipe)

    weights = _weights(spec, recipe)
    gradients = trainable * trainable_bytes
    optimizer_states, paged_states, host_states = _optimizer_states(
        tensors, recipe, trainable_bytes
    )
    # autocast caches a bf16 copy of each weight that requires grad for the whole forward;
    # frozen weights (the base under LoRA, frozen blocks) are cast per use and freed.
    trainable_linear = 0
    if recipe.method == "full":
        trainable_linear = spec.num_layers * spec.block_linear_params
    elif recipe.method == "freeze":
        trainable_linear = _blocks_with_activations(spec, recipe) * _trained_linear_params(
            spec, recipe
        )
    amp_copies = 2 * trainable_linear if PRECISIONS[recipe.precision].autocast else 0

    blocks = _blocks_with_activations(spec, recipe)
    per_block_token = _activations_per_token(spec, recipe, seq_len) + _lora_activations_per_token(
        spec, recipe
    )
    residual_bytes = a
    dora_weights = dora_saved_weight_bytes(spec, recipe)  # per block, whatever the tokens
    host = offloaded_bytes(spec, recipe, tokens, per_block_token) + host_states
    if recipe.activation_offload:
        # Saved tensors wait in host memory; backward brings back one node's at a time, and a
        # checkpointed block recomputes its own on the GPU.
        activations = tokens * per_block_token if recipe.gradient_checkpointing else 0.0
        host += 0 if recipe.gradient_checkpointing else blocks * dora_weights
    elif recipe.gradient_checkpointing:
        # Each block keeps only its input; one block at a time is recomputed in backward.
        activations = tokens * (blocks * residual_bytes * spec.hidden_size + per_block_token)
        activations += dora_weights
    else:
        activations = tokens * blocks * per_block_token + blocks * dora_weights
    if BATCHINGS[recipe.batching].masks_rows and not ATTENTIONS[recipe.attention].flash:
        # the block-diagonal masks over the rows (one byte per pair), shared by every block
        activations += tokens * _row_tokens(recipe, seq_len)
    logit_tokens = loss_logit_tokens(spec, recipe, tokens)
    # Logits (fp32 when lm_head was upcast for k-bit training), the fp32 log-softmax the loss
    # keeps for backward, and the fp32 gradient of the logits: of the whole micro-batch, or of
    # one chunk of it for the chunked loss; Liger's fused kernel keeps one chunk's logits and
    # their gradient, and the hidden states' gradient it computes in forward.
    if LOSSES[recipe.loss].fused:
        logits_and_loss = logit_tokens * spec.vocab_size * (a + 4) + tokens * spec.hidden_size * a
    else:
        logits_and_loss = logit_tokens * spec.vocab_size * (a + 8)

    # DoRA's merged weight exists inside one layer's forward (or its recompute), never while
    # the loss's buffers do: the larger of the two counts.
    logits_and_loss = max(logits_and_loss, dora_weight_bytes(spec, recipe))

    # Two moments compete for the peak: the start of backward (activations, logits, gradients
    # kept across accumulation) and the optimizer step (gradients plus foreach temporaries).
    backward_phase = activations + logits_and_loss
    if recipe.gradient_accumulation_steps > 1:
        backward_phase += gradients
    else:
        backward_phase += _head_gradient(spec, recipe, trainable_bytes)
    # AdamW's foreach step makes temporaries as large as the gradients; bitsandbytes' 8-bit
    # optimizers update each tensor in place with a fused kernel.
    step_temporaries = (
        trainable * trainable_bytes if OPTIMIZERS[recipe.optimizer].step_temporaries else 0
    )
    step_phase = gradients + step_temporaries
    parts: dict[str, int] = {
        "weights": weights,
        "optimizer_states": optimizer_states,
        "amp_weight_copies": amp_copies,
    }
    if backward_phase >= step_phase:
        parts["activations"] = int(activations)
        parts["logits_and_loss"] = int(logits_and_loss)
        parts["gradients"] = int(backward_phase - activations - logits_and_loss)
    else:
        parts["gradients"] = gradients
        parts["optimizer_step_temporaries"] = step_temporaries
    allocated = sum(parts.values())
    parts["allocator_overhead"] = int(
        ALLOCATOR_FIXED_BYTES
        + allocated * ALLOCATOR_OVERHEAD_FRACTION
        + LOGITS_FRAGMENTATION * logit_tokens * spec.vocab_size * 4
    )
    parts["cuda_context"] = CUDA_CONTEXT_BYTES
    single = MemoryEstimate(
        peak_bytes=int(sum(parts.values())),
        breakdown=parts,
        paged_bytes=paged_states,
        host_bytes=host,
    )
    if recipe.num_gpus == 1:
        return single
    from autotune.distributed_memory import per_gpu_estimate

    return per_gpu_estimate(spec, recipe, single, trainable, trainable_bytes)
