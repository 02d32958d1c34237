"""What the `autotune` command a user started says when it is stopped or fails: shared by the
commands (cli, cli_train), which set it, and cli.main, which prints it."""

from __future__ import annotations

from typing import Any

STATE: dict[str, Any] = dict(debug=False, interrupted="autotune: interrupted", kept="", storage="")
"""--debug, what Ctrl-C (or a full disk, a lost storage: "kept") leaves behind in the words of
the command it stopped, and the storage URL whose secrets its errors must not show."""
