"""Recipes: the portable JSON file a search writes and the runtime applies."""
from .io import load_recipe, recipe_from_dict, save_recipe, write_atomic
from .schema import (
    FORMAT,
    FORMAT_VERSION,
    BudgetRecord,
    CalibrationRecord,
    MethodRecord,
    ModelIdentity,
    Recipe,
    RecipeError,
    Schedule,
    Selection,
    VisionSelection,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "BudgetRecord", "CalibrationRecord", "MethodRecord", "ModelIdentity",
           "Recipe", "RecipeError", "Schedule", "Selection", "VisionSelection", "load_recipe", "recipe_from_dict", "save_recipe",
           "write_atomic"]
