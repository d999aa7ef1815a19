"""The named templates, gathered from the family modules, and lookup by name."""

from __future__ import annotations

from tasks.core.errors import RecipeError
from tasks.templates.auto import AUTO
from tasks.templates.base import Template
from tasks.templates.families import chatml, deepseek, generic, google, meta, microsoft, mistral, others

FAMILIES = (generic, chatml, meta, mistral, google, microsoft, deepseek, others)


def collect(templates: list[Template]) -> dict[str, Template]:
    """Name -> template; a name declared twice is a programming error."""
    registry: dict[str, Template] = {}
    for template in templates:
        if template.name in registry:
            raise ValueError(f"template {template.name} is declared twice")
        registry[template.name] = template
    return registry


TEMPLATES: dict[str, Template] = collect([t for family in FAMILIES for t in family.TEMPLATES] + [AUTO])


def get_template(name: str) -> Template:
    """The template called name; a RecipeError listing the known names otherwise."""
    if name not in TEMPLATES:
        raise RecipeError(f"key 'template': unknown template '{name}' (known: {', '.join(sorted(TEMPLATES))})")
    return TEMPLATES[name]
