"""Default prompts for the two refine modes, and the template rule (`{query}` must be there).

A raw LARCQ query is the clip captions joined with ", " (lower-cased): a list of events in time
order. `condense` asks for one shorter fluent description; `rephrase` for the same events in other
words. Both ask for the rewrite only, because whatever else the model says ends up in the query
(`cleaning.py` strips the usual preambles, but a prompt that asks for less needs less cleaning).
"""

from __future__ import annotations

from typing import Literal

from larcq_ray.core.errors import LarcqError
from larcq_ray.models.causal_lm import check_prompt_template

Mode = Literal["condense", "rephrase"]
MODES: tuple[str, ...] = ("condense", "rephrase")

# Output file stem per mode: queries_condensed.csv / queries_rephrased.csv.
OUTPUT_STEM: dict[str, str] = {"condense": "queries_condensed", "rephrase": "queries_rephrased"}

CONDENSE_TEMPLATE = (
    "Below is a list of sound events heard one after another in a long audio recording, "
    "separated by commas:\n\n{query}\n\n"
    "Rewrite this list as a single fluent description that is shorter than the list. "
    "Keep every event, keep them in the same order, merge repeated or overlapping events, and do "
    "not add any sound, place or detail that is not in the list.\n"
    "Answer with the rewritten description only: no introduction, no quotes, no explanation."
)

REPHRASE_TEMPLATE = (
    "Below is a list of sound events heard one after another in a long audio recording, "
    "separated by commas:\n\n{query}\n\n"
    "Describe the same events in different words, in one or two sentences. Keep every event and "
    "their order, and do not add any sound, place or detail that is not in the list.\n"
    "Answer with the new description only: no introduction, no quotes, no explanation."
)

DEFAULT_PROMPTS: dict[str, str] = {"condense": CONDENSE_TEMPLATE, "rephrase": REPHRASE_TEMPLATE}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LarcqError(f"refine mode must be one of {list(MODES)}, got {mode!r}")
    return mode


def check_template(template: str, name: str = "refine prompt") -> str:
    """The template must contain `{query}` and format with it alone; return it unchanged."""
    return check_prompt_template(template, ("query",), name)


def build_prompt(template: str, query: str) -> str:
    """The template filled with the raw query (whitespace collapsed)."""
    return template.format(query=" ".join(query.split()))
