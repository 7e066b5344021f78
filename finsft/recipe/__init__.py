"""Stage 1 of a run: load and validate a recipe (syntax, extends, overrides, schema, cross-field rules).

Light on purpose: jsonschema and the standard library only (never torch/transformers/trl/peft), so that
``finsft validate`` is fast and CI-friendly.
"""

from finsft.recipe.loading import check_recipe, expand_paths, load_recipe, parse_override, recipe_from_dict
from finsft.recipe.model import Recipe
from finsft.recipe.paths import PACKAGE_PREFIX, PATH_FIELDS, is_local_path
from finsft.recipe.schema import apply_defaults, describe_allowed, json_type, required_keys, schema

__all__ = [
    "PACKAGE_PREFIX", "PATH_FIELDS", "Recipe", "apply_defaults", "check_recipe", "describe_allowed",
    "expand_paths", "is_local_path", "json_type", "load_recipe", "parse_override", "recipe_from_dict", "required_keys",
    "schema",
]
