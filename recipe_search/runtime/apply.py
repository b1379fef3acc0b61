"""`apply_recipe`: check that a recipe belongs to this model, then attach its plan."""
from __future__ import annotations

import os

from torch import nn

from ..models import ModelAdapter, get_adapter
from ..recipe.identity import model_identity
from ..recipe.io import load_recipe, validate_recipe
from ..recipe.schema import MAX_ECHO, ModelIdentity, Recipe, RecipeError, echo, one_line
from .applier import PruningHandle
from .plan import PruningPlan
from .selection import make_rule
from .vision import resolve_encoder_layer


def plan_from_recipe(recipe: Recipe) -> PruningPlan:
    rule = make_rule(recipe.selection.rule, recipe.selection.params)
    stage = recipe.vision
    return PruningPlan(tuple(recipe.schedule.counts), recipe.schedule.visual_tokens, rule,
                       recipe.selection.score_layer,
                       vision=make_rule(stage.rule, stage.params) if stage is not None else None,
                       vision_layer=stage.encoder_layer if stage is not None else None,
                       images=recipe.selection.images, merge_threshold=recipe.selection.merge_threshold)


def check_recipe_matches(adapter: ModelAdapter, recipe: Recipe, allow_other_checkpoint: bool = False) -> None:
    """Raise RecipeError (one line, naming the field) unless the recipe is valid and was made for this
    model (or, if allowed, its architecture), and fits what only the model can tell."""
    validate_recipe(recipe)  # a recipe built or edited in Python gets the checks load_recipe makes
    mine = model_identity(adapter, str(getattr(adapter.model, "name_or_path", "")))
    theirs = recipe.model
    differs = mine.architecture_mismatch(theirs)
    if differs is not None:
        def summary(m: ModelIdentity) -> str:
            return (f"{one_line(m.family, MAX_ECHO)} model with {m.num_layers} layers, hidden {m.hidden_size}, "
                    f"{m.visual_tokens_per_image} visual tokens")

        raise RecipeError(f"model.{differs}: recipe is for a {summary(theirs)}; this model is a {summary(mine)} "
                          f"({differs}: recipe {echo(getattr(theirs, differs))}, model {echo(getattr(mine, differs))})")
    if mine.fingerprint != theirs.fingerprint and not allow_other_checkpoint:
        raise RecipeError(
            f"model.fingerprint: recipe was searched on checkpoint {one_line(theirs.fingerprint, MAX_ECHO)} "
            f"({one_line(theirs.name_or_path, MAX_ECHO)}), this model is {mine.fingerprint}; "
            "allow_other_checkpoint=True (--allow-other-checkpoint) uses it anyway"
        )
    _check_fits(adapter, recipe)


def _check_fits(adapter: ModelAdapter, recipe: Recipe) -> None:
    """What only the model can tell: its layer count, its per-image visual tokens, its vision tower."""
    layers = len(adapter.decoder_layers())
    if len(recipe.schedule.counts) != layers:
        raise RecipeError(f"schedule.counts: {len(recipe.schedule.counts)} layers, this model has {layers}")
    per_image = adapter.visual_tokens_per_image()
    if per_image is not None and recipe.schedule.visual_tokens != per_image:
        raise RecipeError(f"schedule.visual_tokens: {recipe.schedule.visual_tokens}, this model gives {per_image} "
                          "visual tokens per image")
    if recipe.vision is not None:
        try:
            layout = adapter.vision_layout()
        except ValueError as exc:
            raise RecipeError(f"vision.rule: {exc}") from None
        try:
            resolve_encoder_layer(layout, recipe.vision.encoder_layer)
        except ValueError as exc:
            raise RecipeError(f"vision.encoder_layer: {exc}") from None


def apply_recipe(model: nn.Module, recipe: Recipe | str | os.PathLike, *,
                 allow_other_checkpoint: bool = False) -> PruningHandle:
    """Attach `recipe` (a Recipe or a recipe file's path) to `model`; returns a handle whose
    `remove()` restores the model exactly.

    The model must have the recipe's architecture; it must also be the very checkpoint the recipe
    was searched on unless `allow_other_checkpoint` is set (e.g. a fine-tune of the same base).
    Every problem with the recipe, including what only the model can tell, is a one-line RecipeError.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    adapter = get_adapter(model)
    check_recipe_matches(adapter, recipe, allow_other_checkpoint)
    return PruningHandle(model, plan_from_recipe(recipe), adapter)
