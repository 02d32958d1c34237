"""The CPU trace of a training step's allocations (autotune.step_trace)."""

from __future__ import annotations

import pytest

from autotune.recipe import Recipe
from autotune.step_trace import allocation_tracer, trace_step
from autotune.tied_gradients import tied_gradient_shapes


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


@pytest.mark.parametrize("cast", [True, False])
def test_the_tracer_sums_a_tied_weights_gradients_where_autograd_does(cast):
    """An embedding tied to the head gets two gradients, which autograd sums before the weight
    takes them: in place into the head's when that one is a fresh tensor (cast back from bf16,
    as under AMP), out of place when it is a view (the transposed product of a same-dtype head).
    A dispatch mode made every sum out of place, one more block the real step never holds; the
    tracer sums where autograd does without it."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(256, 16)
            self.head = torch.nn.Linear(16, 256, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            weight = self.head.weight.to(torch.bfloat16) if cast else self.head.weight
            return F.linear(self.embed(ids).to(weight.dtype) * 2, weight).float().sum()

    model = Tied()
    ids = torch.zeros(2, 3, dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU]) as untraced:
        model(ids).backward()
    sums = {event.name for event in untraced.events()} & {"aten::add", "aten::add_"}
    assert sums == ({"aten::add_"} if cast else {"aten::add"})
    expected = model.embed.weight.grad
    model.embed.weight.grad = None
    tracer = allocation_tracer([model.embed.weight], tied_gradient_shapes(model))
    with tracer:
        model(ids).backward()
    assert torch.equal(model.embed.weight.grad, expected)
    gradient = 256 * 16 * 4
    held = [t.op for t in tracer.at_peak if t.nbytes == gradient]
    assert held.count("add") == (0 if cast else 1)
    assert len(held) == (2 if cast else 3)
