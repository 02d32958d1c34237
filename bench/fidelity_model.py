"""fidelity_bench.py's pretrained model: its Llama-architecture configs (`--model-size`,
`--toy`), a byte-level BPE tokenizer trained on the pretraining text, and the pretraining
itself, cached in its directory once done.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

PRETRAIN_CONFIG = {
    "model_type": "llama",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
MODEL_SIZES = {
    "small": {},
    "bigger": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
"""--model-size: changes to PRETRAIN_CONFIG (bigger: 2.9M parameters), each its own cache."""
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}  # nf4 blocks: 64
TOY_HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 384}


def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(out_dir)


def pretrain(out_dir: Path, config: dict, texts: list[str], steps: int, seq_len: int) -> dict:
    """Build the tokenizer and pretrain the model on `texts`; cached in out_dir."""
    done = out_dir / "pretraining.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(texts, out_dir, config["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [eos])
    tokens = torch.tensor(ids, dtype=torch.long)
    values = dict(config)
    model_type = values.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            model_type, bos_token_id=None, eos_token_id=eos, pad_token_id=eos, **values
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - max(0, s - warmup) / steps),
    )
    generator = torch.Generator().manual_seed(0)
    batch_rows, losses = 16, []
    for step in range(steps):
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_rows,), generator=generator)
        batch = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps - 1:
            print(f"pretrain step {step + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model.save_pretrained(out_dir)
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_in_corpus": len(ids),
        "steps": steps,
        "tokens_trained": steps * batch_rows * seq_len,
        "final_loss": statistics.mean(losses[-20:]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    done.write_text(json.dumps(record), encoding="utf-8")
    return record
