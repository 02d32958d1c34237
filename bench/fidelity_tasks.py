"""fidelity_bench.py's text: the pretraining corpus (the Python standard library's sources) and
the fine-tuning tasks, made from installed third-party packages' functions, held apart from it.

- `code`: the docstring's first paragraph as the prompt, the function's code without its
  docstring as the answer (default packages numpy, optuna, networkx);
- `summary`: the other way round, with a different shape of answer: the function's code
  without its docstring (its signature and first lines, at most `SUMMARY_PROMPT_CHARS`) as the
  prompt, the docstring's first paragraph (prose, at most `SUMMARY_ANSWER_CHARS`) as the
  answer (default packages sympy and pandas, none of the code task's).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import random
import sysconfig
import textwrap
from pathlib import Path

TASK_PACKAGES = {"code": "numpy,optuna,networkx", "summary": "sympy,pandas"}
"""Each task's default packages: different ones, so the two tasks share no text."""
TASK_SHAPES = {"code": "docstring -> code", "summary": "code -> docstring summary"}
SUMMARY_PROMPT_CHARS = 120
SUMMARY_ANSWER_CHARS = 160
"""The summary task's prompt keeps whole lines up to SUMMARY_PROMPT_CHARS characters and its
answer is at most SUMMARY_ANSWER_CHARS, so that at seq 96 with the bench's 1,024-token BPE
(about 2.2 characters a token) every answer's start is kept."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_texts(max_bytes: int) -> list[str]:
    """The standard library's .py files (tests left out), in path order, up to max_bytes."""
    root = stdlib_root()
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0] or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def documented_functions(source: str, max_body_lines: int = 8) -> list[tuple[str, list[str]]]:
    """(docstring summary, the function's lines without its docstring: signature, then up to
    max_body_lines lines of code) for every function of `source` that has a docstring whose
    first paragraph is 20-300 characters and code after it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or len(node.body) < 2:
            continue
        summary = inspect.cleandoc(docstring).split("\n\n")[0].strip()
        if not 20 <= len(summary) <= 300:
            continue
        header = lines[node.lineno - 1 : node.body[0].lineno - 1]
        end = node.body[0].end_lineno or node.body[0].lineno
        body = lines[end : min(end + max_body_lines, node.end_lineno or end)]
        code_lines = textwrap.dedent("\n".join(header + body)).strip().splitlines()
        if code_lines:
            found.append((summary, code_lines))
    return found


def function_rows(source: str, task: str = "code") -> list[dict]:
    """The task's {"input", "output"} rows from every documented function of `source`."""
    rows = []
    for summary, code_lines in documented_functions(source):
        if task == "code":
            rows.append({"input": summary, "output": "\n".join(code_lines)})
            continue
        if len(summary) > SUMMARY_ANSWER_CHARS:
            continue
        kept: list[str] = []
        for line in code_lines:
            if sum(len(k) + 1 for k in kept) + len(line) > SUMMARY_PROMPT_CHARS:
                break
            kept.append(line)
        # a signature longer than the limit alone tells too little of the function to keep
        if len(kept) >= 2:
            rows.append({"input": "\n".join(kept), "output": summary})
    return rows


def package_sources(package: str, option: str = "--task-packages") -> list[Path]:
    """The package's .py files outside its tests, in path order."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{option}: {package} is not an installed package")
    paths = []
    stdlib = stdlib_root().resolve()
    for root in spec.submodule_search_locations:
        if Path(root).resolve().parent == stdlib:
            raise SystemExit(f"{option}: {package} is in the standard library (the pretraining)")
        paths.extend(p for p in sorted(Path(root).rglob("*.py")) if "tests" not in p.parts)
    return paths


def task_rows(packages: list[str], count: int, seed: int, task: str = "code") -> list[dict]:
    """`count` of the task's rows from the packages' functions, shuffled with `seed`."""
    rows: list[dict] = []
    for package in packages:
        for path in package_sources(package):
            rows.extend(function_rows(path.read_text(encoding="utf-8", errors="replace"), task))
    random.Random(seed).shuffle(rows)
    if len(rows) < count:
        raise SystemExit(f"the packages give {len(rows)} task rows, fewer than {count}")
    return rows[:count]
