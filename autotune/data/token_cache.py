"""The token cache: tokenized splits saved once per data, tokenizer and split, then memory-mapped
by every probe."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune.data.splits import Splits, load_splits
from autotune.data.tokens import TokenTable

TOKEN_CACHE_VERSION = 4
"""4: chat rows end with their template's end of turn, not an appended eos token, and a template
that writes the bos token has it once."""


def _file_digest(path: Path, named: bool = False) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        # a directory's layout is part of its content; a single file's name is not (a renamed
        # or moved copy is the same data), but its suffix says how it is read
        name = file.name if named else file.suffix
        digest.update(str(file.relative_to(path) if path.is_dir() else name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes whenever the tokens a text becomes could change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    parts = [
        vocabulary,
        str(getattr(tokenizer, "chat_template", "")),
        str(tokenizer.eos_token_id),
        str(tokenizer.bos_token_id),
        str(getattr(tokenizer, "add_bos_token", False)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def token_cache_key(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    eval_rows: int | None = None,
    version: int = TOKEN_CACHE_VERSION,
) -> str:
    """One key per (data content, tokenizer, seq_len, split seed and size). Version 2 keyed a
    single file by its name too: kept to recognise the data of studies made then."""
    digest = _file_digest(Path(path), named=version < 3)
    text = f"{version}:{digest}:{tokenizer_fingerprint(tokenizer)}"
    return hashlib.sha256(f"{text}:{seq_len}:{seed}:{eval_rows}".encode()).hexdigest()[:24]


TABLE_FILES = ("ids", "labels", "offsets")


def load_token_cache(cache_dir: str | Path) -> Splits:
    """The splits of a token cache directory, memory-mapped: pages are shared between probes."""
    import numpy as np

    cache_dir = Path(cache_dir)

    def table(name: str) -> TokenTable:
        return TokenTable(
            *(np.load(cache_dir / f"{name}_{part}.npy", mmap_mode="r") for part in TABLE_FILES)
        )

    return Splits(train=table("train"), eval=table("eval"))


def cached_splits(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    cache_dir: str | Path,
    eval_rows: int | None = None,
    row_count: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Splits, Path]:
    """Tokenized splits from the on-disk cache, building it on first use (atomically)."""
    import shutil

    import numpy as np

    key = token_cache_key(path, tokenizer, seq_len, seed, eval_rows)
    cache = Path(cache_dir) / f"tokens-{key}"
    if not cache.is_dir():
        splits = load_splits(path, tokenizer, seq_len, seed, eval_rows, row_count, progress)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for name, table in (("train", splits.train), ("eval", splits.eval)):
                for part in TABLE_FILES:
                    np.save(partial / f"{name}_{part}.npy", getattr(table, part))
        except BaseException:  # a full disk, Ctrl-C: no half-written copy stays to fill it
            shutil.rmtree(partial, ignore_errors=True)
            raise
        try:
            partial.rename(cache)
        except OSError:  # another worker finished the same cache first
            shutil.rmtree(partial, ignore_errors=True)
    return load_token_cache(cache), cache
