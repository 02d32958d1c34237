"""The real `autotune` command, end to end on a tiny random model, and its bad-input errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from autotune.errors import UsageError
from autotune.margins import memory_margin
from autotune.memory import estimate
from autotune.model_spec import load_model_spec
from autotune.recipe import Recipe
from autotune.space import SPACES_DIR
from autotune.units import count_of, format_bytes
from tests.conftest import DEMO, assert_refused_before_tokenizing, write_jsonl
from tests.test_study import workspace  # noqa: F401

AUTOTUNE = str(Path(sys.executable).parent / "autotune")
DEMO_SPACE = str(SPACES_DIR / "demo.yaml")


def autotune(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AUTOTUNE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def test_run_export_report_end_to_end(tiny_model, qa_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    # Adapters only, so the exported recipe trains into a peft adapter (full and freeze
    # recipes are probed and trained in test_probe.py and test_train.py).
    lora_space = tmp_path / "lora.yaml"
    lora_space.write_text(
        Path(DEMO_SPACE).read_text().replace("method: [lora, freeze, full]", "method: [lora]")
    )
    args = [
        "run",
        "--model",
        str(tiny_model),
        "--data",
        str(qa_data),
        "--budget",
        "4GB",
        "--space",
        str(lora_space),
        "--trials",
        "4",
        "--probe-steps",
        "3",
        "--seq-len",
        "64",
        "--storage",
        storage,
        "--study",
        "e2e",
        "--device",
        "cpu",
        "--seed",
        "1",
    ]
    args += ["--confirm", "1"]
    done = autotune(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Pareto frontier" in done.stdout
    assert "CPU RSS +" in done.stdout  # says which memory figure a CPU probe measured
    # bitsandbytes' notice about its kernel hub (CPUs with AVX512-BF16) stays in probe logs
    assert "gemm_4bit_forward" not in done.stdout + done.stderr
    assert "confirm trial" in done.stdout
    assert "report: reports/e2e.html" in done.stdout
    # status counts every probe the run made: the trials', the noise check's, the confirmations'
    shown = autotune("status", "--storage", storage, "--study", "e2e", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    confirmed = done.stdout.count("confirm trial ")
    counted = re.search(
        r"; (\d+) probes \((\d+) trials at [\d.]+ an hour, 1 noise check, "
        rf"{count_of(confirmed, 'confirmation')}\)\n",
        shown.stdout,
    )
    assert counted, (shown.stdout, done.stdout)
    assert int(counted[1]) == int(counted[2]) + 1 + confirmed
    assert "recipe (balanced): reports/e2e-recipe.yaml" in done.stdout

    study = optuna.load_study(study_name="e2e", storage=storage)
    assert len(study.trials) == 4
    assert study.metric_names == ["peak_memory_bytes", "tokens_per_second", "eval_loss"]
    measured = [t for t in study.trials if t.user_attrs.get("status") == "measured"]
    assert measured, [t.user_attrs.get("reason") for t in study.trials]
    for trial in measured:
        memory, speed, loss = trial.values
        assert memory > 0 and speed > 0 and 0 < loss < 10
        assert trial.user_attrs["probe_memory_source"] == "cpu_peak_rss_delta"
        assert all(v <= 0 for v in trial.constraints.values())

    exported = (tmp_path / "reports" / "e2e-recipe.yaml").read_text()
    recipe = Recipe.from_yaml(exported)
    trial_number = yaml.safe_load(exported)["measured"]["trial"]
    assert recipe == Recipe.from_dict(study.trials[trial_number].user_attrs["recipe"])
    assert recipe.model == str(tiny_model) and recipe.seq_len == 64
    page = (tmp_path / "reports" / "e2e.html").read_text()
    assert "Plotly.newPlot" in page and "not GPU memory" in page
    # the answer opens the page, with the command that trains the recipe the run exported
    assert page.index('id="recommendation"') < page.index("Plotly.newPlot")
    assert "autotune train --recipe reports/e2e-recipe.yaml --data " in page

    fastest = autotune(
        "export", "--storage", storage, "--pick", "fastest", "-o", "fast.yaml", cwd=tmp_path
    )
    assert fastest.returncode == 0, fastest.stderr
    fast = yaml.safe_load((tmp_path / "fast.yaml").read_text())
    assert fast["measured"]["tokens_per_second"] == pytest.approx(
        max(t.values[1] for t in measured), rel=1e-3
    )
    printed = autotune("export", "--storage", storage, "--study", "e2e", cwd=tmp_path)
    assert Recipe.from_yaml(printed.stdout) == recipe

    for fmt, key in (
        ("hf", "training_arguments"),
        ("axolotl", "base_model"),
        ("llamafactory", "finetuning_type"),
    ):
        other = autotune("export", "--storage", storage, "--format", fmt, cwd=tmp_path)
        assert other.returncode == 0, other.stderr
        assert key in yaml.safe_load(other.stdout)
    wrong = autotune("export", "--storage", storage, "--format", "deepspeed", cwd=tmp_path)
    assert wrong.returncode == 2 and "--format 'deepspeed'" in wrong.stderr

    report = autotune("report", "--storage", storage, "-o", "r/out.html", cwd=tmp_path)
    assert report.returncode == 0 and (tmp_path / "r" / "out.html").stat().st_size > 100_000

    trained = autotune(
        "train",
        "--recipe",
        "reports/e2e-recipe.yaml",
        "--data",
        str(qa_data),
        "--max-steps",
        "2",
        "--output",
        "model-out",
        "--device",
        "cpu",
        "--budget",
        "4GB",
        "--seed",
        "1",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert "trained 2 steps" in trained.stdout and "probe measured" in trained.stdout
    assert "note: --budget was not enforced" in trained.stdout  # a CPU run has no cap
    # the prediction beside the measured peak is the one the study made on the same data
    # (its split by the same seed): padded rows as wide as the longest example
    studied = yaml.safe_load(exported)["measured"]
    assert studied["memory_model"] == "replay"
    predicted = format_bytes(studied["predicted_peak_bytes"])
    # on the CPU, beside resident-memory growth: the prediction says it is of GPU memory, and
    # the probe's figure is its resident growth too, as `autotune run` printed it
    line = " ".join(trained.stdout.split())  # unwrapped
    assert f"predicted GPU {predicted} (replay)" in line
    assert f"probe measured CPU RSS +{format_bytes(studied['peak_memory_bytes'])}" in line
    assert (tmp_path / "model-out" / "autotune_recipe.yaml").exists()
    assert any((tmp_path / "model-out").glob("*.safetensors"))
    assert (tmp_path / "model-out" / "adapter_config.json").exists()
    assert_generates(tmp_path / "model-out", tiny_model)

    again = autotune(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already holds 4 finished trials" in again.stdout
    assert len(optuna.load_study(study_name="e2e", storage=storage).trials) == 4


def assert_generates(output: Path, base_model: Path) -> None:
    """What `autotune train` saved loads (a peft adapter on the base, or a whole model) and
    generates text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (output / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(base_model)), str(output)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(output))
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    inputs = tokenizer("Add 2 and 5.\n", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    assert tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])


@pytest.fixture()
def config_only(tmp_path) -> Path:
    model = tmp_path / "cfg"
    model.mkdir()
    shutil.copy(DEMO / "config.json", model / "config.json")
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, model / item.name)
    return model


def test_python_m_autotune_is_the_command(tmp_path):
    """Where the entry point is not on PATH (a venv not activated), `python -m autotune` is the
    same command: its usage names it, and bad input is its one line and exit code 2."""
    shown = subprocess.run(
        [sys.executable, "-m", "autotune", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert shown.returncode == 0 and "Usage: python -m autotune " in shown.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "autotune", "status", "--storage", f"sqlite:///{tmp_path}/no.db"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert missing.returncode == 2 and missing.stderr.startswith("autotune: error: no SQLite")
    assert len(missing.stderr.splitlines()) == 1


def test_estimate_prints_json_breakdown(config_only, tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("method: lora\nquantization: nf4\nlora_r: 8\nseq_len: 256\n")
    done = autotune(
        "estimate",
        "--model",
        str(config_only),
        "--recipe",
        str(recipe_path),
        "--json",
        "--memory-model",
        "formula",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    expected = estimate(load_model_spec(str(config_only)), Recipe.load(recipe_path))
    margin = memory_margin("formula", "nf4")
    assert printed == {
        **expected.as_json(),
        "memory_model": "formula",
        "margin": margin.fraction,
        "peak_bytes_with_margin": margin.bytes_of(expected.peak_bytes),
        "num_gpus": 1,
    }
    longer = autotune(
        "estimate",
        "--model",
        str(config_only),
        "--recipe",
        str(recipe_path),
        "--json",
        "--seq-len",
        "512",
        "--memory-model",
        "formula",
        cwd=tmp_path,
    )
    assert json.loads(longer.stdout)["peak_bytes"] > printed["peak_bytes"]
    table = autotune(
        "estimate",
        "-m",
        str(config_only),
        "-r",
        str(recipe_path),
        "--memory-model",
        "formula",
        cwd=tmp_path,
    )
    assert "logits_and_loss" in table.stdout and "predicted peak" in table.stdout
    # the rows it took, without data: a study's prediction on its data's rows can differ
    assert f"({expected.peak_bytes} bytes, formula, every row 256 tokens)" in table.stdout
    assert "paged optimizer states" not in table.stdout
    assert f"(+{100 * margin.fraction:.1f}%: the formula's worst under-prediction" in table.stdout
    # with a budget: whether the peak with its margin fits, and by how much; the exit code says
    # it too (1 over the budget, which a script tells from 2, bad input), the table printed whole
    margined = margin.bytes_of(expected.peak_bytes)
    for budget, verdict, code in ((margined + 10**6, "fits", 0), (margined - 10**6, "over", 1)):
        fit = autotune(
            "estimate", "-m", str(config_only), "-r", str(recipe_path), "--memory-model",
            "formula", "--budget", f"{budget}B", cwd=tmp_path,
        )  # fmt: skip
        assert fit.returncode == code, fit.stderr
        assert fit.stdout.startswith(table.stdout) and not fit.stderr
        assert f": {verdict} " in fit.stdout.splitlines()[-1]
    given = autotune(
        "estimate", "-m", str(config_only), "-r", str(recipe_path), "--memory-model", "formula",
        "--memory-margin", "0.25", "--json", cwd=tmp_path,
    )  # fmt: skip
    context = expected.breakdown["cuda_context"]  # outside the margin, as its errors are
    assert json.loads(given.stdout)["peak_bytes_with_margin"] == context + math.ceil(
        (expected.peak_bytes - context) * 1.25
    )
    # --budget with --json: the verdict in the JSON too (it was left out, the budget ignored)
    for budget, fits in ((margined + 10**6, True), (margined - 10**6, False)):
        fit = autotune(
            "estimate", "-m", str(config_only), "-r", str(recipe_path), "--memory-model",
            "formula", "--budget", f"{budget}B", "--json", cwd=tmp_path,
        )  # fmt: skip
        assert json.loads(fit.stdout) == {**printed, "budget_bytes": budget, "fits": fits}
        assert fit.returncode == (0 if fits else 1), fit.stderr
    # a budget it cannot read is said before the model is even looked at
    unread = autotune(
        "estimate", "-m", str(tmp_path / "no-model"), "-r", str(recipe_path), "--budget", "24",
        cwd=tmp_path,
    )  # fmt: skip
    assert unread.returncode == 2 and "has no unit" in unread.stderr, unread.stderr


def test_estimate_replays_the_recipe_by_default(config_only, tmp_path):
    from autotune.replay import load_config, replay

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("method: lora\nquantization: nf4\nlora_r: 8\nseq_len: 256\n")
    done = autotune(
        "estimate", "-m", str(config_only), "-r", str(recipe_path), "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    expected = replay(Recipe.load(recipe_path), load_config(str(config_only))).estimate()
    margin = memory_margin("replay", "nf4")
    assert printed == {
        **expected.as_json(),
        "memory_model": "replay",
        "margin": margin.fraction,
        "peak_bytes_with_margin": margin.bytes_of(expected.peak_bytes),
        "num_gpus": 1,
    }
    assert set(printed["breakdown"]) >= {"weights", "activations", "allocator_overhead"}
    int8 = tmp_path / "int8.yaml"
    int8.write_text("method: lora\nquantization: int8\nlora_r: 8\nseq_len: 256\n")
    table = autotune("estimate", "-m", str(config_only), "-r", str(int8), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    # int8 is replayed too (autotune.meta_int8): no fallback line, the replay's breakdown
    assert "memory model:" not in table.stdout
    assert "activations" in table.stdout and "logits_and_loss" not in table.stdout


def test_estimate_shows_cublas_workspaces_as_their_own_part(config_only, tmp_path):
    """cuBLAS's two workspaces (the forward's thread's, backward's) are a part of the breakdown,
    not counted in the activations or gradients of the phase that made them; the parts still sum
    to the peak, in both memory models and in the table as in --json."""
    from autotune.memory import CUBLAS_WORKSPACE_BYTES
    from autotune.replay import load_config, replay

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("method: lora\nlora_r: 8\nseq_len: 128\n")
    printed = {}
    for model in ("replay", "formula"):
        args = ["-m", str(config_only), "-r", str(recipe_path), "--memory-model", model]
        done = autotune("estimate", *args, "--json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        printed[model] = json.loads(done.stdout)
        parts = printed[model]["breakdown"]
        assert parts["cublas_workspaces"] == 2 * CUBLAS_WORKSPACE_BYTES, model
        assert sum(parts.values()) == printed[model]["peak_bytes"], model
        table = autotune("estimate", *args, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert f"cublas_workspaces  {format_bytes(2 * CUBLAS_WORKSPACE_BYTES):>12}" in table.stdout
    # without workspaces the replay's other parts are the same tensors: none of them held one
    recipe = Recipe.load(recipe_path).replace(model=str(config_only))
    bare = replay(recipe, load_config(str(config_only)), cublas_workspace_bytes=0).estimate()
    parts = printed["replay"]["breakdown"]
    assert {k: v for k, v in parts.items() if k != "cublas_workspaces"} == {
        k: v for k, v in bare.breakdown.items() if k != "cublas_workspaces"
    }
    assert parts["activations"] + parts["gradients"] > 0
    assert printed["replay"]["peak_bytes"] - bare.peak_bytes == 2 * CUBLAS_WORKSPACE_BYTES


def test_estimate_shows_paged_optimizer_states_apart_from_the_peak(config_only, tmp_path):
    config = json.loads((config_only / "config.json").read_text())
    (config_only / "config.json").write_text(json.dumps({**config, "hidden_size": 512}))
    recipes = {}
    for optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        recipes[optimizer] = tmp_path / f"{optimizer}.yaml"
        recipes[optimizer].write_text(f"method: full\noptimizer: {optimizer}\nseq_len: 128\n")
    printed = {
        name: json.loads(
            autotune(
                "estimate",
                "-m",
                str(config_only),
                "-r",
                str(path),
                "--json",
                "--memory-model",
                "formula",
                cwd=tmp_path,
            ).stdout
        )
        for name, path in recipes.items()
    }
    paged = printed["paged_adamw_8bit"]
    # at or above the paging threshold (1e5 elements): the 512 x 512 embedding and head and, in
    # each of the 4 blocks, q/o (512 x 512) and k/v (512 x 256); the MLP (512 x 176) stays
    large = 2 * 512 * 512 + 4 * (2 * 512 * 512 + 2 * 512 * 256)
    assert paged["paged_bytes"] == 2 * large
    assert paged["peak_bytes"] < printed["adamw_8bit"]["peak_bytes"]
    table = autotune(
        "estimate", "-m", str(config_only), "-r", str(recipes["paged_adamw_8bit"]), cwd=tmp_path
    )
    assert "paged optimizer states" in table.stdout and "outside the peak" in table.stdout


def test_estimate_says_host_memory_per_gpu_only_on_several(tmp_path):
    """The demo model's recipe with its activations offloaded holds host memory: on one GPU the
    estimate names it "host memory" (it said "per GPU" there too), on two "per GPU"."""
    rows = {}
    for gpus, fields in ((1, ""), (2, "distributed: ddp\nnum_gpus: 2\n")):
        recipe = tmp_path / f"offload-{gpus}.yaml"
        recipe.write_text(f"method: lora\nactivation_offload: true\nseq_len: 128\n{fields}")
        done = autotune(
            "estimate", "-m", str(DEMO), "-r", str(recipe), "--memory-model",
            "formula", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        # each line of the table: its name right-aligned in 28 columns, then the figure
        [rows[gpus]] = [line[:28].strip() for line in done.stdout.splitlines() if "host" in line]
    assert rows == {1: "host memory", 2: "host memory per GPU"}


def _bad_inputs(tmp_path: Path, config_only: Path):
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
    space = tmp_path / "space.yaml"
    space.write_text(Path(DEMO_SPACE).read_text() + "colour: [red]\n")
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text(
        Path(DEMO_SPACE).read_text().replace("micro_batch_size: [1, 2, 4]", "micro_batch_size: [3]")
    )
    full_with_lora = tmp_path / "full.yaml"
    full_with_lora.write_text("method: full\nlora_r: 8\n")
    too_frozen = tmp_path / "frozen.yaml"
    too_frozen.write_text("method: freeze\nfrozen_layers: 9\n")
    unknown_kind = tmp_path / "unknown-kind"
    unknown_kind.mkdir()
    config = json.loads((config_only / "config.json").read_text())
    (unknown_kind / "config.json").write_text(json.dumps({**config, "model_type": "nomodel"}))
    full = tmp_path / "full-only.yaml"
    full.write_text("method: full\n")
    # weights a run's check passes (a safetensors file of no tensors), for its storage's checks
    stub_weights = tmp_path / "stub-weights"
    shutil.copytree(config_only, stub_weights)
    (stub_weights / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    run = [
        "run",
        "--model",
        str(config_only),
        "--data",
        str(data),
        "--space",
        DEMO_SPACE,
        "--device",
        "cpu",
    ]
    stubbed = [*run[:2], str(stub_weights), *run[3:]]
    return [
        (run + ["--budget", "lots"], "is not a size"),
        (run + ["--budget", "0GB"], "more than zero"),
        (
            ["run", "--model", "./missing-model", "--data", str(data), "--budget", "4GB"],
            "does not exist",
        ),
        (
            [
                "run",
                "--model",
                str(config_only),
                "--data",
                str(tmp_path / "none.jsonl"),
                "--budget",
                "4GB",
            ],
            "does not exist",
        ),
        (["run", "--model", str(config_only), "--data", str(empty), "--budget", "4GB"], "is empty"),
        (
            ["run", "--model", str(config_only), "--data", str(broken), "--budget", "4GB"],
            "line 3: not valid JSON",
        ),
        (run[:-4] + ["--space", str(space), "--budget", "4GB"], "unknown keys colour"),
        (run[:-4] + ["--space", str(impossible), "--budget", "4GB"], "do not divide"),
        (run + ["--budget", "1MB"], "smallest recipe"),
        # every probe crashed on it, and the run ended with exit code 0
        (run + ["--budget", "4GB", "--trials", "1", "--probe-steps", "1"], "has no weights"),
        (
            stubbed + ["--budget", "4GB", "--storage", "postgresql://me:pw@127.0.0.1:1/none"],
            "cannot open storage postgresql://me:***@127.0.0.1:1/none",
        ),
        (
            stubbed + ["--budget", "4GB", "--storage", "postgresql://:hunter2@127.0.0.1:1/none"],
            "cannot open storage postgresql://:***@127.0.0.1:1/none",
        ),
        (
            stubbed + ["--budget", "4GB", "--storage", "postgresql://me:p@ss@127.0.0.1:1/none"],
            "cannot open storage postgresql://me:***@127.0.0.1:1/none",
        ),
        (
            ["export", "--storage", "postgresql://me@127.0.0.1:1/none?password=hunter2"],
            "cannot open storage postgresql://me@127.0.0.1:1/none?password=***",
        ),
        (
            ["studies", "--storage", "trials/autotune.db"],
            "--storage trials/autotune.db is not a database URL; for a SQLite file write "
            "sqlite:///trials/autotune.db",
        ),
        (run + ["--budget", "4GB", "--gpus", "7"], "needs CUDA"),
        (run + ["--budget", "4GB", "--gpus-per-probe", "0"], "--gpus-per-probe takes a count"),
        (run + ["--budget", "4GB", "--gpus-per-probe", "1-x"], "or a range (1-4) of GPUs"),
        (
            ["estimate", "--model", str(config_only), "--recipe", str(full_with_lora)],
            "given but method is full",
        ),
        (
            ["estimate", "--model", str(config_only), "--recipe", str(too_frozen)],
            "leaves nothing to train",
        ),
        (
            ["estimate", "--model", str(unknown_kind), "--recipe", str(full)],
            "its model_type 'nomodel' is not one transformers",
        ),
        (
            ["estimate", "-m", str(config_only), "-r", str(full_with_lora)]
            + ["--memory-margin", "10"],
            "--memory-margin must be a share from 0 to 1",
        ),
        (
            ["estimate", "--model", str(tmp_path), "--recipe", str(full_with_lora)],
            "has no config.json",
        ),
        (
            ["export", "--storage", f"sqlite:///{tmp_path}/none.db", "--study", "x"],
            "no SQLite database at",
        ),
        (["export", "--pick", "cheapest"], "no study storage"),
        (["studies", "--storage", "sqlite:///~/x.db"], "SQLite does not expand ~"),
        (["studies", "--storage", f"sqlite:///{tmp_path}"], f"names the directory {tmp_path}"),
    ]


def test_bad_input_is_one_line_and_exit_code_two(tmp_path, config_only):
    for args, needle in _bad_inputs(tmp_path, config_only):
        done = autotune(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert needle in lines[0], (args, lines[0])
        # the storage passwords above never show, wherever the URL parser would split them
        assert "hunter2" not in done.stdout + done.stderr and "p@ss" not in done.stderr


def test_debug_after_the_command_says_where_it_goes(tmp_path):
    done = autotune("estimate", "--model", "m", "--recipe", "r.yaml", "--debug", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "autotune: error: --debug goes before the command: autotune --debug COMMAND ..."
    ]


def test_more_gloo_ranks_than_cpu_cores_are_refused_in_one_line(tmp_path, config_only):
    # the run pinned to one core: a probe's 2 gloo processes would take turns on it, as would
    # two workers' probes of one process each
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    args = ["--model", str(config_only), "--data", str(data), "--space", DEMO_SPACE]
    for flags, refusal in (
        (
            ["--gpus-per-probe", "2"],
            "--gpus-per-probe 2 on --device cpu: 2 gloo processes would stand in for 2 GPUs",
        ),
        (["--workers", "2"], "--workers 2 on --device cpu: 2 probes would train at once"),
    ):
        done = subprocess.run(
            [AUTOTUNE, "run", *args, "--device", "cpu", "--budget", "4GB", *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert refusal in done.stderr
        assert "more than the 1 CPU core this process may use" in done.stderr
        assert not (tmp_path / "trials").exists()  # refused before the data is tokenized


def test_more_bad_input_is_one_line(tmp_path, config_only):
    """Values past sane bounds, a bad flag value, a report with nothing to show or nowhere to
    go, a hub id with no network: one line on stderr and exit code 2 each."""
    import optuna as _optuna

    from autotune.study import RunSettings, prepare_run, run_study
    from tests.test_study import FakeRunner

    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    storage = f"sqlite:///{tmp_path}/s.db"
    _optuna.create_study(
        study_name="empty", storage=storage, directions=["minimize", "maximize", "minimize"]
    )
    settings = RunSettings(
        model=str(config_only),
        data_path=data,
        budget_bytes=10**10,
        space_path=Path(DEMO_SPACE),
        trials=1,
        probe_steps=2,
        seq_len=64,
        device="cpu",
        storage=storage,
        study_name="one",
        memory_model="formula",
    )
    run_study(prepare_run(settings), FakeRunner())
    huge_rank = tmp_path / "huge.yaml"
    huge_rank.write_text("method: lora\nlora_r: 100000000\n")
    wide_rank = tmp_path / "wide.yaml"
    wide_rank.write_text("method: lora\nlora_r: 128\n")  # the model is 64 wide
    (tmp_path / "adir.png").mkdir()
    empty_data = tmp_path / "empty.jsonl"
    empty_data.write_text("")
    # rows, but none to train on: inspect said "0 rows" and exited 0, as if the file would do
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "q", "answer": "a"}] * 4)
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "  "}])
    run = ["run", "--model", str(config_only), "--data", str(data), "--budget", "4GB"]
    report = ["report", "--storage", storage]
    cases = [
        (["estimate", "--model", str(config_only), "--recipe", str(huge_rank)], "lora_r must be"),
        (
            ["estimate", "--model", str(config_only), "--recipe", str(wide_rank)],
            "exceeds the model's width 64",
        ),
        (run + ["--trials", "abc"], "Invalid value for '--trials'"),
        (run + ["--confirm", "-1"], "--confirm must be 0 or more"),
        (run + ["--seed", "-1"], "--seed must be from 0 to 4294967295, got -1"),
        (run + ["--report", str(tmp_path)], f"--report {tmp_path} is a directory"),
        (run + ["--seq-len", str(1 << 30)], "--seq-len must be from 2"),
        (["data", "inspect", str(data), "--seq-len", "0"], "--seq-len must be from 1"),
        (["data", "inspect", str(empty_data)], f"data file {empty_data} is empty"),
        (
            ["data", "inspect", str(unknown)],
            f"data file {unknown} has no row to train on: 4 bad rows: line 1: no known fields",
        ),
        (
            ["data", "inspect", str(blank)],
            f'data file {blank} has no row to train on: 2 bad rows: line 1: field "text" is empty',
        ),
        (["data", "inspect", str(data), "--seq-len", "-5"], "--seq-len must be from 1"),
        (
            ["data", "inspect", str(data), "--model", "./missing-model"],
            "model path './missing-model' does not exist",
        ),
        (report + ["--study", "empty"], "holds no trials yet"),
        (report + ["--study", "one", "--png", str(tmp_path / "adir.png")], "is a directory"),
        (report + ["--study", "one", "--png", "/proc/chart.png"], "cannot be written"),
        # the CSV was written over the report, and both were said written
        (
            report + ["--study", "one", "-o", "r.html", "--csv", str(tmp_path / "r.html")],
            "--output and --csv are both",
        ),
        (run + ["--report", "out.yaml", "--recipe-out", "out.yaml"], "the second would overwrite"),
        (
            ["data", "inspect", str(data), "--model", str(config_only / "config.json")],
            "config.json': it is a file; give the model's directory",
        ),
        (["estimate", "--model", "org/name", "--recipe", str(wide_rank)], "cannot be reached"),
        # "model directory . has no config.json": the current directory, not what was typed
        (["estimate", "--model", "", "--recipe", str(wide_rank)], "model '' names nothing"),
        # an empty directory: transformers' words, cut at a comma ("... from one of: (1) a
        # `tokenizers` library serialization file,")
        (
            ["data", "inspect", str(data), "--model", str(tmp_path / "adir.png")],
            "adir.png': no tokenizer files there (tokenizer.json, tokenizer_config.json, ...)",
        ),
    ]
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub that is never there
    for args, needle in cases:
        done = autotune(*args, cwd=tmp_path, env=env)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
        assert needle in lines[0], (args, lines[0])


def test_ctrl_c_says_what_the_stopped_command_leaves(monkeypatch, capsys, tmp_path):
    import autotune.api
    from autotune import cli

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune.api, "train", stopped)
    output = tmp_path / "out"
    argv = ["autotune", "train", "--recipe", "r.yaml", "--data", "d.jsonl", "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    assert exit_code.value.code == 130
    assert capsys.readouterr().err.strip() == (
        f"autotune: interrupted; the checkpoints saved so far stay in {output} "
        "(--resume continues from the latest)"
    )  # not the study's trials of `autotune run`: train has none


def _run_command_raising(monkeypatch, capsys, tmp_path, error: BaseException) -> tuple[object, str]:
    """`autotune run` whose study raises `error`: its exit code and stderr."""
    import autotune.api
    from autotune import cli

    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(autotune.api, "run", raising)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    argv = ["autotune", "run", "--model", "m", "--data", str(data), "--budget", "4GB"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    return exit_code.value.code, capsys.readouterr().err.strip()


def test_ctrl_c_of_a_run_says_the_same_command_resumes_it(monkeypatch, capsys, tmp_path):
    code, err = _run_command_raising(monkeypatch, capsys, tmp_path, KeyboardInterrupt())
    assert code == 130
    assert err == (
        "autotune: interrupted; finished trials are kept in the study (a trial it stopped is "
        "queued again); the same command resumes the study"
    )


def test_sigterm_says_what_the_stopped_command_leaves(monkeypatch, capsys, tmp_path):
    import signal
    import time

    import autotune.api
    from autotune import cli

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the signal's handler interrupts this

    monkeypatch.setattr(autotune.api, "train", terminated)
    argv = ["autotune", "train", "--recipe", "r.yaml", "--data", "d.jsonl", "--output", "out"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        cli.main()  # which leaves SIGTERM handled as it found it (conftest checks)
    assert exit_code.value.code == 128 + signal.SIGTERM
    words = capsys.readouterr().err.strip()
    assert words.startswith("autotune: stopped by SIGTERM; the checkpoints saved so far stay")


def test_a_full_disk_during_a_run_is_one_line_and_keeps_the_study(monkeypatch, capsys, tmp_path):
    import errno

    disk_full = OSError(errno.ENOSPC, "No space left on device", "trials/s/trial-0003")
    code, err = _run_command_raising(monkeypatch, capsys, tmp_path, disk_full)
    assert code == 2
    assert err == (
        "autotune: error: cannot write trials/s/trial-0003: No space left on device; "
        "finished trials are kept in the study"
    )


def test_a_run_that_measured_nothing_exits_one_saying_why(workspace, monkeypatch, capsys):  # noqa: F811
    """Every probe crashed: the run ended with exit code 0, so `autotune run ... && autotune
    train --recipe ...` went on to a recipe never written; a run that measured one keeps 0."""
    import autotune.api
    from autotune import cli
    from tests.test_study import FakeRunner

    tmp_path, model, data = workspace
    runners = {"crashed": FakeRunner(fail={"": "crash"}), "measured": FakeRunner()}
    real_run = autotune.api.run
    monkeypatch.setattr(
        autotune.api,
        "run",
        lambda settings, events: real_run(
            settings, events=events, runner=runners[settings.study_name]
        ),
    )

    def run(study: str) -> None:
        argv = ["autotune", "run", "-m", str(model), "-d", str(data), "-b", "10GB"]
        argv += ["--space", DEMO_SPACE, "-n", "2", "--probe-steps", "2", "--seq-len", "64"]
        argv += ["--device", "cpu", "--storage", f"sqlite:///{tmp_path}/s.db", "--study", study]
        argv += ["--memory-model", "formula", "--confirm", "0"]
        monkeypatch.setattr(sys, "argv", argv)
        cli.main()

    with pytest.raises(SystemExit) as exit_code:
        run("crashed")
    assert exit_code.value.code == 1
    printed = capsys.readouterr()
    assert printed.err == "autotune: error: no recipe ran: 2 trials crashed: fake crash\n"
    assert "report: " in printed.out and "no recipe" not in printed.out
    run("measured")  # no SystemExit: exit code 0
    printed = capsys.readouterr()
    assert printed.err == "" and "recipe (balanced): " in printed.out


def test_unwritable_places_for_the_study_are_one_line(tmp_path, monkeypatch):
    from autotune.study.storage import make_storage, make_trials_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=f"cannot be made: {blocker} is a file, not a folder"):
        make_storage(f"sqlite:///{blocker}/sub/study.db")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trials").write_text("")  # where the run's folder would go
    with pytest.raises(UsageError, match="cannot create .*trials: File exists; .* writable one"):
        make_trials_dir()


def test_a_trial_that_ends_after_ctrl_c_is_still_recorded_and_shown(tmp_path):
    """With --workers, Ctrl-C ends the run's progress bar while another worker's trial runs
    on; that trial's end must not fail it (its probe measured it)."""
    from rich.console import Console

    from autotune.console import ConsoleReporter, progress_bar
    from autotune.study.objective import TrialSummary
    from autotune.study.records import TrialStatus

    console = Console(record=True, width=200)
    with ConsoleReporter(console) as reporter:
        reporter._progress = progress_bar(console, transient=True)
        reporter._task = reporter._progress.add_task("trials", total=2)
    reporter.trial_started(5, "LoRA r8")
    reporter.trial_finished(
        TrialSummary(
            number=5,
            label="LoRA r8",
            status=TrialStatus.MEASURED,
            predicted_peak_bytes=2**30,
            peak_memory_bytes=2**29,
            tokens_per_second=100.0,
            eval_loss=2.0,
        )
    )
    assert "trial   5 LoRA r8: measured 512.0 MiB" in console.export_text()


def test_a_resumed_run_says_so_before_its_first_trial(workspace):  # noqa: F811
    """The same command resumes a study: its first lines were a new study's, so nothing told
    a resumed run from one that started over."""
    import dataclasses

    import optuna
    from rich.console import Console

    from autotune.api import run
    from autotune.console import ConsoleReporter
    from autotune.study.workers import requeue_stopped_trial
    from tests.test_study import FakeRunner, settings_for

    settings = settings_for(workspace, trials=2, confirm_top=0)
    first = Console(record=True, width=300)
    with ConsoleReporter(first) as reporter:
        study = run(settings, runner=FakeRunner(), events=reporter).study
    assert "resuming" not in first.export_text()
    stopped = study.ask()  # Ctrl-C in the middle of its probe: queued again
    requeue_stopped_trial(stopped)
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    again = Console(record=True, width=300)
    with ConsoleReporter(again) as reporter:
        run(dataclasses.replace(settings, trials=3), runner=FakeRunner(), events=reporter)
    lines = again.export_text().splitlines()
    assert "resuming: 2 of 3 trials finished, 1 queued to run" in lines
    first_trial = next(i for i, line in enumerate(lines) if line.startswith("trial "))
    assert lines.index("resuming: 2 of 3 trials finished, 1 queued to run") < first_trial


def test_a_resumed_run_that_runs_no_trial_says_none_is_queued_to_run(workspace):  # noqa: F811
    """A study at its --trials with baselines still queued (more than --trials): the resumed
    run runs none of them, so its first line does not say they are queued to run."""
    import optuna
    from rich.console import Console

    from autotune.api import run
    from autotune.console import ConsoleReporter
    from tests.test_study import FakeRunner, settings_for

    settings = settings_for(workspace, trials=2, confirm_top=0)
    study = run(settings, runner=FakeRunner()).study
    assert study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    again = Console(record=True, width=300)
    with ConsoleReporter(again) as reporter:
        run(settings, runner=FakeRunner(), events=reporter)
    lines = again.export_text().splitlines()
    assert "resuming: 2 of 2 trials finished" in lines


def test_the_run_s_last_lines_name_the_balanced_trial(workspace):  # noqa: F811
    """The frontier table lists trials by number; the recipe line under it says which row the
    balanced recipe (and the memory line after it) is."""
    from rich.console import Console

    from autotune.api import run
    from autotune.console import ConsoleReporter
    from tests.test_study import FakeRunner, settings_for

    settings = settings_for(workspace, trials=3, confirm_top=0)
    result = run(settings, runner=FakeRunner())
    console = Console(record=True, width=300)
    ConsoleReporter(console).show_result(result)
    text = console.export_text()
    exported = yaml.safe_load(result.recipe_path.read_text())
    trial = exported["measured"]["trial"]
    assert result.recipe is not None and trial in [p.number for p in result.frontier]
    assert (
        f"recipe (balanced): {result.recipe_path} (trial {trial}: {result.recipe.label()})" in text
    )
    assert f"memory of trial {trial}: predicted " in text
    # and what to do next: the command that trains it on the study's data, as the report's card
    command = (
        f"to train it: autotune train --recipe {result.recipe_path} --data "
        f"{settings.data_path} --output outputs/{result.study.study_name}"
    )
    assert command in text
    narrow = Console(record=True, width=60)  # the command is not cut into lines to copy
    ConsoleReporter(narrow).show_result(result)
    assert command in narrow.export_text().splitlines()


def test_a_database_server_that_does_not_answer_is_given_up(monkeypatch):
    """A port that accepts and never answers (a dead proxy; a firewall that drops is alike):
    the driver waited for ever, and the run with it, saying nothing."""
    import socket

    from autotune.study import storage

    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_SECONDS", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts; nobody answers
        port = silent.getsockname()[1]
        url = f"postgresql://me:pw@127.0.0.1:{port}/db"
        with pytest.raises(UsageError, match=r"cannot open storage .*:\*\*\*@.*timeout"):
            storage.make_storage(url)


def test_a_storage_lost_during_a_run_is_one_line(monkeypatch, capsys, tmp_path):
    """The database server stopped mid-run: Optuna, failing to record that, raised an error of
    its own, and the run ended in seven chained tracebacks."""
    import sqlalchemy.exc

    import autotune.api
    from autotune import cli

    def server_gone(*args, **kwargs):
        try:
            raise sqlalchemy.exc.OperationalError(
                "SELECT 1", {}, Exception('connection to "db" as me:hunter2 failed: refused')
            )
        except sqlalchemy.exc.OperationalError:
            # as Optuna's _run_trial meets it in its finally, handling the storage's error
            raise UnboundLocalError("cannot access local variable 'updated_state'")  # noqa: B904

    monkeypatch.setattr(autotune.api, "run", server_gone)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    url = "postgresql://me:hunter2@db/autotune"
    argv = ["autotune", "run", "-m", "m", "-d", str(data), "-b", "4GB", "--storage", url]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    assert exit_code.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err
    assert err.startswith("autotune: error: lost the study's storage: (")
    assert err.strip().endswith("refused; finished trials are kept in the study")


def test_a_storage_url_of_another_kind_says_which_kinds_there_are():
    """SQLAlchemy said "Can't load plugin: sqlalchemy.dialects:journal"; Heroku-style
    postgres:// URLs, which SQLAlchemy no longer reads, likewise."""
    from autotune.study.storage import make_storage

    with pytest.raises(UsageError, match=r"^--storage journal:///x.log: autotune keeps studies"):
        make_storage("journal:///x.log")
    with pytest.raises(UsageError, match=r"me:\*\*\*@db/x: .*mysql://...; write postgresql://$"):
        make_storage("postgres://me:pw@db/x")

    # an in-memory SQLite database: `studies` said the storage was "lost" (exit 1), and a run
    # would have lost its study when it ended
    for url in ("sqlite://", "sqlite:///", "sqlite:///:memory:"):
        with pytest.raises(UsageError, match=f"^--storage {url} names no file"):
            make_storage(url)


def test_what_a_command_reads_it_never_writes(tmp_path, config_only):
    """An output given as the study's storage, the data or a folder, another program's SQLite
    database or an empty file as --storage: one line and exit code 2 each, and every file as
    it was (export -o and report -o replaced the study's database with YAML and HTML, and the
    commands that only read wrote Optuna's tables into the other database and the empty file;
    export -o DIR was a traceback); an output in a folder that cannot be made, before the run."""
    import sqlite3

    storage_file = tmp_path / "s.db"
    storage = f"sqlite:///{storage_file}"
    study = optuna.create_study(
        study_name="s", storage=storage, directions=["minimize", "maximize", "minimize"]
    )
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0, 1.0]))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE users (id INTEGER)")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    files = [storage_file, other, empty, data]
    before = {path: path.read_bytes() for path in files}
    read = ["--storage", storage, "--study", "s"]
    cases = [
        (["export", *read, "-o", str(storage_file)], "is the study's storage (--storage)"),
        (["report", *read, "-o", str(storage_file)], "is the study's storage (--storage)"),
        (["report", *read, "--csv", "s.db"], "--csv s.db is the study's storage"),
        (["export", *read, "-o", str(tmp_path)], f"--output {tmp_path} is a directory"),
        (["report", *read, "--csv", "."], "--csv . is a directory"),
        (["studies", "--storage", f"sqlite:///{other}"], "another program's SQLite database"),
        (["status", "--storage", f"sqlite:///{other}"], "(tables: users)"),
        (["export", "--storage", f"sqlite:///{empty}"], "holds no study yet"),
        (
            ["run", "-m", str(config_only), "-d", str(data), "-b", "4GB", "--report", str(data)],
            f"--report {data} is the training data (--data)",
        ),
        # found out once the study had ended: "cannot write ...: Not a directory"
        (
            ["run", "-m", str(config_only), "-d", str(data), "-b", "4GB"]
            + ["--recipe-out", f"{data}/sub/r.yaml"],
            f"--recipe-out {data}/sub/r.yaml cannot be written: {data} is a file, not a folder",
        ),
    ]
    for args, needle in cases:
        done = autotune(*args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, done.stderr)
    listed = autotune("studies", "--storage", f"sqlite:///{empty}", cwd=tmp_path)
    assert listed.returncode == 0 and "no study in this storage yet" in listed.stdout
    assert {path: path.read_bytes() for path in files} == before


def test_a_read_only_study_file_is_refused_before_the_run(tmp_path, monkeypatch):
    # the run went on to tokenize and size the space, then ended with exit code 1 as if a
    # database server had gone away ("attempt to write a readonly database")
    from autotune.study.storage import open_study

    storage_file = tmp_path / "s.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{storage_file}")
    before = storage_file.read_bytes()
    access = os.access
    monkeypatch.setattr(  # a file mode root's own os.access would not heed
        os, "access", lambda path, mode: mode != os.W_OK and access(path, mode)
    )
    with pytest.raises(UsageError, match=f"cannot write the study's storage {storage_file}"):
        open_study(f"sqlite:///{storage_file}", "t")
    assert storage_file.read_bytes() == before


def test_another_programs_database_is_refused_however_its_url_is_written(tmp_path):
    """SQLAlchemy opens sqlite:///a%20dir/x.db as 'a dir/x.db' and sqlite+pysqlite:/// as
    sqlite:///: the check read neither, so Optuna wrote its tables into the other database."""
    import sqlite3

    from autotune.study.storage import make_storage

    other = tmp_path / "a dir" / "other.db"
    other.parent.mkdir()
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE users (id INTEGER)")
    before = other.read_bytes()
    encoded = str(other).replace(" ", "%20")
    for url in (f"sqlite:///{encoded}", f"sqlite+pysqlite:///{other}"):
        with pytest.raises(UsageError, match="another program's SQLite database"):
            make_storage(url)
    assert other.read_bytes() == before


@pytest.mark.parametrize(
    ("place", "words"),
    [
        ("folder", "names the directory"),
        ("notes.txt/s.db", "notes.txt is a file, not a folder"),
        ("notes.txt", "notes.txt is not a SQLite database"),
    ],
)
def test_a_storage_that_is_no_sqlite_file_is_refused_before_the_data(workspace, place, words):  # noqa: F811
    # a directory, a path under a file and a text file were found once the data was tokenized
    # and the space sized, in SQLAlchemy's words ("unable to open database file")
    from autotune.study import prepare_run
    from tests.test_study import settings_for

    (workspace[0] / "folder").mkdir()
    (workspace[0] / "notes.txt").write_text("not a database\n")
    told: list[tuple[int, int]] = []
    settings = settings_for(
        workspace,
        storage=f"sqlite:///{workspace[0] / place}",
        tokenize_progress=lambda *done: told.append(done),
    )
    with pytest.raises(UsageError, match=re.escape(words)):
        prepare_run(settings)
    assert told == []
    assert (workspace[0] / "notes.txt").read_text() == "not a database\n"


def test_a_model_without_weights_is_refused_before_its_data_is_tokenized(tmp_path, config_only):
    # it was refused once the data was tokenized and the space sized, whose progress lines
    # (stderr, past 2 s on a busy machine) then came before the one line of the refusal
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    assert_refused_before_tokenizing(config_only, data, "has no weights")


def test_a_run_refuses_a_storage_it_cannot_use_before_it_reads_the_data(workspace):  # noqa: F811
    # another program's database and a read-only study file were found once the data was
    # tokenized and the space sized, when the study opened (minutes at 7B)
    import sqlite3

    from autotune.study import prepare_run
    from tests.test_study import settings_for

    other = workspace[0] / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE users (id INTEGER)")
    told: list[tuple[int, int]] = []
    settings = settings_for(
        workspace, storage=f"sqlite:///{other}", tokenize_progress=lambda *done: told.append(done)
    )
    with pytest.raises(UsageError, match="another program's SQLite database"):
        prepare_run(settings)
    assert told == []
