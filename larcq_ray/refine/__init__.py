"""`refine`: rewrite raw LARCQ queries with an LLM (condense | rephrase), checked, on Ray Data.

Modules: prompts (templates), cleaning (strip LLM wrappers), checks (flag lost events),
engines (transformers | vllm | hook), config (RefineConfig), pipeline (run_refine).
Importing this package stays cheap: torch / transformers / ray load inside functions, and
run_refine is imported from refine.pipeline (the pipeline config imports this package).
"""

from larcq_ray.refine.cleaning import clean_output
from larcq_ray.refine.config import RefineConfig
from larcq_ray.refine.prompts import DEFAULT_PROMPTS, MODES

__all__ = ["RefineConfig", "clean_output", "DEFAULT_PROMPTS", "MODES"]
