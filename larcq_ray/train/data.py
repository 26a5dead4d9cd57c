"""Training pairs from a Clotho-layout CSV or a LARCQ provenance.parquet, and the Ray Data feature stage.

A "clip" is one piece of audio (a whole file, or a [start_s, end_s) segment of a long audio) with
its captions; each caption makes one (audio, caption) pair. Training rows are clips: each epoch
draws one of a clip's captions, so a batch never holds the same audio twice (no false negatives).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.stage import Resources, map_stage

SKIPPED_COLUMNS = ["source", "clip_id", "caption_column", "reason"]


@dataclass
class Clip:
    clip_id: str
    path: str
    group: str  # the validation split draws whole groups (source files)
    captions: list[str]
    start_s: float = -1.0  # -1: the whole file
    end_s: float = -1.0


@dataclass
class PairSet:
    clips: list[Clip] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # rows of train_skipped.csv

    @property
    def n_pairs(self) -> int:
        return sum(len(c.captions) for c in self.clips)


def read_clotho_csv(csv_path: str | Path, audio_dir: str | Path, source: str = "train") -> PairSet:
    """`file_name, caption_1..caption_5`: every non-empty caption of a file is a pair."""
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    if not csv_path.is_file():
        raise LarcqError(f"captions CSV not found: {csv_path}")
    out = PairSet()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        cap_cols = [c for c in cols if c.startswith("caption")]
        if "file_name" not in cols or not cap_cols:
            raise LarcqError(f"{csv_path} needs a file_name column and caption_1..caption_N columns, has {cols}")
        for row in reader:
            name = (row.get("file_name") or "").strip()
            if not name:
                out.skipped.append({"source": source, "clip_id": "", "caption_column": "",
                                    "reason": "empty file_name"})
                continue
            caps = []
            for c in cap_cols:
                text = (row.get(c) or "").strip()
                if text:
                    caps.append(text)
                else:
                    out.skipped.append({"source": source, "clip_id": name, "caption_column": c,
                                        "reason": "empty caption"})
            if caps:
                out.clips.append(Clip(name, str(audio_dir / name), name, caps))
    return out


def read_provenance(parquet: str | Path, audios_dir: str | Path | None = None, source: str = "train") -> PairSet:
    """LARCQ provenance: each row is the segment [start_s, end_s) of audios/<audio_id> with its caption."""
    from larcq_ray import artifacts

    parquet = Path(parquet)
    if not parquet.is_file():
        raise LarcqError(f"provenance file not found: {parquet}")
    audios = Path(audios_dir) if audios_dir else parquet.parent / artifacts.BENCHMARK_AUDIOS
    out = PairSet()
    for r in artifacts.PROVENANCE.read_from(parquet).to_pylist():
        cid = f"{r['audio_id']}#{r['position']}"
        text = (r["caption"] or "").strip()
        if not text:
            out.skipped.append({"source": source, "clip_id": cid, "caption_column": "caption", "reason": "empty caption"})
            continue
        # grouped by source clip: the same clip in two long audios never lands on both sides of the split
        out.clips.append(Clip(cid, str(audios / r["audio_id"]), str(r["source_file"]), [text],
                              float(r["start_s"]), float(r["end_s"])))
    return out


def split_by_group(clips: list[Clip], fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """A seeded `fraction` of the groups (source files, not pairs) goes to validation."""
    if fraction <= 0:
        return clips, []
    groups = sorted({c.group for c in clips})
    n_val = max(1, round(len(groups) * fraction)) if len(groups) > 1 else 0
    val_groups = set(random.Random(seed).sample(groups, n_val))
    return [c for c in clips if c.group not in val_groups], [c for c in clips if c.group in val_groups]


def clip_rows(clips: list[Clip]) -> list[dict]:
    return [{"clip_id": c.clip_id, "path": c.path, "start_s": c.start_s, "end_s": c.end_s,
             "captions": json.dumps(c.captions)} for c in clips]


@dataclass
class FeaturizeClipsStage:
    """Ray Data task stage: decode (+ cut the segment) and compute CLAP features per clip.

    A clip that fails keeps its row with status "failed", zero features and the reason, so the
    job can count it; the training dataset filters those rows out.
    """

    model: str
    fusion_seed: int = 0
    local_files_only: bool = False
    name: str = "featurize"
    _fz: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def setup(self) -> None:
        from larcq_ray.models.clap import cached_featurizer

        self._fz = cached_featurizer(self.model, self.fusion_seed, self.local_files_only)
        self._shape = self._fz(np.zeros(self._fz.sample_rate, dtype=np.float32)).input_features.shape

    def process_batch(self, batch: dict) -> dict:
        from larcq_ray.core.audio import decode_audio

        fz = self._fz
        decoded: dict[str, object] = {}  # segments of one long audio share a decode
        feats, longer, status, error = [], [], [], []
        for path, start, end in zip(batch["path"], batch["start_s"], batch["end_s"]):
            path = str(path)
            if path not in decoded:
                decoded[path] = decode_audio(path, fz.sample_rate)
            d = decoded[path]
            err = "" if d.status == "ok" else d.error
            x = d.samples if not err else None
            if x is not None and start >= 0:
                x = x[int(round(start * fz.sample_rate)):int(round(end * fz.sample_rate))]
                if len(x) == 0:
                    err, x = f"empty: segment [{start:g}, {end:g}) s holds no samples", None
            if x is not None:
                f = fz(x)
                feats.append(f.input_features)
                longer.append(f.is_longer)
            else:
                feats.append(np.zeros(self._shape, dtype=np.float32))
                longer.append(False)
            status.append("failed" if err else "ok")
            error.append(err)
        return self._columns(batch, feats, longer, status, error)

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["clip_id"])
        return self._columns(batch, [np.zeros(self._shape, dtype=np.float32)] * n, [False] * n, ["failed"] * n,
                             [reason] * n)

    @staticmethod
    def _columns(batch, feats, longer, status, error) -> dict:
        return {
            "clip_id": np.asarray(batch["clip_id"], dtype=object),
            "captions": np.asarray(batch["captions"], dtype=object),
            "features": np.stack(feats).astype(np.float32),
            "is_longer": np.asarray(longer, dtype=bool),
            "status": np.asarray(status, dtype=object),
            "error": np.asarray(error, dtype=object),
        }


def feature_dataset(clips: list[Clip], model: str, *, fusion_seed: int = 0, local_files_only: bool = False,
                    files_per_task: int = 8, source: str = "train"):
    """(materialized dataset of good clips, skipped rows for the clips that failed to decode)."""
    import ray

    if not clips:
        return None, []
    rows = sorted(clip_rows(clips), key=lambda r: (r["path"], r["start_s"]))  # segments of a file together
    stage = FeaturizeClipsStage(model=model, fusion_seed=fusion_seed, local_files_only=local_files_only)
    ds = map_stage(ray.data.from_items(rows), stage, files_per_task).materialize()
    failed = ds.filter(lambda r: r["status"] == "failed").select_columns(["clip_id", "error"]).take_all()
    skipped = [{"source": source, "clip_id": r["clip_id"], "caption_column": "", "reason": f"audio failed: {r['error']}"}
               for r in failed]
    good = ds.filter(lambda r: r["status"] == "ok").select_columns(["clip_id", "captions", "features", "is_longer"])
    return good.materialize(), skipped


def write_skipped(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SKIPPED_COLUMNS)
        w.writeheader()
        w.writerows(rows)
