"""Named chat templates, one module per family; each module lists its templates in TEMPLATES."""
