"""Recipes: settings parsed from TOML (`settings`), the changes they make to the model
(`transforms`), how each stage runs (`compile`), and the stages and pipeline they build
(`build`): `build_pipeline(model, recipe)` is the one road from a loaded model to a pipeline.
"""

from gsopt.recipe.build import apply, build_pipeline
from gsopt.recipe.settings import Recipe, builtin_recipes, load_recipe
from gsopt.recipe.transforms import changes_model

__all__ = ["Recipe", "apply", "build_pipeline", "builtin_recipes", "changes_model", "load_recipe"]
