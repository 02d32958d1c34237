"""--budget as a size, a card's name or auto (NVML, mocked here: the tests run without a GPU)."""

from __future__ import annotations

import sys
import types

import pytest

from autotune.budgets import (
    AUTO_STEP_BYTES,
    BUDGET_MARGIN,
    CARD_MEMORY_BYTES,
    parse_budget,
    resolve_budget,
)
from autotune.errors import UsageError
from autotune.options import settings_from_options
from autotune.units import format_bytes

GiB = 2**30


def fake_nvml(total: int, free: int, gpus: int = 1, fails: str | None = None) -> types.ModuleType:
    """A pynvml with `gpus` cards of `total` bytes, `free` of them free; `fails`: nvmlInit
    raises that, as it does without a driver."""
    module = types.ModuleType("pynvml")
    module.calls = []  # type: ignore[attr-defined]

    def init() -> None:
        if fails:
            raise RuntimeError(fails)

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: gpus  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: module.calls.append(i) or i  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=total, free=free, used=total - free
    )
    module.nvmlDeviceGetName = lambda h: b"NVIDIA Test Card"  # type: ignore[attr-defined]
    return module


def test_a_card_name_is_its_memory_less_the_margin():
    for name, memory in CARD_MEMORY_BYTES.items():
        budget = resolve_budget(name.upper())
        assert budget.bytes == int(memory * (1 - BUDGET_MARGIN))
        assert budget.note.startswith(f"budget {format_bytes(budget.bytes)}: {name}'s")
    assert parse_budget("l4") < parse_budget("rtx4090") < 24 * GiB < parse_budget("a100-40gb")
    assert resolve_budget("24GB") == (24 * 10**9, "")  # sizes read as before
    with pytest.raises(UsageError, match=r"is not a size.*or name a card \(t4, .*rtx4090"):
        resolve_budget("rtx9999")
    settings = settings_from_options(
        {"model": "m", "data_path": "d.jsonl", "budget_bytes": "h100-80gb"}
    )
    assert settings.budget_bytes == int(81559 * 2**20 * (1 - BUDGET_MARGIN))


def test_auto_reads_the_free_memory_of_the_probes_gpu(monkeypatch):
    total, free = 24 * GiB, 20 * GiB + 12345
    nvml = fake_nvml(total, free, gpus=2)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    budget = resolve_budget("auto")
    expected = int(free - BUDGET_MARGIN * total)
    assert budget.bytes == expected - expected % AUTO_STEP_BYTES
    assert free - BUDGET_MARGIN * total - AUTO_STEP_BYTES < budget.bytes < free
    assert nvml.calls == [1]  # the first GPU the probes will see
    assert "GPU 1 (NVIDIA Test Card)" in budget.note and format_bytes(free) in budget.note
    assert resolve_budget("auto", gpu="0").bytes == budget.bytes and nvml.calls[-1] == 0
    with pytest.raises(UsageError, match="no GPU 5"):
        resolve_budget("auto", gpu="5")
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(total, GiB // 2))
    with pytest.raises(UsageError, match="too little to train in"):
        resolve_budget("auto", gpu="0")


def test_auto_without_a_gpu_is_one_line_and_exit_two(monkeypatch, capsys, tmp_path):
    from autotune import cli

    monkeypatch.setitem(
        sys.modules, "pynvml", fake_nvml(0, 0, fails="NVML Shared Library Not Found")
    )
    monkeypatch.setattr(sys, "argv", ["autotune", "run", "-m", "m", "-d", "d.jsonl", "-b", "auto"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autotune: error: --budget auto needs an NVIDIA")

    # with a GPU, the run says what auto chose before it goes on (here to a missing data file)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(24 * GiB, 23 * GiB))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    missing = str(tmp_path / "missing.jsonl")
    monkeypatch.setattr(sys, "argv", ["autotune", "run", "-m", "m", "-d", missing, "-b", "auto"])
    with pytest.raises(SystemExit):
        cli.main()
    out = capsys.readouterr().out
    assert out.startswith("budget ") and "GPU 0 (NVIDIA Test Card) has 23.00 GiB free" in out


def test_a_budget_with_its_unit_left_out_or_mistaken_is_refused():
    """`--budget 24` was 24 bytes ("budget 0.0 KiB is below ..."), `--budget 24TB` a study
    held to 22351.74 GiB a GPU, and a budget past C's long ended the run in a traceback."""
    for text, words in [
        ("24", "budget '24' has no unit, which makes it 24 bytes; write the unit, e.g. 24GB"),
        ("24TB", "budget '24TB' is 22351.74 GiB, over the 1024.00 GiB autotune takes"),
        ("9" * 24 + "GB", "over the 1024.00 GiB autotune takes for one GPU"),
    ]:
        with pytest.raises(UsageError) as error:
            parse_budget(text)
        assert words in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert parse_budget("1TiB") == 2**40 and parse_budget(str(2**20)) == 2**20
    # the run's own round trip of a budget under a MiB (1MB) keeps it
    options = {"model": "m", "data_path": "d.jsonl", "budget_bytes": resolve_budget("1MB").bytes}
    assert settings_from_options(options).budget_bytes == 10**6
    with pytest.raises(UsageError, match=r"^--host-budget '64' has no unit"):
        settings_from_options({**options, "host_budget_bytes": "64"})
    with pytest.raises(UsageError, match=r"^--host-budget 'lots' is not a size"):
        settings_from_options({**options, "host_budget_bytes": "lots"})
