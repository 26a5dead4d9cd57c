"""The caption job's two Ray Data stages.

1. `DecodeWindowStage` (CPU tasks): decode + resample to the captioner's rate, cut back-to-back
   windows of `window_s` covering the whole file. One row per window, or one `failed` row per file.
2. `CaptionStage` (actor pool, one model per actor, a GPU each where the cluster has GPUs):
   windows -> captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from larcq_ray.caption.windows import caption_windows
from larcq_ray.core.stage import Batch, Resources


def _columns(rows: list[dict]) -> Batch:
    return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], (str, bytes)) else None)
            for k in rows[0]}


def _failed_row(audio_id: str, error: str, duration_s: float = 0.0) -> dict:
    return {"audio_id": audio_id, "chunk_index": -1, "start_s": 0.0, "end_s": float(duration_s), "n_rows": 1,
            "samples": b"", "status": "failed", "error": error}


@dataclass
class DecodeWindowStage:
    sample_rate: int
    window_s: float
    silence_threshold_db: float
    memory_mb: int = 256
    name: str = "decode"

    def resources(self) -> Resources:
        # Distinct remote args keep Ray Data from fusing decoding into the (GPU) model actor.
        return Resources(cpus=1, memory_mb=self.memory_mb)

    def setup(self) -> None:
        pass

    def process_batch(self, batch: Batch) -> Batch:
        from larcq_ray.core.audio import decode_audio

        rows: list[dict] = []
        for audio_id, path in zip(batch["audio_id"], batch["path"]):
            audio_id, path = str(audio_id), str(path)
            try:
                dec = decode_audio(path, self.sample_rate, self.silence_threshold_db)
                if dec.status != "ok":
                    rows.append(_failed_row(audio_id, dec.error, dec.duration_s))
                    continue
                x = dec.samples
                spans = caption_windows(len(x), self.sample_rate, self.window_s)
                for i, (s, e) in enumerate(spans):
                    rows.append({"audio_id": audio_id, "chunk_index": i, "start_s": s / self.sample_rate,
                                 "end_s": e / self.sample_rate, "n_rows": len(spans),
                                 "samples": x[s:e].tobytes(), "status": "ok", "error": ""})
            except Exception as e:  # a bug or odd file must cost one file, never the job
                rows.append(_failed_row(audio_id, f"internal: {type(e).__name__}: {e}"[:300]))
        return _columns(rows)

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return _columns([_failed_row(str(a), reason) for a in batch["audio_id"]])


@dataclass
class CaptionStage:
    backend: dict  # CaptionBackendConfig fields
    actors: int
    cpus: float
    gpus: Union[float, str]
    torch_threads: Optional[int] = None
    name: str = "caption"
    _backend: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, actors=self.actors, torch_threads=self.torch_threads)

    def setup(self) -> None:
        from larcq_ray.caption.backends import build_caption_backend
        from larcq_ray.caption.config import CaptionBackendConfig

        self._backend = build_caption_backend(CaptionBackendConfig(**self.backend))

    def process_batch(self, batch: Batch) -> Batch:
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        captions = np.empty(len(status), dtype=object)
        captions[:] = ""
        ok = np.flatnonzero(status == "ok")
        if len(ok):
            texts = self._backend.caption([np.frombuffer(batch["samples"][i], dtype=np.float32) for i in ok])
            for i, t in zip(ok, texts):
                captions[i] = t
                if not t:
                    status[i], error[i] = "failed", "caption: the model generated no text"
        out = {k: v for k, v in batch.items() if k != "samples"}
        out.update(status=status, error=error, caption=captions)
        return out

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        was_ok = status == "ok"  # rows that failed earlier keep their own reason
        status[was_ok], error[was_ok] = "failed", reason
        captions = np.empty(len(status), dtype=object)
        captions[:] = ""
        out = {k: v for k, v in batch.items() if k != "samples"}
        out.update(status=status, error=error, caption=captions)
        return out
