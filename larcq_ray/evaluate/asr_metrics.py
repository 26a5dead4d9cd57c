"""WER and CER for the ASR task, with jiwer, after the usual normalization.

Both sides are normalized the same way before scoring: lower case, punctuation removed (an
apostrophe is dropped in place, so "don't" and "dont" match; any other punctuation becomes a space),
whitespace collapsed. Figures are corpus-level, as the seed's leaderboard computes them: all edits
over all reference words (characters for CER, spaces included), not a mean of per-item rates. An
item whose normalized reference is empty cannot be scored and is counted apart.
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = text.replace("'", "").replace("\u2019", "")
    text = _PUNCT.sub(" ", text).replace("_", " ")
    return " ".join(text.split())


def asr_metrics(predictions: list[str], references: list[str]) -> dict:
    """{"wer", "cer", "n_items", "n_empty_reference", "substitutions", "deletions", "insertions",
    "ref_words", "normalization"}; wer / cer are None when no item has a non-empty reference."""
    import jiwer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    pairs = [(normalize_text(r), normalize_text(p)) for p, r in zip(predictions, references)]
    kept = [(r, h) for r, h in pairs if r]
    out = {"wer": None, "cer": None, "n_items": len(kept), "n_empty_reference": len(pairs) - len(kept),
           "substitutions": 0, "deletions": 0, "insertions": 0, "ref_words": 0,
           "normalization": "lower case, punctuation removed, whitespace collapsed", "library": _version()}
    if not kept:
        return out
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    out.update(wer=float(w.wer), cer=float(c.cer), substitutions=int(w.substitutions), deletions=int(w.deletions),
               insertions=int(w.insertions), ref_words=int(w.hits + w.substitutions + w.deletions))
    return out


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"jiwer {version('jiwer')}"
    except Exception:  # noqa: BLE001 - informational only
        return "jiwer"
