"""Shared fixtures: a tiny random model built from the demo config, and tiny data."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
SHAPE_CONFIGS = ROOT / "bench" / "configs"
"""Real models' config.json files (qwen2-0.5b.json, llama-3.2-1b.json, ...), as data."""
QUICK_CPU_RUN = [
    "--space",
    str(ROOT / "autotune" / "search_spaces" / "demo.yaml"),
    "--probe-steps",
    "2",
    "--seq-len",
    "48",
    "--device",
    "cpu",
    "--confirm",
    "0",
]
"""`autotune run` options that keep a study of the tiny model quick on the CPU."""


def load_bench(name: str):
    """A module of bench/ (not a package), loaded by path."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", "").startswith(
        str(ROOT / "bench")
    ):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cut_model(tmp_path_factory) -> Path:
    """Qwen2-0.5B's architecture cut to CPU widths, saved."""
    from autotune.random_model import CPU_WIDTHS, build_random_model, cut_config

    config = cut_config(SHAPE_CONFIGS / "qwen2-0.5b.json", **CPU_WIDTHS, seq_len=128)
    return build_random_model(config, tmp_path_factory.mktemp("cut") / "model")


def cut_step(cut_model: Path, **fields):
    """A step of two 128-token sequences on the cut model, eager attention, no accumulation."""
    from autotune.recipe import Recipe

    return Recipe.from_dict(
        {
            "model": str(cut_model),
            "attention": "eager",
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "seq_len": 128,
            **fields,
        }
    )


@pytest.fixture()
def padded_lora_step(cut_model):
    """(recipe, config): a LoRA step on the cut model whose micro-batches may be padded (SDPA
    attention, which keeps the padding mask), and the model's config as the replay reads it."""
    from autotune.replay import load_config

    recipe = cut_step(
        cut_model,
        method="lora",
        lora_r=8,
        lora_dropout=0.0,
        attention="sdpa",
        gradient_checkpointing=False,
    )
    return recipe, load_config(str(cut_model))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


FAILURES_AT_ONCE_ENV = "AUTOTUNE_TEST_FAILURES_AT_ONCE"
"""Set (bench/gpu_session.sh sets it), each failure's traceback is written to stderr as it
happens: a run a time limit cuts short keeps the failures it met, where pytest's own summary
comes only at the end."""


def pytest_runtest_logreport(report):
    if report.failed and os.environ.get(FAILURES_AT_ONCE_ENV):
        sys.stderr.write(f"\n== {report.nodeid} failed ({report.when})\n{report.longreprtext}\n")
        sys.stderr.flush()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer, width-64 Qwen2-shaped model with random weights and the demo tokenizer."""
    from autotune.random_model import build_random_model

    return build_random_model(
        DEMO / "config.json", tmp_path_factory.mktemp("models") / "tiny-qwen2", DEMO / "tokenizer"
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def autotune_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The `autotune` command run in this process (cli.main, as the entry point runs it): its
    exit code, stdout and stderr."""
    from autotune import cli

    monkeypatch.setattr(sys, "argv", ["autotune", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_code:
        code = int(exit_code.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused_before_tokenizing(model: Path, data: Path, refusal: str) -> None:
    """autotune.api.run of `model` on `data` is refused (a UsageError that matches `refusal`)
    before the data is tokenized: no progress of the tokenizing was said."""
    from autotune.api import run
    from autotune.errors import UsageError

    told: list[tuple[int, int]] = []
    with pytest.raises(UsageError, match=refusal):
        run(
            model=str(model),
            data_path=data,
            budget_bytes=4 << 30,
            tokenize_progress=lambda done, rows: told.append((done, rows)),
        )
    assert told == []


@pytest.fixture()
def qa_data(tmp_path) -> Path:
    """40 question/answer rows that are not the demo file."""
    rows = [
        {"input": f"Add {a} and {a + 3}.", "output": f"The sum is {2 * a + 3}."} for a in range(30)
    ] + [{"text": f"Counting: {' '.join(str(i) for i in range(n))}."} for n in range(3, 13)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def stop_state() -> dict:
    """This process's Ctrl-C and termination handling: the signals' handlers, whether this
    thread blocks them, and the probe stop and termination a stopped run records."""
    import signal

    from autotune import probe_stop

    numbers = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    return {
        **{number.name: signal.getsignal(number) for number in numbers},
        "blocked": set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(numbers),
        "STOP_PROBES": probe_stop.STOP_PROBES.is_set(),
        "TERMINATED_BY": list(probe_stop.TERMINATED_BY),
    }


@pytest.fixture(autouse=True)
def stop_state_left_as_found():
    """Each test leaves this process's Ctrl-C handling as it found it: a run's Ctrl-C handling
    stands aside where SIGINT is handled otherwise, and a stop left set stops the next probe,
    so a change would fail a later test that did nothing wrong; this fails the one that made
    it."""
    before = stop_state()
    yield
    changed = {key: value for key, value in stop_state().items() if before[key] != value}
    assert not changed, f"the test left this process's stop handling changed: {changed}"
