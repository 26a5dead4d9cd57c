"""Caption job: audio files -> Ray Data (DecodeWindowStage tasks | CaptionStage actors) -> captions.parquet.

Streaming end to end (see core/file_job.py): the driver regroups rows by file, adds the file's
timeline caption (chunk_index -1) and commits a part (captions.parts/) every `commit_every_files`
files; at the end the parts are folded into captions.parquet once. A re-run resumes: a file is
captioned again only when it failed or any setting that changes a caption differs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable

import pyarrow as pa

from larcq_ray import artifacts
from larcq_ray.caption.config import CaptionBackendConfig
from larcq_ray.caption.stages import CaptionStage, DecodeWindowStage
from larcq_ray.caption.windows import timeline_caption
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.file_job import FileJobSummary, FileResult, collect_files, file_dataset
from larcq_ray.core.inputs import AudioRef

log = logging.getLogger(__name__)
CAPTIONS = artifacts.CAPTIONS


def caption_settings(cfg: CaptionBackendConfig, window_s: float) -> str:
    """Every setting that changes a caption, as canonical JSON (stored with each caption row)."""
    keep = ("kind", "model", "adapter", "prompt", "max_new_tokens", "do_sample", "num_beams", "dtype")
    refine = cfg.clap_refine.model_dump() if cfg.clap_refine is not None else None
    return json.dumps({**{k: getattr(cfg, k) for k in keep}, "window_s": window_s, "clap_refine": refine},
                      sort_keys=True)


def _parts_dir(out_path: Path) -> Path:
    return out_path.with_name(artifacts.CAPTION_PARTS_DIR if out_path.name == CAPTIONS.relpath
                              else out_path.stem + ".parts")


def _read_existing(out_path: Path) -> pa.Table:
    """captions.parquet plus the parts an interrupted run committed; per file, the newest rows win."""
    tables = [CAPTIONS.read_from(out_path)] if out_path.exists() else []
    parts = sorted(_parts_dir(out_path).glob("part-*.parquet"))
    tables += [CAPTIONS.read_from(p) for p in parts]
    if not tables:
        return CAPTIONS.schema.empty_table()
    newest: dict[str, int] = {}
    for i, t in enumerate(tables):
        for aid in set(t.column("audio_id").to_pylist()):
            newest[aid] = i
    keep = [t.filter(pa.array([newest[a] == i for a in t.column("audio_id").to_pylist()], type=pa.bool_()))
            for i, t in enumerate(tables)]
    return pa.concat_tables(keep)


def _fold(out_path: Path) -> None:
    """captions.parquet := what exists (old file + parts), sorted; then the parts go."""
    table = _read_existing(out_path)
    table = table.sort_by([("audio_id", "ascending"), ("chunk_index", "ascending")])
    CAPTIONS.write_to(out_path, table)
    shutil.rmtree(_parts_dir(out_path), ignore_errors=True)


def _file_rows(aid: str, rows: list[dict], base: dict) -> tuple[list[dict], str]:
    """Output rows for one file (windows in order + its timeline row); and its failure reason, or ''."""
    base = {"audio_id": aid, **base}
    if len(rows) == 1 and int(rows[0]["chunk_index"]) == -1:  # could not be decoded
        r = rows[0]
        return [{**base, "chunk_index": -1, "start_s": 0.0, "end_s": float(r["end_s"]), "caption": "",
                 "status": "failed", "error": str(r["error"])}], str(r["error"])
    rows = sorted(rows, key=lambda r: int(r["chunk_index"]))
    out = [{**base, "chunk_index": int(r["chunk_index"]), "start_s": float(r["start_s"]), "end_s": float(r["end_s"]),
            "caption": str(r["caption"]), "status": str(r["status"]), "error": str(r["error"])} for r in rows]
    bad = [r for r in out if r["status"] != "ok"]
    err = f"{bad[0]['error']} ({len(bad)} of {len(out)} windows failed)" if bad else ""
    timeline = "" if bad else timeline_caption([r["caption"] for r in out], [(r["start_s"], r["end_s"]) for r in out])
    out.append({**base, "chunk_index": -1, "start_s": 0.0, "end_s": out[-1]["end_s"], "caption": timeline,
                "status": "failed" if bad else "ok", "error": err})
    return out, err


def run_caption(audio_refs: list[AudioRef], cfg: CaptionBackendConfig, out_path: Path, num_actors: int = 1,
                num_gpus: float | None = None, num_cpus_per_actor: float = 1.0, files_per_decode_task: int = 4,
                silence_threshold_db: float = -80.0, commit_every_files: int = 50, address: str | None = None,
                torch_threads: int | None = None, show_progress: bool = False) -> FileJobSummary:
    """Caption every window of each unique audio once; write/extend `out_path` (captions.parquet)."""
    from larcq_ray.caption.backends import describe
    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.core.stage import map_stage

    if num_actors < 1:
        raise LarcqError(f"caption: num_actors must be >= 1, got {num_actors}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise LarcqError(f"caption.adapter {cfg.adapter!r} is not a folder (expected a peft LoRA adapter)")
    spec = describe(cfg)  # fail fast on a missing model, before Ray starts
    captioner, sample_rate, window_s = spec.name, spec.sample_rate, spec.window_s
    settings = caption_settings(cfg, window_s)

    refs = list({r.audio_id: r for r in reversed(audio_refs)}.values())[::-1]  # dedupe, first one wins
    existing = _read_existing(out_path).to_pylist()
    done = {r["audio_id"] for r in existing if r["chunk_index"] == -1 and r["status"] == "ok"
            and r["settings"] == settings}
    todo = [r for r in refs if r.audio_id not in done]
    summary = FileJobSummary("captioned", f"window captions written to {out_path}", skipped=len(refs) - len(todo))
    if not todo:
        return summary
    redo = {r.audio_id for r in todo}
    others = {r["captioner"] for r in existing if r["audio_id"] not in redo} - {captioner}
    if others:
        log.warning("%s also holds captions by %s; they are kept", out_path, ", ".join(sorted(others)))

    ensure_ray(address)
    decode = DecodeWindowStage(sample_rate=sample_rate, window_s=window_s, silence_threshold_db=silence_threshold_db)
    model = CaptionStage(backend=cfg.model_dump(), actors=num_actors, cpus=num_cpus_per_actor,
                         gpus="auto" if num_gpus is None else num_gpus, torch_threads=torch_threads)
    ds = map_stage(file_dataset(todo, files_per_decode_task), decode, files_per_decode_task)
    ds = map_stage(ds, model, cfg.batch_size)

    base = {"captioner": captioner, "prompt": spec.prompt, "settings": settings}
    parts = _parts_dir(out_path)
    n_parts = len(list(parts.glob("part-*.parquet")))

    def assemble(aid: str, rows: list[dict]) -> FileResult:
        out, err = _file_rows(aid, rows, base)
        return FileResult(aid, error=err, units=0 if err else len(out) - 1, payload=out)

    def commit(results: list[FileResult]) -> None:
        nonlocal n_parts
        from larcq_ray.core.storage import publish

        part = CAPTIONS.write_to(parts / f"part-{n_parts:06d}.parquet", [row for r in results for row in r.payload])
        publish(part)  # a remote run_dir gets the part now: it survives the driver's death
        n_parts += 1

    try:
        collect_files(ds, len(todo), assemble=assemble, commit=commit, commit_every=commit_every_files,
                      summary=summary, desc="caption", show_progress=show_progress)
    finally:
        _fold(out_path)  # one rewrite per run (not per commit); interrupted runs keep their parts too
    return summary


def unique_audio_ids_from_shortlist(run_dir: str | Path, modes: Iterable[str] | None = None,
                                    top_n: int | None = None) -> list[str]:
    """The audio ids a re-rank will need captions for: each once, best-ranked first.

    `run_dir`: a run directory, or a shortlist.parquet file itself."""
    where = Path(run_dir)
    cols = ["query_id", "mode", "rank", "audio_id"]
    short = artifacts.SHORTLIST
    t = (short.read_from(where, cols) if where.suffix == ".parquet" else short.read(where, cols)).to_pandas()
    if modes is not None:
        modes = list(modes)
        unknown = sorted(set(modes) - set(t["mode"].unique()))
        if unknown:
            raise LarcqError(f"the shortlist in {run_dir} has no rows for mode(s) {unknown}; "
                             f"modes there: {sorted(t['mode'].unique())}")
        t = t[t["mode"].isin(modes)]
    if top_n is not None:
        t = t[t["rank"] <= top_n]
    t = t.sort_values(["rank", "query_id", "mode"], kind="stable")
    return list(dict.fromkeys(t["audio_id"].astype(str)))


INDEX_IDS = "index"  # caption.audio_ids / --audio-ids value: every audio the index holds


def run(cfg) -> FileJobSummary:
    """`larcq-ray caption`: caption the listed ids, or the top of the shortlist."""
    from larcq_ray.core.inputs import corpus_root, read_audio_id_list

    run_dir, cc = Path(cfg.run_dir), cfg.caption
    if cc.audio_ids == INDEX_IDS:  # the whole indexed corpus: captions for /search's rerank
        from larcq_ray.index.store import IndexStore, index_root

        store = IndexStore(index_root(cfg))
        if not store.exists():
            raise LarcqError(f"caption.audio_ids: index, but there is no index in {store.uri}: run `larcq-ray index`")
        files = store.read_files().to_pandas()
        ids = sorted(files.loc[files.status == "ok", "audio_id"].astype(str))
        source = f"every indexed audio of {store.uri}"
    elif cc.audio_ids:
        ids = read_audio_id_list(cc.audio_ids)
        source = f"listed in {cc.audio_ids}"
    else:
        mode, top_n = cc.mode or cfg.rerank.mode, cc.top_n or cfg.rerank.top_n
        ids = unique_audio_ids_from_shortlist(run_dir, modes=[mode], top_n=top_n)
        source = f"top {top_n} of the {mode} shortlist"
    root = corpus_root(cfg.data)
    log.info("captioning %d unique audios (%s) with %s", len(ids), source, cc.backend.model)
    summary = run_caption([AudioRef(a, str(root / a)) for a in ids], cc.backend, CAPTIONS.path(run_dir),
                          num_actors=cc.num_actors, num_gpus=cc.num_gpus_per_actor, address=cfg.ray.address,
                          show_progress=True)
    for line in summary.lines():
        log.info(line)
    return summary
