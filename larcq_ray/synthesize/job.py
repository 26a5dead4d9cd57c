"""`larcq-ray synthesize`: a captioned clip dataset -> a LARCQ benchmark of long audios.

1. scan (Ray Data tasks): every row of the captions CSV is probed; bad rows are skipped and counted;
2. plan (driver, seeded): which distinct clips make each long audio, under the constraints;
3. render (Ray tasks, one long audio each, `num_workers` at once): decode, resample, join, write
   audios/<id>; the driver records finished audios every `commit_every` rows under _synthesis/, so
   a re-run renders only what is missing (same plan: the settings' fingerprint must match). Plain
   tasks rather than Ray Data: see `render` for the measured reason;
4. write queries.csv, provenance.parquet, skipped_clips.csv and synthesis_report.json.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from larcq_ray.synthesize.query import build_query
from larcq_ray import artifacts
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.storage import Location, open_location
from larcq_ray.synthesize.config import SynthesizeConfig
from larcq_ray.synthesize.plan import LongAudioPlan, fingerprint, output_rate, plan_benchmark
from larcq_ray.synthesize.render import RenderStage, run_render_tasks
from larcq_ray.synthesize.source import scan_source, skipped_counts

log = logging.getLogger(__name__)

STATE_DIR = "_synthesis"
DONE_SCHEMA = pa.schema([
    ("audio_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("duration_s", pa.float64()),
    ("gain", pa.float64()), ("provenance", pa.string()),
])


@dataclass
class SynthesisSummary:
    out_dir: str
    planned: int = 0
    written: int = 0  # rendered by this run
    resumed: int = 0  # already there from an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # audio_id -> reason
    skipped_clips: dict[str, int] = field(default_factory=dict)
    usable_clips: int = 0
    sample_rate: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.planned} long audios planned from {self.usable_clips} usable clips at {self.sample_rate} Hz: "
               f"{self.written} written, {self.resumed} kept from an earlier run, {len(self.failed)} failed"]
        if self.skipped_clips:
            out.append("skipped source rows: " + ", ".join(f"{n} {k}" for k, n in sorted(self.skipped_clips.items()))
                       + " (see skipped_clips.csv)")
        for aid, reason in list(self.failed.items())[:5]:
            out.append(f"failed: {aid}: {reason}")
        return out


def _check_out_dir(out: Location, plans: list[LongAudioPlan], fp: str) -> None:
    meta_rel = f"{STATE_DIR}/meta.json"
    if out.exists(meta_rel):
        old = json.loads(out.read_bytes(meta_rel))
        if old.get("fingerprint") != fp:
            raise LarcqError(f"{out.uri} holds a benchmark synthesized from other settings or another source "
                             "(fingerprint differs): use a new out_dir, or delete that one to start over")
    ours = {p.audio_id for p in plans}
    strangers = [f for f in out.list_files("audios") if f.split("/", 1)[1] not in ours and ".tmp-" not in f]
    if strangers:
        raise LarcqError(f"{out.uri}/audios already holds files this benchmark would not write "
                         f"({', '.join(strangers[:3])}{', ...' if len(strangers) > 3 else ''}); they would be "
                         "indexed as part of the corpus: use an empty or new out_dir")
    out.write_bytes(meta_rel, json.dumps({"fingerprint": fp}).encode())


def _read_done(out: Location) -> dict[str, dict]:
    """Latest record per audio id from the progress parts."""
    done: dict[str, dict] = {}
    for rel in out.list_files(STATE_DIR):
        if rel.rsplit("/", 1)[-1].startswith("done-") and rel.endswith(".parquet"):
            for row in pq.read_table(io.BytesIO(out.read_bytes(rel))).to_pylist():
                if row["status"] == "ok" or row["audio_id"] not in done:
                    done[row["audio_id"]] = row
    return done


def _commit(out: Location, rows: list[dict], seq: int) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DONE_SCHEMA), buf)
    out.write_bytes(f"{STATE_DIR}/done-{seq:06d}.parquet", buf.getvalue())


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # '\n' everywhere: same bytes on every OS
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _write_outputs(out: Location, cfg: SynthesizeConfig, plans: list[LongAudioPlan], done: dict[str, dict],
                   skipped: list, report: dict) -> None:
    ok = [p for p in plans if done.get(p.audio_id, {}).get("status") == "ok"]
    n_splits = cfg.clip_range()[1]
    header = ["audio_id", "query"] + [f"split_{i}" for i in range(1, n_splits + 1)]
    rows = []
    for p in ok:
        caps = [c.caption for c in p.clips]
        rows.append([p.audio_id, build_query(caps)] + caps + [""] * (n_splits - len(caps)))
    out.write_bytes(artifacts.BENCHMARK_QUERIES, _csv_bytes(header, rows))
    prov = [r for p in ok for r in json.loads(done[p.audio_id]["provenance"])]
    buf = io.BytesIO()
    pq.write_table(artifacts.PROVENANCE.table(prov), buf)
    out.write_bytes(artifacts.PROVENANCE.relpath, buf.getvalue())
    out.write_bytes("skipped_clips.csv", _csv_bytes(["file", "reason"], [[s.file, s.reason] for s in skipped]))
    out.write_bytes("synthesis_report.json", json.dumps(report, indent=2).encode())


def run_synthesize(cfg: SynthesizeConfig, address: str | None = None, num_cpus: int | None = None) -> SynthesisSummary:
    from larcq_ray.core.ray_session import ensure_ray

    if not cfg.out_dir:
        raise LarcqError("synthesize needs synthesize.out_dir")
    ensure_ray(address, num_cpus)
    clips, skipped = scan_source(cfg)
    if not clips:
        raise LarcqError(f"no usable clips in {cfg.captions_csv}: {skipped_counts(skipped)} (see the reasons with "
                         "--debug or fix the source)")
    rate = output_rate(clips, cfg)
    plans = plan_benchmark(clips, cfg)
    fp = fingerprint(clips, cfg)
    out = open_location(cfg.out_dir)
    _check_out_dir(out, plans, fp)

    done = _read_done(out)
    present = set(f.split("/", 1)[1] for f in out.list_files("audios"))
    todo = [p for p in plans if not (done.get(p.audio_id, {}).get("status") == "ok" and p.audio_id in present)]
    summary = SynthesisSummary(str(cfg.out_dir), planned=len(plans), resumed=len(plans) - len(todo),
                               skipped_clips=skipped_counts(skipped), usable_clips=len(clips), sample_rate=rate)
    if summary.resumed:
        log.info("resuming: %d of %d long audios are already written", summary.resumed, len(plans))
    seq = sum(1 for f in out.list_files(STATE_DIR) if f.rsplit("/", 1)[-1].startswith("done-"))
    if todo:
        # One task per long audio, at most num_workers at once; a finished one is replaced at once.
        stage = RenderStage(audio_dir=cfg.audio_dir, out_dir=cfg.out_dir, rate=rate, gap_s=cfg.gap_s,
                            crossfade_s=cfg.crossfade_s, subtype=cfg.subtype, workers=cfg.num_workers or None)
        batches = [{"plan": np.asarray([p.to_json()])} for p in todo]
        rows = (dict(zip(out, vals)) for out in run_render_tasks(stage, batches, cfg.num_workers or None)
                for vals in zip(*out.values()))
        pending: list[dict] = []
        for row in rows:  # as tasks finish, in any order: rows carry their audio_id
            rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            pending.append(rec)
            done[rec["audio_id"]] = rec
            if rec["status"] == "ok":
                summary.written += 1
            if len(pending) >= cfg.commit_every:
                _commit(out, pending, seq)
                seq, pending = seq + 1, []
                log.info("synthesized %d/%d long audios", summary.resumed + summary.written, len(plans))
        if pending:
            _commit(out, pending, seq)
    summary.failed = {p.audio_id: done[p.audio_id]["error"] for p in plans
                      if done.get(p.audio_id, {}).get("status") != "ok"}
    report = {
        "fingerprint": fp, "sample_rate": rate, "n_planned": len(plans),
        "n_written": len(plans) - len(summary.failed), "n_failed": len(summary.failed), "failed": summary.failed,
        "usable_clips": len(clips), "skipped_source_rows": summary.skipped_clips,
        "clips_resampled": sum(1 for c in clips if c.sample_rate != rate),
        "audios_scaled_to_avoid_clipping": sum(1 for p in plans if done.get(p.audio_id, {}).get("gain", 1.0) < 1.0),
        "settings": cfg.output_fingerprint_fields(),
    }
    _write_outputs(out, cfg, plans, done, skipped, report)
    return summary


def run(cfg) -> SynthesisSummary:
    """`larcq-ray synthesize`: build the benchmark of cfg.synthesize; an error names failed audios."""
    sc = cfg.synthesize
    log.info("synthesizing %d long audios from %s into %s", sc.n_audios, sc.captions_csv, sc.out_dir)
    summary = run_synthesize(sc, address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    for line in summary.lines():
        log.info(line)
    if summary.failed:
        raise LarcqError(f"{len(summary.failed)} of {summary.planned} long audios failed and are left out of "
                         f"queries.csv (reasons in {sc.out_dir}/synthesis_report.json); re-run to retry them")
    return summary
