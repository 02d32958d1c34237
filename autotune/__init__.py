"""autotune: find the fastest way to fine-tune a causal LM within the GPU memory you have.

Heavy libraries (torch, transformers, optuna, plotly) are imported where they are used, so that
importing this package and `autotune --help` stay instant.
"""

from __future__ import annotations

__version__ = "0.1.0"
