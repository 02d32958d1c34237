"""The space a study searches: choices the model's code cannot run or the budget cannot hold are
left out before any trial (a resumed study's space: autotune.study.resumed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.architecture import Architecture, loss_refusal
from autotune.errors import UsageError
from autotune.margins import margin_for
from autotune.memory import MemoryEstimate
from autotune.model_spec import ModelSpec
from autotune.optimizers import optimizer_refusal
from autotune.prediction import formula_estimate
from autotune.recipe import Recipe
from autotune.space import SearchSpace
from autotune.study.coverage import point_of
from autotune.study.settings import BudgetFit
from autotune.study.unmeasured import describe_unsupported


def supported_space(
    space: SearchSpace, architecture: Architecture | None, device: str | None = None
) -> tuple[SearchSpace, dict[str, dict[str, str]]]:
    """The space without the LoRA target sets, quantizations, losses and optimizers (on
    `device`), attention implementations and freeze train_modules the model cannot run, and why
    each left out; where
    none of a dimension's choices runs, what usually does (all-linear, eager, no quantization,
    the standard loss, adamw) takes their place, so a space written for the Llama family still
    searches Gemma 2 or GPT-NeoX; where no LoRA runs at all (peft refuses dropout on the stacked
    expert weights of a mixture of experts), the other methods are searched; so they are where
    method freeze cannot find the model's decoder blocks."""
    if architecture is None:
        return space, {}
    unsupported: dict[str, dict[str, str]] = {}
    methods = space.choices_of("method")
    # a target set is refused where any dropout the space tries is refused on it
    dropout = max(space.choices_of("lora_dropout"))
    target_names = space.choices_of("lora_target_modules")
    if "lora" in methods:
        for name in target_names:
            refusal = architecture.lora_refusal(space.target_sets[name], dropout)
            if refusal:
                unsupported.setdefault("lora_target_modules", {})[name] = refusal
    for choice in space.choices_of("attention"):
        refusal = architecture.attention_refusals.get(choice, "")
        if refusal:
            unsupported.setdefault("attention", {})[choice] = refusal
    for choice in space.choices_of("loss"):
        refusal = loss_refusal(choice, device)
        if refusal:
            unsupported.setdefault("loss", {})[choice] = refusal
    for choice in space.choices_of("optimizer"):
        refusal = optimizer_refusal(choice, device)
        if refusal:
            unsupported.setdefault("optimizer", {})[choice] = refusal
    if "freeze" in methods and "all" in architecture.freeze_refusals:
        unsupported.setdefault("method", {})["freeze"] = architecture.freeze_refusals["all"]
    elif "freeze" in methods:
        for choice in space.choices_of("train_modules"):
            refusal = architecture.freeze_refusals.get(choice, "")
            if refusal:
                unsupported.setdefault("train_modules", {})[choice] = refusal
    if "lora" in methods:
        for choice in space.choices_of("quantization"):
            refusal = architecture.quantization_refusal(choice, device)
            if refusal:
                unsupported.setdefault("quantization", {})[choice] = refusal
    if not unsupported:
        return space, {}
    refused = unsupported.get("lora_target_modules", {})
    kept_targets = tuple(n for n in target_names if n not in refused)
    target_sets = space.target_sets
    if not kept_targets and not architecture.lora_refusal("all-linear", dropout):
        kept_targets = ("all-linear",)
        target_sets = {**target_sets, "all-linear": "all-linear"}
    quantization = tuple(
        c for c in space.choices_of("quantization") if c not in unsupported.get("quantization", {})
    )
    changes: dict[str, tuple[Any, ...]] = {
        "lora_target_modules": kept_targets,
        "quantization": quantization or ("none",),
    }
    if not kept_targets:
        # no LoRA at all on this model with this space: search the other methods
        changes["quantization"] = ("none",)
        changes["lora_target_modules"] = target_names
        why = f"no LoRA target set runs on {architecture.name}"
        unsupported.setdefault("method", {})["lora"] = why
        for choice in space.choices_of("quantization"):
            if choice != "none":
                unsupported.setdefault("quantization", {}).setdefault(choice, "trains LoRA only")
    changes["method"] = tuple(m for m in methods if m not in unsupported.get("method", {}))
    if not changes["method"]:
        raise UsageError(
            f"{space.source}: no method of the space runs on {architecture.name} ("
            + describe_unsupported(
                {k: unsupported[k] for k in ("method", "lora_target_modules") if k in unsupported}
            )
            + ")"
        )
    attention = tuple(
        c for c in space.choices_of("attention") if c not in unsupported.get("attention", {})
    )
    changes["attention"] = attention or ("eager",)
    loss = tuple(c for c in space.choices_of("loss") if c not in unsupported.get("loss", {}))
    changes["loss"] = loss or ("standard",)
    optimizer = tuple(
        c for c in space.choices_of("optimizer") if c not in unsupported.get("optimizer", {})
    )
    changes["optimizer"] = optimizer or ("adamw",)
    modules = unsupported.get("train_modules", {})
    changes["train_modules"] = tuple(
        c for c in space.choices_of("train_modules") if c not in modules
    ) or ("all",)
    return space.restricted(changes, target_sets), unsupported


def distributed_space(
    space: SearchSpace,
    gpus_per_probe: tuple[int, ...],
    unsupported: dict[str, dict[str, str]],
    device: str = "cuda",
) -> SearchSpace:
    """The space on `gpus_per_probe` GPUs per probe (the counts to search, as settings hold them):
    num_gpus among those above 1, the distributed strategies that run on that many (every one
    probed here where the space names none) and, where 1 is among them, `none` on one GPU;
    without the choices a searched strategy (or, for offload, the CPU) cannot run with. Each
    left out choice is added to `unsupported` with its reason."""
    from autotune.distributed import DISTRIBUTED, combination_refusals, probe_refusal
    from autotune.recipe import Method

    def leave_out(name: str, choice: Any, why: str) -> None:
        unsupported.setdefault(name, {}).setdefault(str(choice), why)

    counts = gpus_per_probe
    several = tuple(c for c in counts if c > 1)
    named = space.choices_of("distributed")
    strategies: tuple[Any, ...] = ()
    if not several:
        for choice in named:
            if choice != "none":
                leave_out("distributed", choice, "needs --gpus-per-probe 2 or more")
    else:
        wanted = tuple(c for c in named if c != "none") or tuple(
            c for c in DISTRIBUTED if c != "none"
        )
        if "none" in named and 1 not in counts:
            leave_out("distributed", "none", f"one GPU, not {', '.join(map(str, counts))}")
        unprobed = {c: probe_refusal(Recipe(distributed=c, num_gpus=several[0])) for c in wanted}
        for choice, why in unprobed.items():
            if why:
                leave_out("distributed", choice, why)
        strategies = tuple(c for c in wanted if not unprobed[c])
        if not strategies:
            raise UsageError(f"{space.source}: no distributed strategy it names is probed")
    # (strategy, GPUs) pairs the study probes; a choice one of them cannot run is left out
    runs = [("none", 1)] if 1 in counts else []
    runs += [(strategy, several[0]) for strategy in strategies]
    changes: dict[str, tuple[Any, ...]] = {
        "distributed": tuple(strategy for strategy, _ in runs),
        "num_gpus": several or (1,),
    }
    shown = ", ".join(s for s, _ in runs)
    methods: tuple[tuple[str, Method], ...] = (
        ("quantization", "lora"),
        ("optimizer", "full"),
        ("loss", "full"),
        ("offload", "full"),
        ("precision", "full"),
    )
    for name, method in methods:
        kept = []
        for choice in space.choices_of(name):
            refusals = [
                why
                for strategy, gpus in runs
                for why in combination_refusals(
                    Recipe(method=method, distributed=strategy, num_gpus=gpus).replace(
                        **{name: choice}
                    )
                )
            ]
            if name == "offload" and choice != "none" and device == "cpu":
                refusals.append("offload moves GPU memory to the host; there is no GPU here")
            zero = [s for s in strategies if DISTRIBUTED[s].uses_deepspeed]
            if name == "precision" and choice == "fp16" and device == "cpu" and zero:
                refusals.append(
                    f"fp16 with {zero[0]} on the CPU: DeepSpeed's CPU accelerator has no fp16 "
                    "mode ('Type fp16 is not supported on your device')"
                )
            if refusals:
                leave_out(name, choice, refusals[0])
            else:
                kept.append(choice)
        if not kept:
            raise UsageError(f"{space.source}: no {name} choice runs with {shown} ({refusals[0]})")
        changes[name] = tuple(kept)
    micro = []
    for size in space.choices_of("micro_batch_size"):
        misfit = [gpus for gpus in counts if space.effective_batch_size % (size * gpus)]
        if misfit:
            leave_out(
                "micro_batch_size",
                size,
                f"x {misfit[0]} GPUs does not divide effective_batch_size "
                f"{space.effective_batch_size}",
            )
        else:
            micro.append(size)
    if not micro:
        raise UsageError(
            f"{space.source}: no micro_batch_size choice times {max(counts)} GPUs divides "
            f"effective_batch_size {space.effective_batch_size}"
        )
    changes["micro_batch_size"] = tuple(micro)
    return space.restricted(changes)


def margined_peak_bytes(
    spec: ModelSpec, recipe: Recipe, token_lengths: tuple[int, int] | None, margin: float | None
) -> int:
    """The formula's peak of `recipe` on the rows data whose examples span `token_lengths`
    gives its probe (formula_estimate), with the formula's margin (or the one given): what a
    study holds to the budget before any probe."""
    return with_formula_margin(formula_estimate(spec, recipe, token_lengths), recipe, margin)


def with_formula_margin(estimate: MemoryEstimate, recipe: Recipe, margin: float | None) -> int:
    """The formula's peak of `recipe` (its `estimate`) with the formula's margin (or the one
    given)."""
    return margin_for(margin, "formula", recipe.quantization).estimate_bytes(estimate)


Held = Callable[[Recipe], tuple[MemoryEstimate, str]]
"""The prediction a trial is held to the budget by and its memory model
(seeding.held_predictor)."""


def held_peak_bytes(recipe: Recipe, held: Held, margin: float | None) -> tuple[int, str]:
    """The peak with its margin that `held` predicts of `recipe`, and the model that gave it,
    as a trial of it is held to the budget."""
    estimate, used = held(recipe)
    return margin_for(margin, used, recipe.quantization).estimate_bytes(estimate), used


@dataclass(frozen=True)
class BudgetQuery:
    """Which recipes of a space fit a budget, as a study asks it before any trial: the space's
    recipes for `model` (`spec`, `seq_len`), their formula's peaks with its margin (or the one
    given) on the rows data whose examples, truncated at seq_len, span `token_lengths` gives
    its probes (None: seq_len-wide rows; NARROWEST_TOKEN_LENGTHS: the least peaks any data
    gives), and `held`, the model trials are held to (None: the formula's word is final)."""

    space: SearchSpace
    model: str
    spec: ModelSpec
    seq_len: int
    budget_bytes: int
    margin: float | None = None
    token_lengths: tuple[int, int] | None = None
    held: Held | None = None

    def recipe(self, params: dict[str, Any]) -> Recipe:
        return self.space.build(params, self.model, self.spec, self.seq_len)

    def formula_peak_bytes(self, params: dict[str, Any]) -> int:
        """The formula's peak of the recipe of `params`, with its margin (margined_peak_bytes)."""
        return margined_peak_bytes(self.spec, self.recipe(params), self.token_lengths, self.margin)


def smallest_peak_over_budget(query: BudgetQuery) -> tuple[int, str] | None:
    """Whether any recipe of the space fits the budget (predicted as budget_fit predicts
    them): None where one does, else the least peak of any and the model that gave it.
    A descent from each method's first point, one dimension at a time to whichever choice
    lowers the formula's peak, finds a recipe that fits in a few hundred predictions unless the
    budget is near the least peak; only where it finds none is the space sized by budget_fit,
    so that the answer is its: with `held` (the model trials are held to), a method stays where
    that model fits the least recipe of one of its choices."""
    space, budget_bytes, peak_of = query.space, query.budget_bytes, query.formula_peak_bytes
    for method in space.choices_of("method"):
        point = space.params_like({"method": method})
        peak = peak_of(point)
        lowered = True
        while peak > budget_bytes and lowered:
            lowered = False
            for name in [n for n in point if n != "method"]:
                for choice in space.choices_of(name) if name in point else ():
                    nearby = space.params_like({**point, name: choice})
                    nearby_peak = peak_of(nearby) if nearby != point else peak
                    if nearby_peak < peak:
                        point, peak, lowered = nearby, nearby_peak, True
        if peak <= budget_bytes:
            return None
    # none found: the whole space sized as budget_fit sizes it, each choice's least replayed
    fit = budget_fit(query)
    return None if fit.choices.get("method") else (fit.smallest_peak_bytes, fit.smallest_peak_model)


def budget_fit(query: BudgetQuery, progress: Callable[[int, int], None] | None = None) -> BudgetFit:
    """Predict every point of the space with the formula (milliseconds each), with its margin:
    a choice that only recipes over the budget use would only ever be ruled out, so the search
    need not spend trials on it. With `held`, the model trials are held to, a choice leaves only
    where that model agrees: the recipe the formula puts least of each choice it rules out is
    predicted by it (a replay of each, `progress` told (done, of) as they are), and where that
    fits the choice stays, with every choice of that recipe. The recipe the formula puts least
    of all is predicted by it too: the space's smallest_peak_bytes. Where the formula puts
    several recipes alike, the replay may put another of them lower: a choice it keeps is one
    some recipe fits, but one it rules out may still have a recipe that fits
    (docs/memory-model.md)."""
    space, budget_bytes, held = query.space, query.budget_bytes, query.held
    least: dict[tuple[str, Any], tuple[int, dict[str, Any]]] = {}
    for params in space.all_params():
        peak = query.formula_peak_bytes(params)
        for name, value in params.items():
            known = least.get((name, value))
            if known is None or peak < known[0]:
                least[(name, value)] = (peak, params)
    overall = min((least[key] for key in least if key[0] == "method"), key=lambda k: k[0])
    verdicts = {key: (peak, "formula") for key, (peak, _) in least.items() if peak > budget_bytes}
    kept = {key for key in least if key not in verdicts}
    smallest = (overall[0], "formula")
    if held is not None:
        # one prediction per recipe: the least of each choice ruled out, and the least of all
        points = {point_of(least[key][1]): least[key][1] for key in verdicts}
        points.setdefault(point_of(overall[1]), overall[1])
        predicted: dict[tuple[Any, ...], tuple[int, str]] = {}
        for done, (point, params) in enumerate(points.items()):
            if progress is not None:
                progress(done, len(points))
            predicted[point] = held_peak_bytes(query.recipe(params), held, query.margin)
            if predicted[point][0] <= budget_bytes:  # a recipe that fits: its choices stay
                kept.update(params.items())
        if progress is not None:
            progress(len(points), len(points))
        for key in verdicts:
            verdicts[key] = predicted[point_of(least[key][1])]
        smallest = predicted[point_of(overall[1])]
    fitting: dict[str, list[Any]] = {}
    ruled_out: dict[str, dict[str, int]] = {}
    models: dict[str, dict[str, str]] = {}
    for name, choices in space.choices().items():
        fitting[name] = [c for c in choices if (name, c) in kept]
        for choice in choices:
            if (name, choice) in verdicts and (name, choice) not in kept:
                ruled_out.setdefault(name, {})[str(choice)] = verdicts[(name, choice)][0]
                models.setdefault(name, {})[str(choice)] = verdicts[(name, choice)][1]
    return BudgetFit(smallest[0], fitting, ruled_out, models, smallest[1])
