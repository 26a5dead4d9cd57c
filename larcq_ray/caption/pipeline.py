"""Caption job: audio files -> Ray Data (decode, window | caption) -> captions.parquet.

Stages, streaming end to end:
1. `decode_and_window` (CPU tasks): decode + resample to the captioner's rate, cut back-to-back
   windows of `window_s` covering the whole file. One row per window, or one `failed` row.
2. `CaptionStage` (actor pool, one model per actor, a GPU each where the cluster has GPUs):
   windows -> captions.
3. The driver regroups rows by file (map_batches does not keep order), adds the file's timeline
   caption (chunk_index -1), and rewrites captions.parquet every `commit_every_files` files, so a
   re-run resumes where this one stopped.

captions.parquet: audio_id, chunk_index (-1 = timeline of the whole file), start_s, end_s,
captioner, prompt, caption, status ("ok" / "failed"), error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from larcq_ray.caption.backends import CaptionBackendConfig
from larcq_ray.caption.windows import caption_windows, timeline_caption
from larcq_ray.errors import LarcqError
from larcq_ray.inputs import AudioRef

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("audio_id", pa.string()), ("chunk_index", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64()),
    ("captioner", pa.string()), ("prompt", pa.string()), ("caption", pa.string()), ("status", pa.string()),
    ("error", pa.string()),
])


def _columns(rows: list[dict]) -> dict:
    return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], (str, bytes)) else None)
            for k in rows[0]}


def _failed_row(audio_id: str, error: str, duration_s: float = 0.0) -> dict:
    return {"audio_id": audio_id, "chunk_index": -1, "start_s": 0.0, "end_s": float(duration_s), "n_windows": 1,
            "samples": b"", "status": "failed", "error": error}


def decode_and_window(batch: dict, *, sample_rate: int, window_s: float, silence_threshold_db: float) -> dict:
    """Ray Data batch fn: files in, one row per window (mono float32 samples as bytes) out."""
    from larcq_ray.audio import decode_audio

    rows: list[dict] = []
    for audio_id, path in zip(batch["audio_id"], batch["path"]):
        audio_id, path = str(audio_id), str(path)
        try:
            dec = decode_audio(path, sample_rate, silence_threshold_db)
            if dec.status != "ok":
                rows.append(_failed_row(audio_id, dec.error, dec.duration_s))
                continue
            x = dec.samples
            spans = caption_windows(len(x), sample_rate, window_s)
            for i, (s, e) in enumerate(spans):
                rows.append({"audio_id": audio_id, "chunk_index": i, "start_s": s / sample_rate,
                             "end_s": e / sample_rate, "n_windows": len(spans),
                             "samples": x[s:e].tobytes(), "status": "ok", "error": ""})
        except Exception as e:  # a bug or odd file must cost one row, never the job
            rows.append(_failed_row(audio_id, f"internal: {type(e).__name__}: {e}"[:300]))
    return _columns(rows)


class CaptionStage:
    """Actor: loads the captioner once, captions batches of windows."""

    def __init__(self, cfg: dict, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=num_cpus (1) for actors
        from larcq_ray.caption.backends import build_caption_backend

        self.backend = build_caption_backend(CaptionBackendConfig(**cfg))

    def __call__(self, batch: dict) -> dict:
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        captions = np.empty(len(status), dtype=object)
        captions[:] = ""
        ok = np.flatnonzero(status == "ok")
        if len(ok):
            waves = [np.frombuffer(batch["samples"][i], dtype=np.float32) for i in ok]
            try:
                texts = self.backend.caption(waves)
            except Exception as e:  # one bad batch costs its windows, never the job
                status[ok] = "failed"
                error[ok] = f"caption: {type(e).__name__}: {e}"[:300]
            else:
                for i, t in zip(ok, texts):
                    captions[i] = t
                    if not t:
                        status[i], error[i] = "failed", "caption: the model generated no text"
        out = {k: v for k, v in batch.items() if k != "samples"}
        out.update(status=status, error=error, caption=captions)
        return out


@dataclass
class CaptionSummary:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0  # already captioned (same captioner and prompt) by an earlier run
    windows: int = 0
    out_path: str = ""
    reasons: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{self.captioned} captioned, {self.failed} failed"
               + (f", {self.skipped} already captioned (skipped)" if self.skipped else "")
               + f"; {self.windows} window captions written to {self.out_path}"]
        for reason, n in self.reasons.most_common():
            out.append(f"  failed: {n} x {reason}")
        return out


def _reason_kind(msg: str) -> str:
    return msg.split(":", 1)[0].strip() or "unknown"


def _read_existing(out_path: Path) -> list[dict]:
    if not out_path.exists():
        return []
    try:
        t = pq.read_table(out_path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LarcqError(f"{out_path} exists but is not a readable Parquet file ({e}); move it away") from None
    missing = [n for n in SCHEMA.names if n not in t.column_names]
    if missing:
        raise LarcqError(f"{out_path} is not a captions file (lacks columns {missing}); move it away")
    return t.select(SCHEMA.names).to_pylist()


def _write(out_path: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["audio_id"], r["chunk_index"]))
    tmp = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, out_path)  # a crash mid-write never leaves a half file


def _file_rows(aid: str, rows: list[dict], captioner: str, prompt: str) -> tuple[list[dict], str]:
    """Output rows for one file (windows in order + its timeline row); and its failure reason, or ''."""
    base = {"audio_id": aid, "captioner": captioner, "prompt": prompt}
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
                torch_threads: int | None = None, show_progress: bool = False) -> CaptionSummary:
    """Caption every window of each unique audio once; write/extend `out_path` (captions.parquet)."""
    import ray
    from tqdm import tqdm

    from larcq_ray.caption.hf_audio_lm import captioner_name, load_audio_spec
    from larcq_ray.ray_session import cluster_has_gpus, ensure_ray

    if num_actors < 1:
        raise LarcqError(f"caption: num_actors must be >= 1, got {num_actors}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise LarcqError(f"caption.adapter {cfg.adapter!r} is not a folder (expected a peft LoRA adapter)")
    captioner = captioner_name(cfg)
    _, _, sample_rate, window_s = load_audio_spec(cfg)  # fail fast on a missing model, before Ray starts

    refs = list({r.audio_id: r for r in reversed(audio_refs)}.values())[::-1]  # dedupe, first one wins
    existing = _read_existing(out_path)
    done = {r["audio_id"] for r in existing if r["chunk_index"] == -1 and r["status"] == "ok"
            and r["captioner"] == captioner and r["prompt"] == cfg.prompt}
    todo = [r for r in refs if r.audio_id not in done]
    summary = CaptionSummary(skipped=len(refs) - len(todo), out_path=str(out_path))
    if not todo:
        return summary
    redo = {r.audio_id for r in todo}
    kept = [r for r in existing if r["audio_id"] not in redo]  # earlier failures / other settings are replaced
    others = {r["captioner"] for r in kept} - {captioner}
    if others:
        log.warning("%s also holds captions by %s; they are kept", out_path, ", ".join(sorted(others)))

    ensure_ray(address)
    gpus = num_gpus if num_gpus is not None else (1.0 if cluster_has_gpus() else 0.0)
    threads = torch_threads
    if threads is None and gpus == 0:
        threads = max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // num_actors)

    n_blocks = max(1, -(-len(todo) // files_per_decode_task))
    ds = ray.data.from_items([{"audio_id": r.audio_id, "path": r.path} for r in todo], override_num_blocks=n_blocks)
    ds = ds.map_batches(
        decode_and_window, batch_size=files_per_decode_task, batch_format="numpy", num_cpus=1,
        # Distinct remote args keep Ray Data from fusing decoding into the (GPU) model actor.
        memory=256 * 2**20,
        fn_kwargs=dict(sample_rate=sample_rate, window_s=window_s, silence_threshold_db=silence_threshold_db),
    )
    ds = ds.map_batches(
        CaptionStage, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_gpus=gpus, num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs=dict(cfg=cfg.model_dump(), torch_threads=threads),
    )

    pending: dict[str, list[dict]] = defaultdict(list)
    new_rows: list[dict] = []
    since_commit = 0
    bar = tqdm(total=len(todo), unit="file", desc="caption", disable=not show_progress)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["audio_id"])):
            row = {k: batch[k][i] for k in batch}
            aid = str(row["audio_id"])
            pending[aid].append(row)
            if len(pending[aid]) < int(row["n_windows"]):
                continue
            rows, err = _file_rows(aid, pending.pop(aid), captioner, cfg.prompt)
            new_rows.extend(rows)
            if err:
                summary.failed += 1
                summary.reasons[_reason_kind(err)] += 1
            else:
                summary.captioned += 1
                summary.windows += len(rows) - 1
            bar.update(1)
            since_commit += 1
            if since_commit >= commit_every_files:
                _write(out_path, kept + new_rows)
                since_commit = 0
    bar.close()
    _write(out_path, kept + new_rows)
    if pending:  # would mean rows were lost in flight; never silently accept that
        raise LarcqError(f"caption: {len(pending)} file(s) came back incomplete: {sorted(pending)[:5]}")
    return summary


def unique_audio_ids_from_shortlist(shortlist_parquet: str | Path, modes: Iterable[str] | None = None,
                                    top_n: int | None = None) -> list[str]:
    """The audio ids a re-rank will need captions for: each once, best-ranked first."""
    path = Path(shortlist_parquet)
    if not path.exists():
        raise LarcqError(f"no shortlist at {path}: run `larcq-ray search` first")
    t = pq.read_table(path, columns=["query_id", "mode", "rank", "audio_id"]).to_pandas()
    if modes is not None:
        modes = list(modes)
        unknown = sorted(set(modes) - set(t["mode"].unique()))
        if unknown:
            raise LarcqError(f"{path} has no rows for mode(s) {unknown}; modes there: {sorted(t['mode'].unique())}")
        t = t[t["mode"].isin(modes)]
    if top_n is not None:
        t = t[t["rank"] <= top_n]
    t = t.sort_values(["rank", "query_id", "mode"], kind="stable")
    return list(dict.fromkeys(t["audio_id"].astype(str)))


def read_audio_id_list(path: str | Path) -> list[str]:
    """Audio ids from a file: .txt (one per line, '#' comments), .csv (an `audio_id` column, else
    the first column) or .parquet (an `audio_id` column). Order kept, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"audio id list {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        names = pq.read_schema(path).names
        if "audio_id" not in names:
            raise LarcqError(f"{path} has no audio_id column (columns: {names})")
        ids = [str(x) for x in pq.read_table(path, columns=["audio_id"]).column("audio_id").to_pylist() if x is not None]
    elif suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise LarcqError(f"{path} is empty")
        col = rows[0].index("audio_id") if "audio_id" in rows[0] else 0
        ids = [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        ids = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not ids:
        raise LarcqError(f"audio id list {path} holds no ids")
    return list(dict.fromkeys(ids))
