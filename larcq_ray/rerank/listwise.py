"""Listwise LM re-ranking, shared by the transformers and vLLM backends.

The method (LARCQ): one prompt shows the query and N candidate descriptions, each behind a short
label, and asks which description is closest to the query, answered with one label. Rather than
parse generated text, we read the model's next-token distribution at the answer position: the
softmax over the N label tokens' logits is each candidate's score, so every candidate gets one.

Labels are scored WITHOUT a leading space: a chat template ends at the start of the assistant turn
and a plain prompt ends with a newline (see `render`), so a bare label is the natural next token.

Requests with more candidates than `max_docs` are split into balanced groups (sizes differ by at
most one), each group is its own prompt, and a candidate's score is its probability within its
group. Why probabilities and balanced groups: the tests and the fusion downstream expect scores in
[0, 1]; raw label log-probabilities are no more comparable across prompts (they also absorb how
much mass the model puts on non-label tokens), while equal group sizes give every group the same
uniform baseline 1/k. Limitation, accepted: a strong candidate in a weak group scores higher than
an equally strong one that shares its group with a better candidate.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.models.causal_lm import check_prompt_template

DEFAULT_TEMPLATE = (
    "Query (a description of a long audio recording):\n{query}\n\n"
    "Candidate descriptions, each after its label:\n{candidates}\n\n"
    "Which candidate description matches the query best? Reply with its label and nothing else."
)

# Digits first (single tokens in every tokenizer we know), then capital letters: 35 labels.
LABEL_ALPHABET: tuple[str, ...] = tuple("123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")

Request = tuple[str, list[str]]
# (prompts, number of candidates in each) -> one score array per prompt, of that length
LabelScorer = Callable[[list[str], list[int]], list[np.ndarray]]
# (query, documents, labels) -> the model-ready prompt text
Renderer = Callable[[str, list[str], list[str]], str]


def check_template(template: str) -> str:
    """The template must format with exactly {query} and {candidates}; return it unchanged."""
    return check_prompt_template(template, ("query", "candidates"), "rerank prompt_template")


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def labels_for(n: int, tokenizer: Any) -> list[str]:
    """The first n labels ("1".."9", then "A".."Z"); each must be one token for this tokenizer."""
    if n > len(LABEL_ALPHABET):
        raise LarcqError(f"at most {len(LABEL_ALPHABET)} documents per listwise prompt, "
                         f"got max_documents_per_prompt={n}")
    labels = list(LABEL_ALPHABET[:n])
    bad = [label for label in labels if _single_token_id(tokenizer, label) is None]
    if bad:
        raise LarcqError(f"labels {bad} are not single tokens for this tokenizer; "
                         "lower max_documents_per_prompt or use another model")
    return labels


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    """Token id of each label (no leading space); distinct single tokens or LarcqError."""
    ids = [_single_token_id(tokenizer, label) for label in labels]
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise LarcqError(f"labels {list(labels)} do not map to distinct single tokens")
    return [int(i) for i in ids]  # type: ignore[arg-type]


def build_prompt(query: str, documents: Sequence[str], template: str, labels: Sequence[str]) -> str:
    """The template filled with the query and one "label. description" line per document."""
    if len(labels) < len(documents):
        raise LarcqError(f"{len(documents)} documents but only {len(labels)} labels")
    # One line per candidate: newlines inside a caption would blur where candidates start.
    lines = [f"{label}. {' '.join(doc.split())}" for label, doc in zip(labels, documents)]
    return template.format(query=query.strip(), candidates="\n".join(lines))


def render(tokenizer: Any, prompt: str) -> str:
    """Chat template (user turn + assistant start) if the tokenizer has one, else prompt + newline.

    The rule lives in `larcq_ray.models.causal_lm.render_chat`, shared with the query refiner.
    """
    from larcq_ray.models.causal_lm import render_chat

    return render_chat(tokenizer, prompt)


def scores_from_logits(logits_at_labels: np.ndarray) -> np.ndarray:
    """Softmax over the label tokens' logits (last axis)."""
    x = np.asarray(logits_at_labels, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def scores_from_logprobs(logprob_by_token: dict[int, float], label_ids: Sequence[int],
                         floor: float = -100.0) -> np.ndarray:
    """Label probabilities from a (possibly top-k only) logprob map; missing labels get `floor`."""
    raw = np.array([logprob_by_token.get(t, floor) for t in label_ids], dtype=np.float64)
    # -inf / NaN (a masked token) count as missing too, so the softmax stays finite.
    raw = np.where(np.isfinite(raw), np.maximum(raw, floor), floor)
    return scores_from_logits(raw)


def split_groups(n: int, max_docs: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering n documents in balanced groups of at most max_docs."""
    if n == 0:
        return []
    k = math.ceil(n / max_docs)
    size, extra = divmod(n, k)
    out, start = [], 0
    for g in range(k):
        stop = start + size + (1 if g < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def score_requests(requests: Sequence[Request], max_docs: int, labels: Sequence[str],
                   render_prompt: Renderer, label_scores: LabelScorer) -> list[list[float]]:
    """Score every request: one prompt per document group, all prompts of the batch in one call.

    `render_prompt` turns (query, group documents, group labels) into model text; `label_scores`
    maps those prompts to per-prompt probability arrays (the backend-specific part).
    """
    plan = [(r, s, e) for r, (_, docs) in enumerate(requests) for s, e in split_groups(len(docs), max_docs)]
    out: list[list[float]] = [[0.0] * len(docs) for _, docs in requests]
    if not plan:
        return out
    prompts = [render_prompt(requests[r][0], requests[r][1][s:e], list(labels[: e - s])) for r, s, e in plan]
    scores = label_scores(prompts, [e - s for _, s, e in plan])
    for (r, s, e), group in zip(plan, scores):
        out[r][s:e] = [float(v) for v in group]
    return out
