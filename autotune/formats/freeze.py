"""A freeze recipe in other trainers' terms, from the model's FreezeLayout (the names training's
own freeze selection gives): axolotl's unfrozen_parameters, LLaMA-Factory's freeze_* keys, and
regular expressions for a Trainer script."""

from __future__ import annotations

import re
from typing import Any

from autotune.recipe import Recipe
from autotune.training.freeze import FreezeLayout, llama_layout


def layout_or_llama(
    recipe: Recipe, layout: FreezeLayout | None, num_layers: int | None, tied_head: bool | None
) -> FreezeLayout:
    """The model's layout as its study stored it; for a study from before it did, the Llama
    family's (with the study's num_layers, else one block above the frozen ones)."""
    return layout or llama_layout(num_layers or recipe.frozen_layers + 1, tied_head)


def _trained_names(recipe: Recipe, layout: FreezeLayout) -> tuple[list[str], tuple[str, ...]]:
    """(modules that train whole, parameters outside the blocks that train)."""
    modules = layout.trained_modules(recipe.frozen_layers, recipe.train_modules)
    return modules, layout.trained_outside


def unfrozen_parameters(recipe: Recipe, layout: FreezeLayout) -> list[str]:
    """axolotl's unfrozen_parameters. axolotl matches each pattern at the start of a parameter's
    name and takes every `.` not followed by `+` as a literal dot (LayerNamePattern,
    src/axolotl/utils/freeze.py): so they are written with plain dots, a module's ending in
    `.` (every parameter under it), a parameter's in `$`."""
    modules, parameters = _trained_names(recipe, layout)
    return [f"^{module}." for module in modules] + [f"^{name}$" for name in parameters]


def trainable_parameters(recipe: Recipe, layout: FreezeLayout) -> list[str]:
    """The same selection as Python regular expressions, for `re.match` over a Trainer model's
    named_parameters(): what trains, everything else frozen."""
    modules, parameters = _trained_names(recipe, layout)
    return [rf"^{re.escape(module)}\." for module in modules] + [
        rf"^{re.escape(name)}$" for name in parameters
    ]


def _llamafactory_extra(layout: FreezeLayout, unknown_head: bool) -> list[str]:
    """freeze_extra_modules: the last names of the modules outside the blocks that train, where
    that name is no other parameter's (LLaMA-Factory matches it by substring)."""
    modules = dict.fromkeys(name.rpartition(".")[0] for name in layout.trained_outside)
    extra = [m.rpartition(".")[2] for m in modules if m not in layout.ambiguous_outside]
    return [name for name in extra if not (unknown_head and name == "lm_head")]


def llamafactory_freeze_keys(
    recipe: Recipe, layout: FreezeLayout, unknown_head: bool = False
) -> dict[str, Any]:
    """LLaMA-Factory's freeze_trainable_layers (it counts the trainable blocks from the top),
    freeze_trainable_modules (the blocks' part names, or all) and freeze_extra_modules.
    `unknown_head`: the study did not record whether the head is tied (lm_head left out)."""
    keys: dict[str, Any] = {"freeze_trainable_layers": layout.num_layers - recipe.frozen_layers}
    if recipe.train_modules == "all":
        keys["freeze_trainable_modules"] = "all"
    else:
        names = layout.parts[recipe.train_modules][recipe.frozen_layers :]
        keys["freeze_trainable_modules"] = ",".join(dict.fromkeys(names))
    extra = _llamafactory_extra(layout, unknown_head)
    if extra:
        keys["freeze_extra_modules"] = ",".join(extra)
    return keys


def llamafactory_freeze_notes(layout: FreezeLayout, unknown_head: bool) -> list[str]:
    """What LLaMA-Factory's freeze cannot train of autotune's: a module outside the blocks whose
    name is part of other parameters' names (Llama's final `norm`, in every block's norms)."""
    notes = [
        f"# freeze: LLaMA-Factory cannot train {module} alone (freeze_extra_modules: "
        f"{module.rpartition('.')[2]} would match other parameters' names too), which autotune "
        "trained: it stays frozen here"
        for module in layout.ambiguous_outside
    ]
    if unknown_head:
        notes.append(
            "# freeze: the study did not record whether the output head is tied; if it is not, "
            "add freeze_extra_modules: lm_head (autotune trained it)"
        )
    return notes
