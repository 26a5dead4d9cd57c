"""larcq_ray's model card: a small JSON file in a model folder saying how the model was built and
whether it was trained (search reads it to warn in the report when weights are random)."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_CARD = "larcq_model_card.json"


def read_model_card(name_or_path: str) -> dict:
    """The larcq_ray model card of a local model folder, or {} (hub models have none)."""
    p = Path(name_or_path) / MODEL_CARD
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}
