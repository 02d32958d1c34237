"""Predict a recipe's peak GPU memory from the model's config alone (no weights, no GPU).

The prediction stands for `torch.cuda.max_memory_reserved()` over a probe plus the CUDA context,
the figure a budget has to bound. It is a sum of named parts so a user can see what dominates.
What the activations take is priced in activation_memory.py; what a distributed recipe changes,
in distributed_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.activation_memory import (
    ADAPTER_BYTES,
    activation_bytes_per_element,
    activations_per_token,
    attention_masked,
    blocks_with_activations,
    dora_saved_weight_bytes,
    dora_weight_bytes,
    lora_activations_per_token,
    loss_logit_tokens,
    offloaded_bytes,
    row_tokens,
    trained_modules,
)
from autotune.host_memory import pinned_host_bytes
from autotune.losses import LOSSES
from autotune.model_spec import ATTENTION_LINEARS, BLOCK_LINEARS, MLP_LINEARS, ModelSpec
from autotune.optimizers import HOST_MIN_ELEMENTS, OPTIMIZERS, PAGED_MIN_ELEMENTS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe

CUDA_CONTEXT_BYTES = 610 * 2**20
"""CUDA context and kernels of torch + cuBLAS on a Hopper card; outside the caching allocator."""

CUBLAS_WORKSPACE_BYTES = 32 * 2**20
"""cuBLAS workspace per handle on Hopper (torch's default `:4096:8`), from the caching allocator:
one for the forward's thread, one for backward's (the `cublas_workspaces` part)."""

ALLOCATOR_OVERHEAD_FRACTION = 0.01
"""Reserved beyond allocated, part 1: block rounding over everything allocated."""

LOGITS_FRAGMENTATION = 0.9
"""Reserved beyond allocated, part 2, in fp32 logits of one micro-batch: the loss makes several
vocabulary-wide tensors of different sizes and lifetimes that freed blocks cannot all serve,
so the caching allocator reserves new segments for them (measured on H100, with and without
expandable_segments, in bench/results/memory_h100.json)."""

ALLOCATOR_FIXED_BYTES = 300 * 2**20 - 2 * CUBLAS_WORKSPACE_BYTES
"""Reserved beyond allocated, part 3: the small-block pool, whatever the model size. What the
smallest recipes on H100 show above the formula's tensors is 300 MiB, the two cuBLAS workspaces
(allocated, their own part of the breakdown) among it."""

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
    def cuda_context_bytes(self) -> int:
        """The CUDA context's part of the peak (none where the breakdown names none)."""
        return self.breakdown.get("cuda_context", 0)

    @property
    def allocated_bytes(self) -> int:
        """The peak less what no tensor holds: what `torch.cuda.max_memory_allocated()` sees."""
        return self.peak_bytes - sum(self.breakdown.get(k, 0) for k in UNALLOCATED_PARTS)

    @property
    def allocated_without_cublas_bytes(self) -> int:
        """The allocated peak less cuBLAS's workspaces: what a step on the CPU, which has no
        cuBLAS, allocates (the benchmarks' traces)."""
        return self.allocated_bytes - self.breakdown.get("cublas_workspaces", 0)

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
    modules = trained_modules(recipe)
    shapes = spec.linear_shapes()
    block = [(a * b, blocks) for name, (a, b) in shapes.items() if name in _linears(modules)]
    if modules != "attention":
        block += [(n, blocks) for n in spec.expert_tensors()]
    if modules == "all":
        block.append((spec.hidden_size, 2 * blocks))
    if spec.attention_bias and modules != "mlp":
        block += [(spec.q_dim, blocks), (spec.kv_dim, 2 * blocks)]
    return [(n, count) for n, count in [*block, *head, (spec.hidden_size, 1)] if n and count]


def _linears(train_modules: str) -> tuple[str, ...]:
    """The block linears whose weights train under a freeze recipe's `train_modules`."""
    return {"attention": ATTENTION_LINEARS, "mlp": MLP_LINEARS}.get(train_modules, BLOCK_LINEARS)


def _trained_linear_params(spec: ModelSpec, recipe: Recipe) -> int:
    """Weights of one trained block's linears (all of them unless freeze trains a part)."""
    linears = _linears(trained_modules(recipe))
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


def estimate(
    spec: ModelSpec, recipe: Recipe, seq_len: int | None = None, padded: bool = False
) -> MemoryEstimate:
    """Predicted peak reserved memory plus CUDA context of training `recipe` on `spec`; of
    each GPU for a distributed recipe (distributed_memory.py). `padded`: its micro-batches
    hold rows shorter than the longest (attention_masked)."""
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
        trainable_linear = blocks_with_activations(spec, recipe) * _trained_linear_params(
            spec, recipe
        )
    amp_copies = 2 * trainable_linear if PRECISIONS[recipe.precision].autocast else 0

    blocks = blocks_with_activations(spec, recipe)
    per_block_token = activations_per_token(
        spec, recipe, seq_len, padded
    ) + lora_activations_per_token(spec, recipe)
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
    if attention_masked(recipe, padded):
        # the rows' masks (one byte per pair), shared by every block
        activations += tokens * row_tokens(recipe, seq_len)
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
    allocated = sum(parts.values())  # tensors, which round to blocks; a workspace is one block
    parts["cublas_workspaces"] = 2 * CUBLAS_WORKSPACE_BYTES
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
