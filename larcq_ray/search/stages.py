"""The search job's Ray Data stage: CLAP's text tower embeds query texts (an actor pool of one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from larcq_ray.core.stage import Batch, Resources


@dataclass
class ClapTextStage:
    model: str
    device: str
    dtype: str
    local_files_only: bool
    adapter: Optional[str] = None
    name: str = "embed_text"
    _encoder: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus="auto", actors=1)

    def setup(self) -> None:
        from larcq_ray.models.clap import ClapTextEncoder

        self._encoder = ClapTextEncoder(self.model, self.device, self.dtype, self.local_files_only,
                                        adapter=self.adapter)

    def process_batch(self, batch: Batch) -> Batch:
        out = self._encoder([str(t) for t in batch["text"]])
        emb = np.empty(len(out.embeddings), dtype=object)
        emb[:] = [e.astype(np.float32).tobytes() for e in out.embeddings]
        return {**batch, "embedding": emb, "truncated": out.truncated, "error": np.full(len(emb), "", dtype=object)}

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        n = len(batch["text"])
        emb = np.empty(n, dtype=object)
        emb[:] = b""
        return {**batch, "embedding": emb, "truncated": np.zeros(n, dtype=bool),
                "error": np.full(n, reason, dtype=object)}
