"""The figures the documentation states are the committed results': each is formatted here from
the file that holds it (bench/results/*.json, autotune/memory_margins.json, the code's tables)
and has to appear in the doc as written, so a rescore, a new margin table or a changed card that
the docs do not follow fails here. And each `python bench/SCRIPT.py --option` the docs give
names a script there is and an option it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_docs import DOC_FILES, README, code_segments

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MEMORY_MODEL = ROOT / "docs" / "memory-model.md"
BENCH_README = ROOT / "bench" / "README.md"


def words(path: Path) -> str:
    """The doc's text with every run of whitespace one space, as a sentence reads across lines."""
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))


def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def pct(share: float, digits: int = 1, sign: bool = False) -> str:
    return f"{100 * share:{'+' if sign else ''}.{digits}f}%"


def missing(path: Path, phrases: list[str]) -> list[str]:
    text = words(path)
    return [phrase for phrase in phrases if phrase not in text]


def test_the_margin_figures_are_the_shipped_table() -> None:
    table = json.loads((ROOT / "autotune" / "memory_margins.json").read_text(encoding="utf-8"))
    replay, formula = table["margins"]["replay"], table["margins"]["formula"]
    phrases = [
        f"replay {pct(replay['none']['fraction'])} (unquantized bases, "
        f"{replay['none']['rows']} rows)",
        f"{pct(replay['nf4']['fraction'])} (NF4, {replay['nf4']['rows']} rows",
        f"{pct(replay['int8']['fraction'])} (int8, {replay['int8']['rows']} rows",
        f"its worst {pct(replay['int8']['worst_under_prediction'])}",
        f"formula {pct(formula['none']['fraction'])} (unquantized), "
        f"{pct(formula['nf4']['fraction'])} (NF4), {pct(formula['int8']['fraction'])} (int8)",
    ]
    assert missing(MEMORY_MODEL, phrases) == []


def test_the_h100_accuracy_figures_are_the_rescored_file() -> None:
    record = result("memory_replay_h100.json")
    summary, rows = record["summary"], record["rows"]
    replay, formula = summary["replay"]["all"], summary["formula_all"]
    within = sum(abs(r["replay_error"]) <= 0.022 for r in rows)
    allocated = [r["replay_allocated_error"] for r in rows if "replay_allocated_error" in r]
    allocated_within = sum(abs(e) <= 0.002 for e in allocated)
    fitted, held_out = summary["calibration"], summary["holdout"]
    shared = [
        f"{len(rows)} peaks",
        f"median error {pct(replay['median_abs_error'], 2)}, {within} of {len(rows)} within 2.2%",
    ]
    assert missing(MEMORY_MODEL, shared) == []
    assert missing(BENCH_README, shared) == []
    assert (
        missing(
            MEMORY_MODEL,
            [
                f"the formula alone: median {pct(formula['median_abs_error'])}, largest "
                f"{pct(formula['max_abs_error'])}",
                f"{allocated_within} of the {len(allocated)} rows with an allocated peak are "
                "within 0.2%",
                f"fitted to {fitted['measured']} of the rows (median "
                f"{pct(fitted['median_abs_error'])}, largest {pct(fitted['max_abs_error'])}) and "
                f"checked on {held_out['measured']} measurements it never saw (median "
                f"{pct(held_out['median_abs_error'])}, largest {pct(held_out['max_abs_error'])})",
            ],
        )
        == []
    )
    assert (
        missing(
            BENCH_README,
            [
                f"the formula's median {pct(formula['median_abs_error'])} and largest "
                f"{pct(formula['max_abs_error'])}"
            ],
        )
        == []
    )


def test_the_h200_accuracy_figures_are_the_rescored_file() -> None:
    record = result("memory_unmeasured_replay_h200.json")
    summary, rows = record["summary"], record["rows"]
    replay, formula = summary["replay"]["all"], summary["formula_all"]
    allocated = summary["replay"]["all_allocated"]
    median = pct(replay["median_abs_error"], 2)
    largest = pct(max(row["replay_error"] for row in rows), sign=True)
    worst = pct(replay["worst_under_prediction"])
    assert (
        missing(
            MEMORY_MODEL,
            [
                f"({len(rows)} recipes",
                f"median error {median} of the reserved peak, largest {largest} (over), worst "
                f"under-prediction {worst}",
                f"allocated peaks median {pct(allocated['median_abs_error'], 2)}, worst under "
                f"{pct(allocated['worst_under_prediction'], 2)}",
                f"median {pct(formula['median_abs_error'])}, largest "
                f"{pct(formula['max_abs_error'], 0)}",
            ],
        )
        == []
    )
    assert (
        missing(
            BENCH_README,
            [
                f"grid's {len(rows)} recipes",
                f"median error {median}, largest {largest}, worst under-prediction {worst}; the "
                f"formula's median {pct(formula['median_abs_error'])}",
            ],
        )
        == []
    )


def test_the_benchmarks_figures_are_their_results_files() -> None:
    repeat = result("repeat_h100.json")["summary"]
    study = result("study_h100_partial.json")["summary"]
    data = result("data_1gb_cpu.json")["summary"]
    families = result("replay_families_cpu.json")["summary"]
    combos = result("replay_combos_cpu.json")["summary"]
    search = result("search_sim_qwen2-7b.json")["summary"]
    start = result("probe_start_h100.json")["summary"]
    qv, all_linear = repeat["lora-qv-mb2"], repeat["lora-all-mb2"]
    default = study["default_tokens_per_second"]
    phrases = [
        f"trains {default:,.0f} tokens/s",
        f"trains {qv['median_tokens_per_second']:,.0f} tokens/s",
        f"{qv['median_tokens_per_second'] / default:.1f} times as fast",
        f"on all linear layers {all_linear['median_tokens_per_second']:,.0f} tokens/s",
        f"tokens/s within {pct(all_linear['tokens_per_second_spread'])} (all-linear) and "
        f"{pct(qv['tokens_per_second_spread'], 0)} (q/v)",
        f"{study['finished_trials']} finished trials, {study['probed_trials']} of them probed",
        f"({data['rows'] / 1000:.0f}k rows, {data['train_tokens'] / 1e6:.0f}M tokens) is checked "
        f"in {data['seconds']['check']:.0f} s and tokenized in "
        f"{data['seconds']['tokenize'] / 60:.1f} minutes",
        f"peak resident memory of {data['peak_rss_bytes'] / 2**30:.1f} GiB, about its token "
        f"cache's size ({data['cache_bytes'] / 2**30:.1f} GiB)",
        f"{sum(families.values())} cases",
        f"{families['ok']} run, the replay",
        f"{combos['ok']} were traced",
        f"{search['pruned']['median_probed']} of 40 trials were probed (median) against "
        f"{search['unpruned']['median_probed']}",
    ]
    assert missing(BENCH_README, phrases) == []
    cpu = result("probe_start_cpu.json")["summary"]
    starts = [
        f"{start['cold']['total']:.1f} s started cold and {start['warm']['total']:.1f} s forked",
        f"machine, busy with other jobs, {cpu['cold']['total']:.1f} s and "
        f"{cpu['warm']['total']:.1f} s",
    ]
    assert missing(BENCH_README, starts) == []
    assert missing(ROOT / "docs" / "study.md", starts) == []


def test_the_per_gpu_figures_are_the_formula_s() -> None:
    """docs/distributed.md's Qwen2-7B full fine-tune, as `autotune estimate --memory-model
    formula` gives it on bench/configs/qwen2-7b.json (the replay's row is slower to check)."""
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe

    spec = load_model_spec(str(ROOT / "bench" / "configs" / "qwen2-7b.json"))
    base = {"model": "qwen2-7b", "method": "full", "precision": "bf16", "optimizer": "adamw"}
    base |= {"micro_batch_size": 1, "seq_len": 1024, "gradient_checkpointing": True}

    def peak(**fields):
        return estimate(spec, Recipe.from_dict({**base, **fields}))

    one, fsdp = peak(), peak(distributed="fsdp", num_gpus=4)
    ddp = peak(distributed="ddp", num_gpus=4)
    offload = peak(distributed="fsdp", num_gpus=4, offload="optimizer_and_params")
    gib = 2**30
    assert (
        missing(
            ROOT / "docs" / "distributed.md",
            [
                f"| formula | {one.peak_bytes / gib:.2f} GiB | {fsdp.peak_bytes / gib:.2f} GiB | "
                f"{fsdp.peak_bytes / one.peak_bytes:.0%} |",
                f"Under DDP on 4 GPUs the formula gives {ddp.peak_bytes / gib:.2f} GiB per GPU",
                f"on 4 GPUs, {offload.peak_bytes / gib:.2f} GiB per GPU and "
                f"{offload.host_bytes / gib:.2f} GiB of host memory per GPU",
            ],
        )
        == []
    )


def test_the_padded_rows_figures_are_the_bench_s() -> None:
    """docs/memory-model.md's padded-rows paragraph (and bench/README.md's figure) are
    bench/results/padded_rows_cpu.json's; its formula figures are the formula's now (the
    replay's take seconds each: `python bench/padded_rows.py` rewrites them)."""
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.prediction import formula_estimate
    from autotune.recipe import Recipe

    record = result("padded_rows_cpu.json")
    ways = record["ways"]
    full, padded, data = ways["full_rows"], ways["padded_full_width"], ways["data_rows"]
    spec = load_model_spec(str(ROOT / "bench" / "configs" / f"{record['shape']}.json"))
    recipe = Recipe.from_dict({"model": record["shape"], **record["fields"]})
    assert full["formula_peak_bytes"] == estimate(spec, recipe).peak_bytes
    assert padded["formula_peak_bytes"] == estimate(spec, recipe, padded=True).peak_bytes
    lengths = tuple(data["token_lengths"])
    assert data["formula_peak_bytes"] == formula_estimate(spec, recipe, lengths).peak_bytes

    def gib(way: dict, model: str) -> str:
        return f"{way[f'{model}_peak_bytes'] / 2**30:.2f}"

    def more(model: str) -> str:
        return pct(padded[f"{model}_peak_bytes"] / full[f"{model}_peak_bytes"] - 1, sign=True)

    fields, seq = record["fields"], record["fields"]["seq_len"]
    phrases = [
        f"seq {seq}, micro-batch {fields['micro_batch_size']}, no checkpointing",
        f"the replay predicts {gib(full, 'replay')} GiB with every row {seq} tokens and none "
        f"padded",
        f"{gib(padded, 'replay')} GiB ({more('replay')}) with those {seq}-token rows padded",
        f"and {gib(data, 'replay')} GiB on data whose examples are {lengths[0]} to {lengths[1]} "
        f"tokens long, whose padded rows are {data['row_tokens']} tokens wide",
        f"the formula {gib(full, 'formula')} GiB, {gib(padded, 'formula')} GiB "
        f"({more('formula')}) and {gib(data, 'formula')} GiB",
    ]
    assert missing(MEMORY_MODEL, phrases) == []
    readme = f"predicts {gib(padded, 'replay')} GiB instead of {gib(full, 'replay')} "
    assert missing(BENCH_README, [readme + f"({more('replay')}:"]) == []


LORA = {"method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear"}
LORA |= {"precision": "bf16", "seq_len": 1024}
NF4 = {"quantization": "nf4"}
DORA_ROWS = {
    "bf16 LoRA r16 all-linear mb2": {"micro_batch_size": 2},
    "bf16 DoRA, the same": {"micro_batch_size": 2, "use_dora": True},
    "QLoRA mb1": {**NF4, "micro_batch_size": 1},
    "QDoRA mb1": {**NF4, "micro_batch_size": 1, "use_dora": True},
    "QLoRA mb4, chunked loss": {**NF4, "micro_batch_size": 4, "loss": "chunked"},
    "QDoRA mb4, chunked loss": {**NF4, "micro_batch_size": 4, "loss": "chunked", "use_dora": True},
}
"""docs/memory-model.md's DoRA table: Qwen2-7B, seq 1024, checkpointing, dropout 0.05."""
OFFLOAD_ROWS = {
    "Qwen2-7B QLoRA mb4, checkpointing": ("qwen2-7b", {**NF4, "micro_batch_size": 4}),
    "Qwen2-7B QLoRA mb4, no checkpointing": (
        "qwen2-7b",
        {**NF4, "micro_batch_size": 4, "gradient_checkpointing": False},
    ),
    "Qwen2-7B bf16 LoRA mb2, chunked loss, no checkpointing": (
        "qwen2-7b",
        {"micro_batch_size": 2, "loss": "chunked", "gradient_checkpointing": False},
    ),
    "Qwen2-0.5B QLoRA mb4, checkpointing": ("qwen2-0.5b", {**NF4, "micro_batch_size": 4}),
    "Qwen2-0.5B QLoRA mb4, no checkpointing": (
        "qwen2-0.5b",
        {**NF4, "micro_batch_size": 4, "gradient_checkpointing": False},
    ),
    "Qwen2-0.5B bf16 LoRA mb2, chunked loss, no checkpointing": (
        "qwen2-0.5b",
        {"micro_batch_size": 2, "loss": "chunked", "gradient_checkpointing": False},
    ),
}
"""docs/memory-model.md's activation-offload table: seq 1024, r16 all-linear."""


def test_the_memory_model_tables_formula_columns_are_the_formula_s() -> None:
    """The formula's column of the DoRA and activation-offload tables, as `autotune estimate
    --memory-model formula` gives them on bench/configs (the replay's are slower to check)."""
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe

    def spec(shape: str):
        return load_model_spec(str(ROOT / "bench" / "configs" / f"{shape}.json"))

    rows = {
        line.split("|")[1].strip(): line
        for line in MEMORY_MODEL.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("|")
    }
    qwen2_7b = spec("qwen2-7b")
    for label, fields in DORA_ROWS.items():
        recipe = Recipe.from_dict({"model": "m", **LORA, "lora_dropout": 0.05, **fields})
        peak = estimate(qwen2_7b, recipe).peak_bytes / 2**30
        assert rows[label].endswith(f"| {peak:.2f} GiB |"), label
    for label, (shape, fields) in OFFLOAD_ROWS.items():
        recipe = Recipe.from_dict({"model": shape, **LORA, "activation_offload": True, **fields})
        host = estimate(spec(shape), recipe).host_bytes / 2**30
        assert rows[label].endswith(f"| {host:.2f} GiB |"), label


def test_the_fidelity_table_is_the_three_runs() -> None:
    """bench/README.md's side-by-side fidelity table: the 20-step probe's rho and the noise."""
    runs = [
        result(name)["summary"]
        for name in ("fidelity_cpu.json", "fidelity_cpu_summary.json", "fidelity_cpu_bigger.json")
    ]

    def rho(run: dict) -> str:
        at_20 = run["rho"]["20"]
        seeds = at_20["single_seed"]
        return f"{at_20['seed_mean']:.2f} ({min(seeds):.2f}-{max(seeds):.2f})"

    def noise(run: dict) -> str:
        largest = max(s["stdev"] for by_steps in run["spread"].values() for s in by_steps.values())
        return f"{run['median_seed_stdev']:.3f} ({largest:.3f})"

    assert (
        missing(
            BENCH_README,
            [
                "| rho, 20-step probe | " + " | ".join(rho(run) for run in runs) + " |",
                "| noise: median seed stdev (largest) | "
                + " | ".join(noise(run) for run in runs)
                + " |",
            ],
        )
        == []
    )


def test_the_card_table_is_the_cards() -> None:
    from autotune.budgets import CARD_MEMORY_BYTES

    rows = re.findall(
        r"^\| `([a-z0-9-]+)` \| (\d+) MiB \(([\d.]+) GiB\) \|$",
        (ROOT / "docs" / "study.md").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    documented = {name: (int(mib), gib) for name, mib, gib in rows}
    cards = {name: (b // 2**20, f"{b / 2**30:.1f}") for name, b in CARD_MEMORY_BYTES.items()}
    assert documented == cards


def test_the_default_space_size_is_the_space_s() -> None:
    from autotune.space import SearchSpace

    recipes = f"{sum(1 for _ in SearchSpace.load().all_params()):,}"
    for doc in (README, ROOT / "docs" / "study.md", MEMORY_MODEL):
        found = re.findall(
            r"default space(?:'s| of) (\d[\d,]+) recipes|(\d[\d,]+) for the default space",
            words(doc),
        )
        stated = {a or b for a, b in found}
        assert stated == {recipes}, doc.name


def test_the_readme_tests_with_make_test() -> None:
    quick_start = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    assert re.search(r"^ {4}make test\b", quick_start, re.MULTILINE)


# ---- the benchmarks' commands as the docs give them ---------------------------------------

SCRIPT_CALL = re.compile(r"\bpython3? (bench/[a-z_]+\.py|scripts/[a-z_]+\.py)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
OTHER_COMMAND = re.compile(r"#|&&|\|\||;|\|")


def unknown_script_options(text: str, root: Path = ROOT) -> list[str]:
    """`python bench/SCRIPT.py ... --flag` in `text` whose script is missing or whose argparse
    (or bench/shared.py's, which the benchmarks share) has no such option."""
    shared = root / "bench" / "shared.py"
    shared_text = shared.read_text(encoding="utf-8") if shared.exists() else ""
    unknown = []
    for segment in code_segments(text):
        for call in SCRIPT_CALL.finditer(segment):
            script = root / call.group(1)
            if not script.exists():
                unknown.append(f"{call.group(1)}: no such script")
                continue
            source = script.read_text(encoding="utf-8") + shared_text
            rest = OTHER_COMMAND.split(segment[call.end() :], maxsplit=1)[0]
            rest = SCRIPT_CALL.split(rest, maxsplit=1)[0]
            unknown += [
                f"{call.group(1)} {flag}"
                for flag in FLAG.findall(rest)
                if f'"{flag}"' not in source and flag != "--help"
            ]
    return unknown


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_the_docs_give_a_benchmark_exists(doc: Path) -> None:
    assert unknown_script_options(doc.read_text(encoding="utf-8")) == []


def test_a_benchmark_option_or_script_that_is_not_there_is_found(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "a_bench.py").write_text('parser.add_argument("--out")\n')
    (tmp_path / "bench" / "shared.py").write_text('parser.add_argument("--device")\n')
    text = (
        "    python bench/a_bench.py --out x.json --device cpu --outt y  # --not-this\n"
        "`python bench/gone_bench.py --out x`\n"
    )
    assert unknown_script_options(text, tmp_path) == [
        "bench/gone_bench.py: no such script",
        "bench/a_bench.py --outt",
    ]
