"""`python -m autotune ...`: the `autotune` command, where its entry point is not on PATH."""

from __future__ import annotations

from autotune.cli import main

if __name__ == "__main__":
    main()
