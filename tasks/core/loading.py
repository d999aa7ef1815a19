"""How a model artifact asks to be loaded: the options it records in its manifest info, which every
`from_pretrained` of it passes (the model stage imported it with them; merge passes them on)."""

from __future__ import annotations

from typing import Any


def remote_code(artifact: Any) -> dict[str, bool]:
    """trust_remote_code as the model was imported with (its code is saved in the artifact)."""
    return {"trust_remote_code": bool(artifact.info.get("trust_remote_code"))}
