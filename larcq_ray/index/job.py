"""Index job: corpus -> Ray Data (DecodeChunkStage tasks | ClapEmbedStage actors | IndexWriteStage
tasks) -> the index store (index/store.py).

Streaming end to end (see core/file_job.py): the writer tasks put the embeddings in the store and
send the driver one status row per file and batch; the driver adds them up per file and commits a
manifest part every `commit_every_files` complete files, so a re-run resumes where this one
stopped. The driver never holds embeddings: its memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from larcq_ray.config import PipelineConfig
from larcq_ray.core.file_job import FileJobSummary, FileResult, collect_files, file_dataset, reason_kind
from larcq_ray.core.inputs import REJECT_KINDS, AudioRef, list_corpus
from larcq_ray.index.stages import ClapEmbedStage, DecodeChunkStage, feature_settings
from larcq_ray.index.store import RETRY_KINDS, UNKNOWN, IndexStore, file_stat, index_root
from larcq_ray.index.writer import IndexWriteStage

log = logging.getLogger(__name__)


def index_meta(cfg: PipelineConfig, sample_rate: int) -> dict:
    return {
        "model": cfg.model.name_or_path,
        "sample_rate": sample_rate,
        "chunking": cfg.index.chunking.model_dump(),
        "whole_file": cfg.index.whole_file or cfg.index.chunking.mode == "none",
        "fusion_seed": cfg.model.fusion_seed,
        "dtype": cfg.model.dtype,
        "adapter": cfg.model.adapter,
        "embedding_dtype": cfg.index.embedding_dtype,
    }


def _assemble(aid: str, rows: list[dict]) -> FileResult:
    """One file's status rows (one per writer batch) -> its manifest row (or its failure)."""
    first = rows[0]
    bad = [r for r in rows if str(r["status"]) != "ok"]
    error = str(bad[0]["error"]) if bad else ""
    warnings = [w for w in str(first["warning"]).split("; ") if w]
    parts = sorted({str(r["part"]) for r in rows if str(r["part"])})
    n_rows = int(first["n_rows"])
    file_row = {
        "audio_id": aid, "duration_s": float(first["duration_s"]), "sample_rate": int(first["sample_rate"]),
        "channels": int(first["channels"]), "n_chunks": int(first["n_chunks"]),
        "status": "failed" if bad else "ok", "error": error, "warning": str(first["warning"]),
        "chunk_parts": [] if bad else parts,
    }
    return FileResult(aid, error=error, warnings=warnings, units=0 if bad else n_rows, payload=file_row)


def _rejected(ref: AudioRef) -> FileResult:
    """A corpus entry that cannot be indexed (see AudioRef.reject): its failed row, never decoded."""
    file_row = {"audio_id": ref.audio_id, "duration_s": 0.0, "sample_rate": 0, "channels": 0, "n_chunks": 0,
                "status": "failed", "error": ref.reject, "warning": "", "chunk_parts": []}
    return FileResult(ref.audio_id, error=ref.reject, payload=file_row)


def plan_resume(store: IndexStore, refs: list[AudioRef], stats: dict[str, tuple[int, int]],
                drop_missing: bool = True) -> tuple[list[AudioRef], int, int, list[str]]:
    """(files to index, how many changed, how many failed ones are retried, ids to drop).

    A file is indexed when the index has no row for it, when its size or modification time
    differs from what was recorded, or when it failed for a reason that can change (RETRY_KINDS),
    or when it was rejected at listing (REJECT_KINDS) and is now accepted. A rejected entry's failed
    row is recorded when the index has none like it (same reason), and again on every run when its
    kind is one of RETRY_KINDS. Files the index holds that `refs` no longer lists are dropped (when
    `drop_missing`)."""
    current = store.current_files()
    rows = {a: (s, e, sz, mt) for a, s, e, sz, mt in zip(*(current.column(c).to_pylist() for c in (
        "audio_id", "status", "error", "size_bytes", "mtime_ns")))}
    todo, changed, retried = [], 0, 0
    for r in refs:
        row = rows.get(r.audio_id)
        if r.reject:
            if row is None or row[0] != "failed" or row[1] != r.reject:
                todo.append(r)
            elif reason_kind(r.reject) in RETRY_KINDS:
                todo.append(r)
                retried += 1
            continue
        if row is None:
            todo.append(r)
            continue
        status, error, size, mtime = row
        known = size != UNKNOWN and mtime != UNKNOWN  # indexes from before stats were recorded: kept
        if known and (size, mtime) != stats[r.audio_id]:
            todo.append(r)
            changed += 1
        elif status != "ok" and reason_kind(error) in RETRY_KINDS + REJECT_KINDS:
            todo.append(r)
            retried += 1
    listed = {r.audio_id for r in refs}
    gone = sorted(a for a in rows if a not in listed) if drop_missing else []
    return todo, changed, retried, gone


def run_index(cfg: PipelineConfig, refs: list[AudioRef] | None = None, show_progress: bool = True,
              drop_missing: bool = True, seen=None) -> FileJobSummary:
    """Index `refs` (default: the whole corpus of cfg.data). With `drop_missing`, `refs` is the corpus:
    indexed files it no longer lists are dropped from the index."""
    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.core.stage import map_stage

    refs = refs if refs is not None else list_corpus(cfg.data)
    from larcq_ray.models.clap import cached_featurizer

    fz = cached_featurizer(cfg.model.name_or_path, cfg.model.fusion_seed, cfg.model.local_files_only)  # fail fast
    store = IndexStore(index_root(cfg))
    store.open_for_write(index_meta(cfg, fz.sample_rate))

    summary = FileJobSummary("indexed", "embeddings written")
    stats = {r.audio_id: (UNKNOWN, UNKNOWN) if r.reject else file_stat(r.path) for r in refs}
    todo, changed, retried, gone = plan_resume(store, refs, stats, drop_missing)
    rejected = [_rejected(r) for r in todo if r.reject]
    todo = [r for r in todo if not r.reject]
    if gone:
        store.mark_deleted(gone)
        summary.notes.append(f"{len(gone)} file(s) no longer in the corpus: dropped from the index")
    if changed:
        summary.notes.append(f"{changed} file(s) changed since they were indexed: indexed again")
    if retried:
        summary.notes.append(f"{retried} file(s) that failed for a reason that can change: retried")
    summary.skipped = len(refs) - len(todo) - len(rejected)

    def commit(results: list[FileResult]) -> None:
        store.commit([{**r.payload, "size_bytes": stats[r.audio_id][0], "mtime_ns": stats[r.audio_id][1]}
                      for r in results])

    if rejected:  # recorded first, without Ray: the entries the listing could not accept
        for r in rejected:
            summary.add(r)
        commit(rejected)
    if not todo:
        return summary

    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    ic, mc = cfg.index, cfg.model
    decode = DecodeChunkStage(model=mc.name_or_path, fusion_seed=mc.fusion_seed, local_files_only=mc.local_files_only,
                              chunking=ic.chunking.model_dump(), whole_file=ic.whole_file,
                              silence_threshold_db=ic.silence_threshold_db, memory_mb=ic.decode_memory_mb,
                              **feature_settings(ic.features, ic.num_gpus_per_actor, mc.device))
    embed = ClapEmbedStage(model=mc.name_or_path, device=mc.device, dtype=mc.dtype, local_files_only=mc.local_files_only,
                           adapter=mc.adapter, actors=ic.num_actors, cpus=ic.num_cpus_per_actor,
                           gpus="auto" if ic.num_gpus_per_actor is None else ic.num_gpus_per_actor,
                           torch_threads=ic.torch_threads, fusion_seed=mc.fusion_seed)
    ds = map_stage(file_dataset(todo, ic.files_per_decode_task), decode, ic.files_per_decode_task)
    ds = map_stage(ds, embed, ic.batch_size)
    ds = map_stage(ds, IndexWriteStage(store.uri), ic.rows_per_part)
    return collect_files(ds, len(todo), assemble=_assemble, commit=commit, commit_every=ic.commit_every_files,
                         summary=summary, desc="index", show_progress=show_progress, seen=seen)


def run(cfg: PipelineConfig) -> FileJobSummary:
    """`larcq-ray index`: check the inputs, index the corpus, log the summary."""
    from larcq_ray.core.inputs import check_queries_against_corpus, corpus_root, queries_csv_path, read_queries

    refs = list_corpus(cfg.data)
    if cfg.data.benchmark or cfg.data.queries_csv:  # fail before hours of indexing, not after
        check_queries_against_corpus(read_queries(queries_csv_path(cfg.data)), {r.audio_id for r in refs},
                                     corpus_root(cfg.data))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    rejected = [r for r in refs if r.reject]
    log.info("indexing %d files from %s into %s", len(refs) - len(rejected), corpus_root(cfg.data),
             index_root(cfg))
    if rejected:
        log.warning("%d corpus entr%s cannot be indexed (recorded as failed):", len(rejected),
                    "y" if len(rejected) == 1 else "ies")
        for r in rejected[:5]:
            log.warning("  %s: %s", r.audio_id, r.reject)
        if len(rejected) > 5:
            log.warning("  ... and %d more (the index's files table lists them all)", len(rejected) - 5)
    t0 = time.time()
    summary = run_index(cfg, refs)
    for line in summary.lines():
        log.info(line)
    log.info("index done in %.1f s", time.time() - t0)
    return summary
