"""Regenerate the demo's data and tokenizer (both committed): python demo/make_assets.py.

The data mixes the row formats autotune reads (alpaca, input/output, chat, text) over a few
synthetic tasks; the tokenizer is a small byte-level BPE trained on it, with a ChatML template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Norway": "Oslo",
    "India": "New Delhi",
    "Chile": "Santiago",
    "Spain": "Madrid",
    "Ghana": "Accra",
    "Italy": "Rome",
    "Brazil": "Brasilia",
}
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "silver",
    "forest",
    "candle",
    "planet",
    "bridge",
    "orange",
    "winter",
    "harbor",
    "violet",
    "rocket",
    "meadow",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        word = rng.choice(WORDS)
        return f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}."
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return (
            f"What is the capital of {country}?",
            f"The capital of {country} is {CAPITALS[country]}.",
        )
    words = rng.sample(WORDS, 4)
    return f"Sort these words: {', '.join(words)}.", f"In order: {', '.join(sorted(words))}."


def rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for number in range(count):
        question, answer = task(rng)
        style = number % 4
        if style == 0:
            out.append({"instruction": question, "input": "", "output": answer})
        elif style == 1:
            out.append({"input": question, "output": answer})
        elif style == 2:
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "You answer briefly."},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            out.append({"text": f"Question: {question}\nAnswer: {answer}"})
    return out


def train_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def main() -> None:
    data = rows(240)
    with (HERE / "train.jsonl").open("w", encoding="utf-8") as handle:
        for row in data:
            handle.write(json.dumps(row) + "\n")
    texts = [json.dumps(r) for r in rows(2000, seed=1)]
    train_tokenizer(texts, HERE / "tokenizer")


if __name__ == "__main__":
    main()
