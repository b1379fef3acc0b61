"""recipe-search: find, save and apply per-layer visual-token pruning recipes for multimodal LLMs.

`search(model, data, budget)` finds recipes; `apply_recipe(model, recipe)` applies one. Importing
the package (and applying a recipe) never imports the search code: `search` loads it on first use.
"""
from typing import Any

__version__ = "0.1.0"

from .recipe import Recipe, RecipeError, load_recipe, save_recipe  # noqa: E402
from .runtime.apply import apply_recipe  # noqa: E402

__all__ = ["Recipe", "RecipeError", "__version__", "apply_recipe", "load_recipe", "save_recipe", "search"]


def __getattr__(name: str) -> Any:
    if name == "search":
        from .api import search

        return search
    raise AttributeError(f"module 'recipe_search' has no attribute {name!r}")
