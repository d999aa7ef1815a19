"""LlamaFactory's own example recipes (tests/data/llamafactory_examples, vendored unchanged from
hiyouga/LLaMA-Factory@ff6d4d12 under its Apache-2.0 LICENSE): each either validates as a recipe, or is
refused in one line naming the key (the feature) TuneFactory does not have; recipes with image, video
or audio inputs are refused as such. Validation is the recipe's own (tasks.core.recipe) plus the
template name, without hub access."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tasks.core.errors import RecipeError
from tasks.core.recipe import MULTIMODAL_KEYS, Recipe
from tasks.templates import check_template
from tasks.templates.registry import MULTIMODAL

EXAMPLES = Path(__file__).parent / "data" / "llamafactory_examples"
RECIPES = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.parent.name != "multi_tokens")  # that one is a token list
MEDIA = "image/video/audio inputs are not supported yet"


def validate(values: dict, source: str) -> str | None:
    """None if the recipe validates, else the one-line refusal."""
    try:
        recipe = Recipe.from_flat(values, source=source)
        check_template(recipe.data.template)
    except RecipeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(EXAMPLES)) for p in RECIPES])
def test_example_validates_or_is_refused_by_name(path):
    values = yaml.safe_load(path.read_text())
    multimodal = bool(MULTIMODAL_KEYS & set(values)) or values.get("template") in MULTIMODAL
    refusal = validate(values, str(path.relative_to(EXAMPLES)))
    if multimodal:
        assert refusal is not None and MEDIA in refusal
    if refusal is not None:
        assert "\n" not in refusal
        named = re.search(r"key '([a-z0-9_]+)'", refusal)
        assert named and named.group(1) in values, refusal  # it names one of the recipe's own keys


def test_the_plain_lora_and_full_recipes_validate():
    for name in ("train_lora/qwen3_lora_sft.yaml", "train_lora/qwen3_lora_dpo.yaml", "train_lora/qwen3_lora_kto.yaml",
                 "train_lora/qwen3_lora_reward.yaml", "train_lora/qwen3_lora_pretrain.yaml",
                 "merge_lora/qwen3_lora_sft.yaml", "inference/qwen3.yaml", "inference/qwen3_lora_sft.yaml"):
        values = yaml.safe_load((EXAMPLES / name).read_text())
        assert validate(values, name) is None, name
