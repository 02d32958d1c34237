"""fidelity_bench.py's summary, from its recorded rows alone: rho between the probes' and the
long runs' rankings at each probe length, each recipe's spread across seeds, and successive
halving against plain probes that spend the same probe steps.

`python bench/fidelity_bench.py --summarize FILE` recomputes it for a results file without
running anything (the rows stay as they were measured).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shared  # noqa: E402, F401 - puts the repository on sys.path, as for every benchmark

from autotune.fidelity import ladder_order, spearman_rho, successive_halving  # noqa: E402


def _loss(probes: dict, name: str, steps: int, seed: int) -> float | None:
    row = probes.get(f"{name}/{steps}/{seed}")
    return row["eval_loss"] if row and row.get("status") == "ok" else None


def summarize(probes: dict, longs: dict, probe_steps: list[int], seeds: int) -> dict:
    """rho per probe length (seed-mean probe loss, and each seed alone), spreads, halving."""
    names = [n for n in longs if longs[n].get("status") == "ok"]
    summary: dict = {"recipes_with_long_run": len(names), "rho": {}, "spread": {}}
    best_means: dict[int, dict[str, float]] = {}
    for steps in probe_steps:
        means, per_seed = {}, []
        best_means[steps] = means
        for name in names:
            values = [v for s in range(seeds) if (v := _loss(probes, name, steps, s)) is not None]
            if values:
                means[name] = statistics.mean(values)
            if len(values) > 1:
                summary["spread"].setdefault(name, {})[steps] = {
                    "seeds": len(values),
                    "range": round(max(values) - min(values), 4),
                    "stdev": round(statistics.stdev(values), 4),
                }
        for seed in range(seeds):
            rho = plain_rho(probes, longs, names, steps, seed)
            if rho is not None:
                per_seed.append(rho)
        if len(means) >= 3:
            summary["rho"][steps] = {
                "recipes": len(means),
                "seed_mean": round(
                    spearman_rho(list(means.values()), [longs[n]["eval_loss"] for n in means]), 3
                ),
                "single_seed": per_seed,
            }
    other = [n for n in names if longs[n].get("other_seeds", {}).get(1) is not None]
    if len(other) >= 3:
        # how far the long run's own ranking moves with another data order, initialisation
        # and eval split: the most a probe could agree with it
        summary["long_rho_seed_0_vs_1"] = round(
            spearman_rho(
                [longs[n]["eval_loss"] for n in other], [longs[n]["other_seeds"][1] for n in other]
            ),
            3,
        )
    summary["best"] = {
        "long": min(names, key=lambda n: longs[n]["eval_loss"]) if names else None,
        **{
            str(steps): min(means, key=means.get) if names and len(means) == len(names) else None
            for steps, means in best_means.items()
        },
    }
    spreads = [s[k]["stdev"] for s in summary["spread"].values() for k in s]
    summary["median_seed_stdev"] = round(statistics.median(spreads), 4) if spreads else None
    summary["halving"] = halving(probes, longs, names, probe_steps)
    summary["halving_at_equal_steps"] = halving_at_equal_steps(
        probes, longs, names, probe_steps, seeds
    )
    return summary


def plain_rho(probes: dict, longs: dict, names: list[str], steps: int, seed: int) -> float | None:
    """rho of one seed's probes of `steps` steps against the long runs (None: under 3 recipes)."""
    both = [n for n in names if _loss(probes, n, steps, seed) is not None]
    if len(both) < 3:
        return None
    return round(
        spearman_rho(
            [_loss(probes, n, steps, seed) for n in both],  # type: ignore[misc]
            [longs[n]["eval_loss"] for n in both],
        ),
        3,
    )


def halving(
    probes: dict, longs: dict, names: list[str], lengths: list[int], seed: int = 0
) -> dict | None:
    """Successive halving from one seed's probes: every recipe at the first length, the better
    half promoted to each next length, each promoted probe run again from the start (as
    `autotune run --promote` runs them). Ranked as a study ranks it (the recipe that reached a
    longer probe first, then by its loss there: autotune.fidelity.ladder_order); rho against the
    long runs, and the probe steps it spent."""
    ladders = {}
    for name in names:
        loss = _loss(probes, name, lengths[0], seed)
        if loss is not None:
            ladders[name] = [loss]
    if len(ladders) < 3:
        return None
    spent = lengths[0] * len(ladders)
    scores = {name: ladder[0] for name, ladder in ladders.items()}
    for steps in lengths[1:]:
        promoted = successive_halving(scores)
        scores = {}
        for name in promoted:
            loss = _loss(probes, name, steps, seed)
            if loss is not None:
                ladders[name].append(loss)
                scores[name] = loss
        spent += steps * len(promoted)
    order = ladder_order(ladders)
    rho = spearman_rho(list(range(len(order))), [longs[n]["eval_loss"] for n in order])
    return {"rho": round(rho, 3), "probe_steps_spent": spent, "order": order}


def halving_at_equal_steps(
    probes: dict, longs: dict, names: list[str], probe_steps: list[int], seeds: int
) -> list[dict]:
    """For each probe length after the first: plain probes of that length for every recipe,
    against one round of halving that spends no more (every recipe at the length before it, the
    better half probed again at this one; the same steps for an even number of recipes, twice
    the length), both from the same seed's rows, for each seed."""
    entries = []
    for short, long in zip(probe_steps, probe_steps[1:]):
        usable = [
            n
            for n in names
            if _loss(probes, n, long, 0) is not None and _loss(probes, n, short, 0) is not None
        ]
        per_seed = [
            (
                halving(probes, longs, usable, [short, long], seed),
                plain_rho(probes, longs, usable, long, seed),
            )
            for seed in range(seeds)
        ]
        measured = [(h, p) for h, p in per_seed if h is not None and p is not None]
        if not measured:
            continue
        halving_rhos = [h["rho"] for h, _ in measured]
        plain_rhos = [p for _, p in measured]
        entries.append(
            {
                "halving": f"{short} -> {long}",
                "plain_steps": long,
                "recipes": len(usable),
                "halving_probe_steps": measured[0][0]["probe_steps_spent"],
                "plain_probe_steps": long * len(usable),
                "rho_halving": halving_rhos,
                "rho_plain": plain_rhos,
                "rho_halving_mean": round(statistics.mean(halving_rhos), 3),
                "rho_plain_mean": round(statistics.mean(plain_rhos), 3),
            }
        )
    return entries


def recorded_rows(results: dict) -> tuple[dict, dict, list[int], int]:
    """A results file's probes and long runs as summarize takes them, with its probe lengths
    and seeds."""
    probes = {row["key"]: {k: v for k, v in row.items() if k != "key"} for row in results["probes"]}
    longs = {}
    for row in results["long_runs"]:
        values = {k: v for k, v in row.items() if k != "recipe"}
        values["other_seeds"] = {int(s): v for s, v in row.get("other_seeds", {}).items()}
        longs[row["recipe"]] = values
    keys = [key.split("/") for key in probes]
    probe_steps = sorted({int(steps) for _, steps, _ in keys})
    seeds = 1 + max((int(seed) for _, _, seed in keys), default=0)
    return probes, longs, probe_steps, seeds


def summarize_file(path: Path, out: Path | None = None) -> dict:
    """Recompute the summary of the results file at `path` from its rows, keeping what the run
    recorded besides (pretraining, task, versions, command, date), and write it to `out`
    (default: back to `path`)."""
    results = json.loads(path.read_text(encoding="utf-8"))
    probes, longs, probe_steps, seeds = recorded_rows(results)
    kept = {k: v for k, v in results["summary"].items() if k in ("pretraining", "task", "versions")}
    summary = json.loads(json.dumps(summarize(probes, longs, probe_steps, seeds)))
    results["summary"] = {**summary, **kept}
    (out or path).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results["summary"]


def print_table(summary, probes, longs, names, probe_steps, seeds) -> None:
    header = "recipe".ljust(24) + "".join(f"{s:>8}-step" for s in probe_steps) + "      long"
    print(header)
    for name in names:
        cells = []
        for steps in probe_steps:
            values = [
                probes[k]["eval_loss"]
                for s in range(seeds)
                if (k := f"{name}/{steps}/{s}") in probes and probes[k].get("eval_loss")
            ]
            cells.append(f"{statistics.mean(values):>13.4f}" if values else f"{'-':>13}")
        long = longs.get(name, {}).get("eval_loss")
        print(name.ljust(24) + "".join(cells) + (f"{long:>10.4f}" if long else f"{'-':>10}"))
    for steps, rho in summary["rho"].items():
        print(f"rho at {steps} steps: {rho['seed_mean']} (single seeds {rho['single_seed']})")
    if summary.get("halving"):
        rho, spent = summary["halving"]["rho"], summary["halving"]["probe_steps_spent"]
        print(f"successive halving: rho {rho}, {spent} probe steps")
    for entry in summary.get("halving_at_equal_steps", []):
        print(
            f"halving {entry['halving']} ({entry['halving_probe_steps']} probe steps): rho "
            f"{entry['rho_halving_mean']} {entry['rho_halving']}; plain {entry['plain_steps']}-"
            f"step probes ({entry['plain_probe_steps']}): rho {entry['rho_plain_mean']} "
            f"{entry['rho_plain']}"
        )
