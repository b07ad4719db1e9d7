"""Name helpers shared by the API models and the data layer (no pydantic, cheap import)."""

from __future__ import annotations

import re


def model_label_value(model_name: str) -> str:
    """A valid label value for a model name: `org/model` -> `org--model`, max 63 chars."""
    v = model_name.replace("/", "--")
    v = re.sub(r"[^A-Za-z0-9._-]", "-", v)[:63]
    return v.strip("-_.") or "model"
