"""What `chat`, `api` and `eval` accept: a recipe file, or a model folder (a Hugging Face checkpoint, such as
a merged or exported model) read as a recipe that trains nothing."""

from __future__ import annotations

from pathlib import Path

from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe, load_recipe, parse_override


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def source_recipe(source: str, overrides: list[str]) -> Recipe:
    """The recipe file with its overrides, or a model folder as a recipe with do_train false."""
    path = Path(source)
    if path.is_file():
        return load_recipe(path, overrides)
    if not is_model_folder(path):
        raise RecipeError(f"{source}: neither a recipe file nor a model folder (no config.json)")
    values = {"model_name_or_path": str(path.resolve()), "do_train": False, **dict(map(parse_override, overrides))}
    # No template: the folder's own chat template (auto) when its tokenizer has one, else empty.
    return Recipe.from_flat(values, source=str(path))
