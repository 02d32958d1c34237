"""The data of `autotune train`, tokenized once per run into a token cache inside --output.

The parent tokenizes it (with progress for large data), checks its token ids against the
model's embedding, and hands the cache directory to the training, in this process or in each
rank of a distributed run, which memory-maps it: nothing tokenizes the data a second time. A
`--resume` of the same data, tokenizer, seq_len and split finds the cache and tokenizes nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from autotune.data.splits import Splits
    from autotune.recipe import Recipe

TOKEN_CACHE_DIR = ".autotune-tokens"
"""The folder in --output that holds the run's token cache (tokens-<key>, as a study's cache
names it); readable by its owner only, since it holds the tokenized training data."""


def tokenize_for_training(
    recipe: Recipe,
    data_path: Path,
    output_dir: Path,
    seed: int,
    eval_rows: int | None,
    usable_rows: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Splits, Path]:
    """The run's splits, memory-mapped from its token cache (built on first use), and the
    cache's directory. Caches of other data or splits in the folder are removed: an output
    keeps the tokens of the run it holds, not of every run it has held."""
    from autotune.data.splits import check_token_ids
    from autotune.data.token_cache import cached_splits
    from autotune.model_spec import load_model_spec
    from autotune.training.build import load_tokenizer

    vocab_size = load_model_spec(recipe.model).vocab_size
    tokenizer = load_tokenizer(recipe.model, vocab_size)
    folder = output_dir / TOKEN_CACHE_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    splits, cache = cached_splits(
        data_path,
        tokenizer,
        recipe.seq_len,
        seed,
        folder,
        eval_rows,
        row_count=usable_rows,
        progress=progress,
    )
    check_token_ids(splits, vocab_size, recipe.model)
    for other in folder.iterdir():
        if other != cache:
            shutil.rmtree(other, ignore_errors=True)
    return splits, cache.resolve()  # ranks find it from their own working directory too


def holds_only_token_cache(output_dir: Path) -> bool:
    """The directory holds nothing, or nothing but the token cache a run made there."""
    return all(entry.name == TOKEN_CACHE_DIR for entry in output_dir.iterdir())
