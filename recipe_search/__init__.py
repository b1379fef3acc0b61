"""recipe-search: find, save and apply per-layer visual-token pruning recipes for multimodal LLMs."""
__version__ = "0.1.0"

from .recipe import Recipe, RecipeError, load_recipe, save_recipe  # noqa: E402
from .runtime.apply import apply_recipe  # noqa: E402

__all__ = ["Recipe", "RecipeError", "__version__", "apply_recipe", "load_recipe", "save_recipe"]
