"""Index job: corpus -> Ray Data (decode, chunk, featurize | embed) -> Parquet index.

Stages, streaming end to end:
1. `decode_and_featurize` (CPU tasks): decode + resample to the model's rate, cut chunks,
   compute CLAP mel features. One row per chunk (+ one whole-file row), or one `failed` row.
2. `ClapEmbedStage` (actor pool, one model per actor, a GPU each where the cluster has GPUs):
   features -> L2-normalized embeddings.
3. The driver regroups rows by file (map_batches does not keep order) and commits a Parquet
   part every `commit_every_files` complete files, so a re-run resumes where this one stopped.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from larcq_ray.config import PipelineConfig
from larcq_ray.errors import LarcqError
from larcq_ray.index_store import IndexStore
from larcq_ray.inputs import AudioRef, list_corpus

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _featurizer(name_or_path: str, fusion_seed: int, local_files_only: bool):
    from larcq_ray.clap import AudioFeaturizer

    return AudioFeaturizer(name_or_path, fusion_seed, local_files_only)  # once per worker process


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


def decode_and_featurize(batch: dict, *, model: str, fusion_seed: int, local_files_only: bool,
                         chunking: dict, whole_file: bool, silence_threshold_db: float) -> dict:
    """Ray Data batch fn: files in, one row per chunk (features as float32 bytes) out."""
    from larcq_ray.audio import decode_audio
    from larcq_ray.chunking import chunk_spans

    fz = _featurizer(model, fusion_seed, local_files_only)
    rows: list[dict] = []
    for audio_id, path in zip(batch["audio_id"], batch["path"]):
        audio_id, path = str(audio_id), str(path)
        try:
            dec = decode_audio(path, fz.sample_rate, silence_threshold_db)
            if dec.status != "ok":
                rows.append(_failed_row(audio_id, dec))
                continue
            x, sr = dec.samples, fz.sample_rate
            if chunking["mode"] == "none":
                spans, with_whole = [], True  # the whole file is the one embedding
            else:
                spans = chunk_spans(len(x), sr, chunking["mode"], chunking["window_s"],
                                    chunking["overlap_s"], chunking["min_chunk_s"])
                with_whole = whole_file
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
        except Exception as e:  # a bug or odd file must cost one row, never the job
            rows.append(_failed_row(audio_id, error=f"internal: {type(e).__name__}: {e}"[:300]))
    return _columns(rows)


def _columns(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        out[k] = np.stack(vals) if isinstance(vals[0], np.ndarray) else np.asarray(vals, dtype=object if isinstance(vals[0], (str, bytes)) else None)
    return out


class ClapEmbedStage:
    """Actor: loads CLAP once, embeds batches of chunk features."""

    def __init__(self, model: str, device: str, dtype: str, local_files_only: bool, torch_threads: int | None,
                 adapter: str | None = None):
        import torch

        from larcq_ray.clap import ClapAudioEncoder

        if torch_threads:
            torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=num_cpus (1) for actors
        self.encoder = ClapAudioEncoder(model, device, dtype, local_files_only, adapter=adapter)
        self.channels = 4 if self.encoder.model.config.audio_config.enable_fusion else 1

    def _features(self, raw: bytes, shape) -> np.ndarray:
        f = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        return np.repeat(f, self.channels, axis=0) if f.shape[0] == 1 and self.channels > 1 else f

    def __call__(self, batch: dict) -> dict:
        kinds = batch["kind"]
        ok = np.flatnonzero(kinds != "failed")
        emb_bytes = np.empty(len(kinds), dtype=object)
        emb_bytes[:] = b""
        if len(ok):
            feats = np.stack([self._features(batch["features"][i], batch["feat_shape"][i]) for i in ok])
            emb = self.encoder(feats, batch["is_longer"][ok])
            for j, i in enumerate(ok):
                emb_bytes[i] = emb[j].astype(np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k not in ("features", "feat_shape")}
        out["embedding"] = emb_bytes
        return out


@dataclass
class IndexSummary:
    indexed: int = 0
    failed: int = 0
    skipped: int = 0  # already in the index from an earlier run
    chunks: int = 0
    reasons: Counter = field(default_factory=Counter)
    warnings: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{self.indexed} indexed, {self.failed} failed"
               + (f", {self.skipped} already indexed (skipped)" if self.skipped else "")
               + f"; {self.chunks} embeddings written"]
        for reason, n in self.reasons.most_common():
            out.append(f"  failed: {n} x {reason}")
        for w, n in self.warnings.most_common():
            out.append(f"  warning: {n} x {w}")
        return out


def _reason_kind(msg: str) -> str:
    return msg.split(":", 1)[0].strip() or "unknown"


def index_meta(cfg: PipelineConfig, sample_rate: int) -> dict:
    return {
        "model": cfg.model.name_or_path,
        "sample_rate": sample_rate,
        "chunking": cfg.index.chunking.model_dump(),
        "whole_file": cfg.index.whole_file or cfg.index.chunking.mode == "none",
        "fusion_seed": cfg.model.fusion_seed,
        "dtype": cfg.model.dtype,
        **({"adapter": cfg.model.adapter} if cfg.model.adapter else {}),  # absent when none: old indexes resume
    }


def run_index(cfg: PipelineConfig, refs: list[AudioRef] | None = None, show_progress: bool = True) -> IndexSummary:
    import ray
    from tqdm import tqdm

    from larcq_ray.ray_session import cluster_has_gpus, ensure_ray

    refs = refs if refs is not None else list_corpus(cfg.data)
    fz = _featurizer(cfg.model.name_or_path, cfg.model.fusion_seed, cfg.model.local_files_only)  # fail fast
    store = IndexStore(Path(cfg.run_dir) / "index")
    store.open_for_write(index_meta(cfg, fz.sample_rate))

    summary = IndexSummary()
    done = store.recorded_ids()
    todo = [r for r in refs if r.audio_id not in done]
    summary.skipped = len(refs) - len(todo)
    if not todo:
        return summary

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    ic = cfg.index
    gpus = ic.num_gpus_per_actor if ic.num_gpus_per_actor is not None else (1.0 if cluster_has_gpus() else 0.0)
    threads = ic.torch_threads
    if threads is None and gpus == 0:
        threads = max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // ic.num_actors)

    n_blocks = max(1, -(-len(todo) // ic.files_per_decode_task))
    ds = ray.data.from_items([{"audio_id": r.audio_id, "path": r.path} for r in todo], override_num_blocks=n_blocks)
    ds = ds.map_batches(
        decode_and_featurize,
        batch_size=ic.files_per_decode_task,
        batch_format="numpy",
        num_cpus=1,
        # Declared so the scheduler packs decode tasks by memory too (a 150 s file at 48 kHz plus
        # its features is ~0.1 GB). It also keeps this stage's remote args distinct from the
        # actor's, so Ray Data never fuses decoding into the (GPU) model actor.
        memory=ic.decode_memory_mb * 2**20,
        fn_kwargs=dict(model=cfg.model.name_or_path, fusion_seed=cfg.model.fusion_seed,
                       local_files_only=cfg.model.local_files_only, chunking=ic.chunking.model_dump(),
                       whole_file=ic.whole_file, silence_threshold_db=ic.silence_threshold_db),
    )
    ds = ds.map_batches(
        ClapEmbedStage,
        batch_size=ic.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ic.num_actors),
        num_gpus=gpus,
        num_cpus=ic.num_cpus_per_actor,
        fn_constructor_kwargs=dict(model=cfg.model.name_or_path, device=cfg.model.device, dtype=cfg.model.dtype,
                                   local_files_only=cfg.model.local_files_only, torch_threads=threads,
                                   adapter=cfg.model.adapter),
    )

    pending: dict[str, list[dict]] = defaultdict(list)
    ready_files: list[dict] = []
    ready_chunks: list[dict] = []
    bar = tqdm(total=len(todo), unit="file", desc="index", disable=not show_progress)

    def flush():
        store.commit(ready_files, ready_chunks)
        ready_files.clear()
        ready_chunks.clear()

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        n = len(batch["audio_id"])
        for i in range(n):
            row = {k: batch[k][i] for k in batch}
            aid = str(row["audio_id"])
            pending[aid].append(row)
            if len(pending[aid]) < int(row["n_rows"]):
                continue
            rows = pending.pop(aid)
            first = rows[0]
            ready_files.append({
                "audio_id": aid, "duration_s": float(first["duration_s"]), "sample_rate": int(first["sample_rate"]),
                "channels": int(first["channels"]), "n_chunks": int(first["n_chunks"]), "status": str(first["status"]),
                "error": str(first["error"]), "warning": str(first["warning"]),
            })
            if first["status"] == "ok":
                summary.indexed += 1
                for r in sorted(rows, key=lambda r: int(r["chunk_index"])):
                    ready_chunks.append({
                        "audio_id": aid, "chunk_index": int(r["chunk_index"]), "start_s": float(r["start_s"]),
                        "end_s": float(r["end_s"]), "embedding": np.frombuffer(r["embedding"], dtype=np.float32),
                    })
                summary.chunks += len(rows)
            else:
                summary.failed += 1
                summary.reasons[_reason_kind(str(first["error"]))] += 1
            for w in filter(None, str(first["warning"]).split("; ")):
                summary.warnings[_reason_kind(w)] += 1
            bar.update(1)
            if len(ready_files) >= ic.commit_every_files:
                flush()
    flush()
    bar.close()
    if pending:  # would mean rows were lost in flight; never silently accept that
        raise LarcqError(f"index: {len(pending)} file(s) came back incomplete: {sorted(pending)[:5]}")
    return summary
