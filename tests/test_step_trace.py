"""The CPU trace of a training step's allocations (autotune.step_trace)."""

from __future__ import annotations

from autotune.recipe import Recipe
from autotune.step_trace import allocation_tracer, trace_step


def test_allocation_tracer_follows_storages_from_creation_to_release():
    import torch

    weight = torch.ones(1024)  # 4 KiB that existed before: not counted
    tracer = allocation_tracer([weight])
    with tracer:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[:10]  # no new storage
        b = weight * 2  # 4096 bytes
        del a, view
        c = torch.zeros(250)  # 1000 bytes, after 4000 were released
        weight.add_(1)  # in place: no new storage
    assert tracer.before == 4096
    assert tracer.peak == 4000 + 4096
    assert tracer.now == 4096 + 1000
    assert sorted(t.nbytes for t in tracer.at_peak) == [4000, 4096]
    assert {t.op for t in tracer.at_peak} == {"zeros", "mul"}
    del b, c


def test_a_traced_step_shows_the_loss_buffers_at_the_peak(cut_model):
    """The cross-entropy peak the memory model prices: at the start of backward three fp32
    vocabulary-wide buffers are alive together (log-softmax, its gradient in and out)."""
    recipe = Recipe.from_dict(
        {
            "model": str(cut_model),
            "method": "lora",
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "lora_target_modules": ["q_proj", "v_proj"],
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "gradient_checkpointing": True,
            "seq_len": 128,
        }
    )
    result = trace_step(recipe)
    logits_fp32 = 2 * 128 * 4096 * 4
    top = result.at_peak[:3]
    assert [t.nbytes for t in top] == [logits_fp32] * 3
    assert {t.op for t in top} == {
        "_log_softmax",
        "nll_loss_backward",
        "_log_softmax_backward_data",
    }
    assert result.peak_bytes >= result.before_bytes + 3 * logits_fp32
