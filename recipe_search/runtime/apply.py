"""`apply_recipe`: check that a recipe belongs to this model, then attach its plan."""
from __future__ import annotations

from torch import nn

from ..models import ModelAdapter, get_adapter
from ..recipe.build import model_identity
from ..recipe.schema import Recipe, RecipeError
from .applier import PruningHandle
from .plan import PruningPlan
from .selection import make_rule


def plan_from_recipe(recipe: Recipe) -> PruningPlan:
    rule = make_rule(recipe.selection.rule, recipe.selection.params)
    stage = recipe.vision
    return PruningPlan(tuple(recipe.schedule.counts), recipe.schedule.visual_tokens, rule,
                       recipe.selection.score_layer,
                       vision=make_rule(stage.rule, stage.params) if stage is not None else None,
                       vision_layer=stage.encoder_layer if stage is not None else None,
                       images=recipe.selection.images)


def check_recipe_matches(adapter: ModelAdapter, recipe: Recipe, allow_other_checkpoint: bool = False) -> None:
    """Raise RecipeError unless the recipe was made for this model (or, if allowed, its architecture)."""
    mine = model_identity(adapter, str(getattr(adapter.model, "name_or_path", "")))
    theirs = recipe.model
    if mine.architecture_key() != theirs.architecture_key():
        raise RecipeError(
            f"recipe is for a {theirs.family} model with {theirs.num_layers} layers, hidden {theirs.hidden_size}, "
            f"{theirs.visual_tokens_per_image} visual tokens; this model is {mine.family} with {mine.num_layers} "
            f"layers, hidden {mine.hidden_size}, {mine.visual_tokens_per_image} visual tokens"
        )
    if mine.fingerprint != theirs.fingerprint and not allow_other_checkpoint:
        raise RecipeError(
            f"recipe was searched on checkpoint {theirs.fingerprint} ({theirs.name_or_path}), this model is "
            f"{mine.fingerprint}; allow_other_checkpoint=True (--allow-other-checkpoint) uses it anyway"
        )


def apply_recipe(model: nn.Module, recipe: Recipe, *, allow_other_checkpoint: bool = False) -> PruningHandle:
    """Attach `recipe` to `model`; returns a handle whose `remove()` restores the model exactly.

    The model must have the recipe's architecture; it must also be the very checkpoint the recipe
    was searched on unless `allow_other_checkpoint` is set (e.g. a fine-tune of the same base).
    """
    adapter = get_adapter(model)
    check_recipe_matches(adapter, recipe, allow_other_checkpoint)
    return PruningHandle(model, plan_from_recipe(recipe), adapter)
