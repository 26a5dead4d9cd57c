"""The index job's two Ray Data stages.

1. `DecodeChunkStage` (CPU tasks): decode + resample to the model's rate, cut chunks, compute
   CLAP mel features. One row per chunk (+ one whole-file row), or one `failed` row per file.
2. `ClapEmbedStage` (actor pool, one model per actor, a GPU each where the cluster has GPUs):
   features -> L2-normalized embeddings.

Every row carries audio_id, n_rows (rows of its file), status and error, so the driver can
regroup files and no row is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from larcq_ray.core.stage import Batch, Resources


def _failed_row(audio_id: str, decoded=None, error: str = "") -> dict:
    return {
        "audio_id": audio_id,
        "kind": "failed",
        "chunk_index": -2,
        "start_s": 0.0,
        "end_s": 0.0,
        "features": b"",
        "feat_shape": np.zeros(3, dtype=np.int64),
        "is_longer": False,
        "duration_s": float(getattr(decoded, "duration_s", 0.0)),
        "sample_rate": int(getattr(decoded, "sample_rate", 0)),
        "channels": int(getattr(decoded, "channels", 0)),
        "n_rows": 1,
        "n_chunks": 0,
        "status": "failed",
        "error": error or getattr(decoded, "error", ""),
        "warning": "; ".join(getattr(decoded, "warnings", [])),
    }


def columns(rows: list[dict]) -> Batch:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if isinstance(vals[0], np.ndarray):
            out[k] = np.stack(vals)
        else:
            out[k] = np.asarray(vals, dtype=object if isinstance(vals[0], (str, bytes)) else None)
    return out


@dataclass
class DecodeChunkStage:
    model: str
    fusion_seed: int
    local_files_only: bool
    chunking: dict
    whole_file: bool
    silence_threshold_db: float
    memory_mb: int
    name: str = "decode"
    _fz: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        # Memory is declared so the scheduler packs decode tasks by memory too (a 150 s file at
        # 48 kHz plus its features is ~0.1 GB). It also keeps this stage's remote args distinct
        # from the actor's, so Ray Data never fuses decoding into the (GPU) model actor.
        return Resources(cpus=1, memory_mb=self.memory_mb)

    def setup(self) -> None:
        from larcq_ray.models.clap import cached_featurizer

        self._fz = cached_featurizer(self.model, self.fusion_seed, self.local_files_only)

    def process_batch(self, batch: Batch) -> Batch:
        from larcq_ray.core.audio import decode_audio
        from larcq_ray.index.chunking import chunk_spans

        fz, ch = self._fz, self.chunking
        rows: list[dict] = []
        for audio_id, path in zip(batch["audio_id"], batch["path"]):
            audio_id, path = str(audio_id), str(path)
            try:
                dec = decode_audio(path, fz.sample_rate, self.silence_threshold_db)
                if dec.status != "ok":
                    rows.append(_failed_row(audio_id, dec))
                    continue
                x, sr = dec.samples, fz.sample_rate
                if ch["mode"] == "none":
                    spans, with_whole = [], True  # the whole file is the one embedding
                else:
                    spans = chunk_spans(len(x), sr, ch["mode"], ch["window_s"], ch["overlap_s"], ch["min_chunk_s"])
                    with_whole = self.whole_file
                pieces = ([(-1, 0, len(x))] if with_whole else []) + [(i, s, e) for i, (s, e) in enumerate(spans)]
                common = {
                    "duration_s": dec.duration_s, "sample_rate": dec.sample_rate, "channels": dec.channels,
                    "n_rows": len(pieces), "n_chunks": len(spans), "status": "ok", "error": "",
                    "warning": "; ".join(dec.warnings),
                }
                for idx, s, e in pieces:
                    f = fz(x[s:e])
                    # Fusion input repeats one mel 4x unless the clip was really fused: ship it once.
                    feats = f.input_features if f.is_longer else f.input_features[:1]
                    rows.append({
                        "audio_id": audio_id, "kind": "whole" if idx < 0 else "chunk", "chunk_index": idx,
                        "start_s": s / sr, "end_s": e / sr,
                        "features": feats.tobytes(),
                        "feat_shape": np.asarray(feats.shape, dtype=np.int64),
                        "is_longer": f.is_longer, **common,
                    })
            except Exception as e:  # a bug or odd file must cost one file, never the job
                rows.append(_failed_row(audio_id, error=f"internal: {type(e).__name__}: {e}"[:300]))
        return columns(rows)

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return columns([_failed_row(str(a), error=reason) for a in batch["audio_id"]])


@dataclass
class ClapEmbedStage:
    model: str
    device: str
    dtype: str
    local_files_only: bool
    adapter: Optional[str]
    actors: int
    cpus: float
    gpus: Union[float, str]
    torch_threads: Optional[int]
    name: str = "embed"
    _encoder: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, actors=self.actors, torch_threads=self.torch_threads)

    def setup(self) -> None:
        from larcq_ray.models.clap import ClapAudioEncoder

        self._encoder = ClapAudioEncoder(self.model, self.device, self.dtype, self.local_files_only,
                                         adapter=self.adapter)
        self._channels = 4 if self._encoder.model.config.audio_config.enable_fusion else 1

    def _features(self, raw: bytes, shape) -> np.ndarray:
        f = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        return np.repeat(f, self._channels, axis=0) if f.shape[0] == 1 and self._channels > 1 else f

    def process_batch(self, batch: Batch) -> Batch:
        ok = np.flatnonzero(batch["status"] == "ok")
        emb_bytes = np.empty(len(batch["status"]), dtype=object)
        emb_bytes[:] = b""
        if len(ok):
            feats = np.stack([self._features(batch["features"][i], batch["feat_shape"][i]) for i in ok])
            emb = self._encoder(feats, batch["is_longer"][ok])
            for j, i in enumerate(ok):
                emb_bytes[i] = emb[j].astype(np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k not in ("features", "feat_shape")}
        out["embedding"] = emb_bytes
        return out

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        out = {k: v for k, v in batch.items() if k not in ("features", "feat_shape")}
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        was_ok = status == "ok"  # rows that failed earlier keep their own reason
        status[was_ok], error[was_ok] = "failed", reason
        emb = np.empty(len(status), dtype=object)
        emb[:] = b""
        out.update(status=status, error=error, embedding=emb)
        return out
