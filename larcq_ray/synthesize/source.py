"""The source of a synthesized benchmark: a captioned clip table, checked clip by clip.

Every row of the captions CSV ends as a usable `Clip` or as a `SkippedClip` with a reason
(duplicate file name, empty captions, missing file, unreadable audio, ...): skipped rows are
reported with counts, never dropped silently.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import soundfile as sf

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.stage import Resources, map_stage
from larcq_ray.core.storage import open_location
from larcq_ray.synthesize.config import SynthesizeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Clip:
    index: int  # row order in the source table: what the seeded plan is drawn over
    file: str
    captions: tuple[str, ...]  # per caption column, "" where empty
    sample_rate: int
    frames: int
    channels: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class SkippedClip:
    file: str
    reason: str


def read_caption_table(cfg: SynthesizeConfig) -> tuple[list[dict], list[SkippedClip]]:
    """Rows {file, captions} of the captions CSV that are worth probing, and the rows skipped."""
    if not cfg.captions_csv or not cfg.audio_dir:
        raise LarcqError("synthesize needs synthesize.captions_csv and synthesize.audio_dir")
    loc = open_location(cfg.captions_csv)
    try:
        text = loc.read_bytes("").decode("utf-8-sig")
    except FileNotFoundError:
        raise LarcqError(f"captions CSV {cfg.captions_csv} does not exist") from None
    except UnicodeDecodeError as e:
        raise LarcqError(f"captions CSV {cfg.captions_csv} is not UTF-8 text: {e}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in [cfg.file_column, *cfg.caption_columns] if c not in header]
    if missing:
        raise LarcqError(f"captions CSV {cfg.captions_csv} lacks column(s) {missing}; its columns: {header} "
                         "(set synthesize.file_column / synthesize.caption_columns)")
    rows, skipped, seen = [], [], set()
    for line, rec in enumerate(reader, start=2):
        name = (rec.get(cfg.file_column) or "").strip()
        if not name:
            skipped.append(SkippedClip(f"<line {line}>", "empty file name"))
            continue
        if name in seen:
            skipped.append(SkippedClip(name, "duplicate file name (first row kept)"))
            continue
        seen.add(name)
        if ".." in name.replace("\\", "/").split("/") or name.startswith("/"):
            skipped.append(SkippedClip(name, "file name escapes the audio folder"))
            continue
        caps = tuple((rec.get(c) or "").strip() for c in cfg.caption_columns)
        if cfg.query_caption == "random":
            usable = any(caps)
        else:
            usable = bool(caps[cfg.caption_columns.index(cfg.query_caption)])
        if not usable:
            skipped.append(SkippedClip(name, f"empty caption ({cfg.query_caption})"))
            continue
        rows.append({"index": len(rows), "file": name, "captions": list(caps)})
    if not rows and not skipped:
        raise LarcqError(f"captions CSV {cfg.captions_csv} has no rows")
    return rows, skipped


def probe_clips(batch: dict, *, audio_dir: str) -> dict:
    """Ray Data task: header facts of each clip (no full decode), or why it cannot be used."""
    loc = open_location(audio_dir)
    out = {k: [] for k in ("index", "sample_rate", "frames", "channels", "error")}
    for index, name in zip(batch["index"], batch["file"]):
        sr = frames = channels = 0
        error = ""
        try:
            with loc.fs.open_input_file(loc.path(str(name))) as f:
                info = sf.info(f)
            sr, frames, channels = int(info.samplerate), int(info.frames), int(info.channels)
            if frames == 0:
                error = "empty: no audio frames"
        except FileNotFoundError:
            error = "missing: no such file in the audio folder"
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            error = f"unreadable: {str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__}"
        out["index"].append(int(index))
        out["sample_rate"].append(sr)
        out["frames"].append(frames)
        out["channels"].append(channels)
        out["error"].append(error)
    return {k: np.asarray(v) for k, v in out.items()}


@dataclass
class ProbeClipsStage:
    """Ray Data task stage: `probe_clips` over batches of the source table."""

    audio_dir: str
    name: str = "probe"

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def setup(self) -> None:
        pass

    def process_batch(self, batch: dict) -> dict:
        return probe_clips(batch, audio_dir=self.audio_dir)

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["index"])
        zeros = np.zeros(n, dtype=np.int64)
        return {"index": np.asarray(batch["index"]), "sample_rate": zeros, "frames": zeros, "channels": zeros,
                "error": np.asarray([reason] * n)}


def scan_source(cfg: SynthesizeConfig) -> tuple[list[Clip], list[SkippedClip]]:
    """Usable clips in source-table order, and every skipped row with its reason (Ray Data probe)."""
    import ray.data

    rows, skipped = read_caption_table(cfg)
    if rows:
        ds = ray.data.from_items([{"index": r["index"], "file": r["file"]} for r in rows])
        probed = map_stage(ds, ProbeClipsStage(audio_dir=cfg.audio_dir), 64).take_all()
        by_index = {int(p["index"]): p for p in probed}
        if len(by_index) != len(rows):  # never silently: every row was sent, every row must come back
            raise LarcqError(f"probing the clips returned {len(by_index)} of {len(rows)} rows")
    clips = []
    for r in rows:
        p = by_index[r["index"]]
        if p["error"]:
            skipped.append(SkippedClip(r["file"], str(p["error"])))
            continue
        clips.append(Clip(len(clips), r["file"], tuple(r["captions"]), int(p["sample_rate"]), int(p["frames"]),
                          int(p["channels"])))
    return clips, skipped


def skipped_counts(skipped: list[SkippedClip]) -> dict[str, int]:
    """Counts per kind of reason ('missing', 'unreadable', 'duplicate file name', ...)."""
    return dict(Counter(s.reason.split(":")[0].split(" (")[0] for s in skipped))


def clip_table(clips: list[Clip]) -> list[dict]:
    return [asdict(c) for c in clips]
