"""Captioner training data: the input readers, and the Ray Data stages that prepare encoder inputs.

Inputs (each becomes `Clip`s of train/data.py: one piece of audio with all its captions):
- the Clotho layout (`read_clotho_csv`): file_name, caption_1..caption_N + the audio folder;
- a LARCQ provenance.parquet (`read_provenance`): each clip a segment of a long audio;
- SLAM-AAC's jsonl (seed 001) `{"key", "source", "target"}`: rows with the same source are one clip;
- DRCap's jsonl (seed 002) `{"key", "target", "text"}`: text only (a `source` field adds audio);
- for drcap only, a text CSV with a `caption` column (no audio at all).
Rows that cannot be used are skipped and counted with the reason (train_captioner_skipped.csv).

Stages (the stage contract, core/stage.py), Ray Data CPU tasks:
- `EncoderInputStage`: decode, cut the segment, cut to the window (the encoder's input limit; a clip
  longer than that keeps its first window), compute the encoder inputs with the encoder's feature
  extractor only (`audio_encoders.featurize`, what `PrefixLm.featurize` calls). prefix-lm.
- `EncoderFramesStage`: a frozen encoder's frames, computed once per clip in an actor pool (GPU where
  present), so that training runs the connector and decoder only (`cache_encoder_frames`).
- `WindowStage`: decode and cut only, the window's samples as float32 bytes (drcap's validation
  captions: DrCap computes its CLAP inputs itself).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.stage import Resources, map_stage
from larcq_ray.caption.prefix_lm import FRAMES_INPUT
from larcq_ray.train.data import Clip, PairSet, read_clotho_csv, read_provenance

FEATURE_PREFIX = "x_"  # encoder-input columns of the feature dataset: x_input_features, x_is_longer, ...


def _skip(source: str, clip_id: str, column: str, reason: str) -> dict:
    return {"source": source, "clip_id": clip_id, "caption_column": column, "reason": reason}


def _text_group(key: str) -> str:
    """Text-only rows are grouped by key without a trailing _<n> (seed files number an audio's captions)."""
    return re.sub(r"_\d+$", "", key) or key


# ---------------------------------------------------------------- readers

def read_jsonl(path: str | Path, audio_dir: str | Path | None = None, source: str = "train",
               need_audio: bool = True) -> PairSet:
    """SLAM-AAC rows {"key", "source", "target"} and DRCap rows {"key", "target", "text"}.

    The caption is `target` (else `text`). Rows with the same audio `source` are one clip with all
    their captions; without a source a row is a text-only clip (kept only when `need_audio` is False).
    """
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"jsonl file not found: {path}")
    base = Path(audio_dir) if audio_dir else path.parent
    out = PairSet()
    by_audio: dict[str, Clip] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                out.skipped.append(_skip(source, f"line {n}", "", f"bad jsonl row: {e.msg}"))
                continue
            if not isinstance(row, dict):
                out.skipped.append(_skip(source, f"line {n}", "", "bad jsonl row: not a JSON object"))
                continue
            key = str(row.get("key") or f"line {n}")
            text = str(row.get("target") or row.get("text") or "").strip()
            column = "target" if "target" in row else "text"
            if not text:
                out.skipped.append(_skip(source, key, column, "empty caption"))
                continue
            audio = str(row.get("source") or "").strip()
            if not audio:
                if need_audio:
                    out.skipped.append(_skip(source, key, "source", "no audio: the row has no source (a text-only "
                                                                    "row; prefix-lm trains on audio)"))
                else:
                    out.clips.append(Clip(key, "", _text_group(key), [text]))
                continue
            full = Path(audio) if Path(audio).is_absolute() else base / audio
            clip = by_audio.get(str(full))
            if clip is None:
                clip = by_audio[str(full)] = Clip(key, str(full), str(full), [])
                out.clips.append(clip)
            clip.captions.append(text)
    return out


def _csv_columns(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def read_caption_texts(path: str | Path, source: str = "train") -> PairSet:
    """A text CSV with a `caption` column: each non-empty caption is a text-only clip (drcap)."""
    path = Path(path)
    out = PairSet()
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), 1):
            text = (row.get("caption") or "").strip()
            cid = f"row {n}"
            if text:
                out.clips.append(Clip(cid, "", cid, [text]))
            else:
                out.skipped.append(_skip(source, cid, "caption", "empty caption"))
    return out


def read_captions_csv(path: str | Path, audio_dir: str | Path | None, source: str = "train",
                      need_audio: bool = True) -> PairSet:
    """The Clotho layout (file_name + caption_N, with audio_dir), or a text CSV (`caption`; drcap)."""
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"captions CSV not found: {path}")
    cols = _csv_columns(path)
    if "file_name" in cols:
        if need_audio and not audio_dir:
            raise LarcqError(f"{path} is in the Clotho layout: give train_captioner.data.audio_dir (the folder "
                             "holding its file_name entries)")
        return read_clotho_csv(path, audio_dir or path.parent, source)
    if "caption" in cols:
        if need_audio:
            raise LarcqError(f"{path} has a caption column but no file_name column: a text-only CSV trains "
                             "kind: drcap only; prefix-lm needs the Clotho layout (file_name, caption_1..N)")
        return read_caption_texts(path, source)
    raise LarcqError(f"{path} needs file_name + caption_1..caption_N columns (the Clotho layout) or a caption "
                     f"column (text only, drcap), has {cols}")


def read_inputs(data, need_audio: bool) -> tuple[PairSet, PairSet]:
    """(train, val) clips from the `train_captioner.data` section."""
    from larcq_ray.train.data import split_by_group

    if data.captions_csv:
        train = read_captions_csv(data.captions_csv, data.audio_dir, "train", need_audio)
    elif data.provenance:
        train = read_provenance(data.provenance, data.audios_dir, "train")
    else:
        train = read_jsonl(data.jsonl, data.audio_dir, "train", need_audio)
    if data.val_csv:
        val = read_captions_csv(data.val_csv, data.val_audio_dir or data.audio_dir, "val", need_audio)
    elif data.val_jsonl:
        val = read_jsonl(data.val_jsonl, data.val_audio_dir or data.audio_dir, "val", need_audio)
    else:
        tr, va = split_by_group(train.clips, data.val_fraction, data.seed)
        val = PairSet(va, [])
        train = PairSet(tr, train.skipped)
    if not train.clips:
        raise LarcqError("no training captions: every input row was skipped (see the skipped rows' reasons)")
    return train, val


def clip_rows(clips: list[Clip]) -> list[dict]:
    rows = [{"clip_id": c.clip_id, "path": c.path, "start_s": c.start_s, "end_s": c.end_s,
             "captions": json.dumps(c.captions)} for c in clips]
    return sorted(rows, key=lambda r: (r["path"], r["start_s"], r["clip_id"]))  # segments of a file together


# ---------------------------------------------------------------- decoding (shared by the stages)

def _windows(batch: dict, sample_rate: int, window_s: float) -> tuple[list[Optional[np.ndarray]], list[str]]:
    """Per row: the clip's first `window_s` seconds (or None) and the error ("" when fine)."""
    from larcq_ray.core.audio import decode_audio

    decoded: dict[str, Any] = {}  # segments of one long audio share a decode
    n_max = int(round(window_s * sample_rate))
    waves, errors = [], []
    for path, start, end in zip(batch["path"], batch["start_s"], batch["end_s"]):
        path, start, end = str(path), float(start), float(end)
        if not path:
            waves.append(None)
            errors.append("no audio: a text-only row")
            continue
        if path not in decoded:
            decoded[path] = decode_audio(path, sample_rate)
        d = decoded[path]
        if d.status != "ok":
            waves.append(None)
            errors.append(d.error)
            continue
        x = d.samples
        if start >= 0:
            x = x[int(round(start * sample_rate)):int(round(end * sample_rate))]
            if len(x) == 0:
                waves.append(None)
                errors.append(f"empty: segment [{start:g}, {end:g}) s holds no samples")
                continue
        waves.append(np.ascontiguousarray(x[:n_max], dtype=np.float32))
        errors.append("")
    return waves, errors


def _base_columns(batch: dict, errors: list[str]) -> dict:
    return {"clip_id": np.asarray(batch["clip_id"], dtype=object),
            "captions": np.asarray(batch["captions"], dtype=object),
            "status": np.asarray(["failed" if e else "ok" for e in errors], dtype=object),
            "error": np.asarray(errors, dtype=object)}


@dataclass
class EncoderInputStage:
    """Ray Data task stage: clip -> encoder inputs (columns x_<name>), with the feature extractor only.

    `window_s` None: the encoder's own input limit. Encoders without one ("auto" models without a
    fixed length) need `window_s`; their windows are zero-padded to it so every row has one shape.
    """

    encoder: str  # hub id or folder
    encoder_type: str = "auto"
    window_s: Optional[float] = None
    local_files_only: bool = False
    name: str = "encoder_inputs"
    _fe: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def setup(self) -> None:
        from larcq_ray.caption import audio_encoders as ae

        self._kind = ae.encoder_type(self.encoder, self.encoder_type, self.local_files_only)
        self._fe = ae.load_feature_extractor(self.encoder, self._kind, self.local_files_only)
        self.sample_rate = int(self._fe.sampling_rate)
        self.window = resolve_window(self.window_s, ae.max_seconds(self._fe, self._kind), self.encoder)
        self._pad = ae.max_seconds(self._fe, self._kind) is None
        probe = self._featurize([np.zeros(self.sample_rate, dtype=np.float32)])
        self._empty = {k: np.zeros_like(v[0]) for k, v in probe.items()}

    def _featurize(self, waves: list[np.ndarray]) -> dict[str, np.ndarray]:
        from larcq_ray.caption.audio_encoders import featurize

        if self._pad:
            n = int(round(self.window * self.sample_rate))
            waves = [np.pad(w, (0, max(0, n - len(w)))) for w in waves]
        out = featurize(self._fe, self._kind, waves)
        if self._kind == "clap" and "is_longer" in out:
            # ClapFeatureExtractor (fusion) flags a random clip of a batch without a long one as long;
            # windows are cut to the input limit, so a clip is "longer" only if its 4 mels differ.
            x = out["input_features"]
            flags = [x.shape[1] > 1 and not np.array_equal(f[0], f[1]) for f in x]
            out["is_longer"] = np.asarray(flags, dtype=bool).reshape(-1, 1)
        return out

    def process_batch(self, batch: dict) -> dict:
        waves, errors = _windows(batch, self.sample_rate, self.window)
        ok = [i for i, w in enumerate(waves) if w is not None]
        feats = self._featurize([waves[i] for i in ok]) if ok else {}
        out = _base_columns(batch, errors)
        for k, empty in self._empty.items():
            col = np.stack([empty] * len(waves))
            for j, i in enumerate(ok):
                col[i] = feats[k][j]
            out[FEATURE_PREFIX + k] = col
        return out

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["clip_id"])
        out = _base_columns(batch, [reason] * n)
        for k, empty in self._empty.items():
            out[FEATURE_PREFIX + k] = np.stack([empty] * n)
        return out


@dataclass
class EncoderFramesStage:
    """Ray Data actor stage: encoder inputs (x_* columns) -> the frozen encoder's frames, one column
    `x_encoder_frames` (T, D) float32 that `PrefixLm.prefix` reads in place of the inputs."""

    encoder: str
    encoder_type: str = "auto"
    local_files_only: bool = False
    device: str = "auto"
    name: str = "encoder_frames"

    def resources(self) -> Resources:
        return Resources(cpus=1, gpus="auto" if self.device == "auto" else (1 if self.device == "cuda" else 0),
                         actors=1)

    def setup(self) -> None:
        import torch

        from larcq_ray.caption import audio_encoders as ae
        from larcq_ray.core.devices import resolve_device

        self._kind = ae.encoder_type(self.encoder, self.encoder_type, self.local_files_only)
        self._device = torch.device(resolve_device(self.device, "train_captioner encoder"))
        self._module = ae.build_encoder_module(self.encoder, self._kind, self.local_files_only).to(self._device).eval()

    def process_batch(self, batch: dict) -> dict:
        import torch

        from larcq_ray.caption.audio_encoders import frames

        # copies: Ray Data hands out read-only arrays, which torch warns about
        inputs = {k[len(FEATURE_PREFIX):]: torch.as_tensor(np.array(v)).to(self._device)
                  for k, v in batch.items() if k.startswith(FEATURE_PREFIX)}
        with torch.inference_mode():
            f = frames(self._module, self._kind, inputs).float().cpu().numpy()
        self._shape = f.shape[1:]
        out = _base_columns(batch, [""] * len(f))
        out[FEATURE_PREFIX + FRAMES_INPUT] = f
        return out

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["clip_id"])
        out = _base_columns(batch, [f"encoder failed: {reason}"] * n)
        out[FEATURE_PREFIX + FRAMES_INPUT] = np.zeros((n, *getattr(self, "_shape", (1, 1))), dtype=np.float32)
        return out


@dataclass
class WindowStage:
    """Ray Data task stage: clip -> its window's samples (float32 bytes) at `sample_rate`."""

    sample_rate: int
    window_s: float
    name: str = "decode_windows"

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def setup(self) -> None:
        pass

    def process_batch(self, batch: dict) -> dict:
        waves, errors = _windows(batch, self.sample_rate, self.window_s)
        out = _base_columns(batch, errors)
        out["samples"] = np.asarray([w.tobytes() if w is not None else b"" for w in waves], dtype=object)
        return out

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["clip_id"])
        out = _base_columns(batch, [reason] * n)
        out["samples"] = np.asarray([b""] * n, dtype=object)
        return out


def resolve_window(window_s: Optional[float], max_s: Optional[float], encoder: str) -> float:
    if max_s is None:
        if window_s is None:
            raise LarcqError(f"audio encoder {encoder!r} has no fixed input length: set train_captioner.window_s")
        return float(window_s)
    if window_s is None:
        return float(max_s)
    if window_s > max_s + 1e-6:
        raise LarcqError(f"train_captioner.window_s {window_s:g} s is longer than the encoder takes in one input "
                         f"({max_s:g} s); lower it or leave it unset")
    return float(window_s)


def prepared_dataset(clips: list[Clip], stage, files_per_task: int, source: str, keep: list[str]):
    """(materialized dataset of the clips that decoded, skipped rows for those that did not)."""
    import ray

    if not clips:
        return None, []
    ds = map_stage(ray.data.from_items(clip_rows(clips)), stage, files_per_task).materialize()
    failed = ds.filter(lambda r: r["status"] == "failed").select_columns(["clip_id", "error"]).take_all()
    skipped = [_skip(source, r["clip_id"], "", f"audio failed: {r['error']}") for r in failed]
    good = ds.filter(lambda r: r["status"] == "ok")
    cols = [c for c in good.columns() if c in keep or c.startswith(FEATURE_PREFIX)]
    return good.select_columns(cols).materialize(), skipped


def encoder_input_dataset(clips: list[Clip], encoder: str, encoder_type: str, window_s: Optional[float],
                          local_files_only: bool, files_per_task: int, source: str):
    stage = EncoderInputStage(encoder=encoder, encoder_type=encoder_type, window_s=window_s,
                              local_files_only=local_files_only)
    return prepared_dataset(clips, stage, files_per_task, source, ["clip_id", "captions"])


def frames_dataset(ds, encoder: str, encoder_type: str, local_files_only: bool, device: str, batch_size: int,
                   source: str):
    """Encoder inputs -> the frozen encoder's frames (computed once, here, not at every step):
    (dataset of the clips the encoder took, skipped rows for those it failed on)."""
    if ds is None:
        return None, []
    stage = EncoderFramesStage(encoder=encoder, encoder_type=encoder_type, local_files_only=local_files_only,
                               device=device)
    out = map_stage(ds, stage, batch_size).materialize()
    failed = out.filter(lambda r: r["status"] == "failed").select_columns(["clip_id", "error"]).take_all()
    skipped = [_skip(source, r["clip_id"], "", f"audio failed: {r['error']}") for r in failed]
    good = out.filter(lambda r: r["status"] == "ok").select_columns(["clip_id", "captions",
                                                                     FEATURE_PREFIX + FRAMES_INPUT])
    return good.materialize(), skipped


def window_dataset(clips: list[Clip], sample_rate: int, window_s: float, files_per_task: int, source: str):
    stage = WindowStage(sample_rate=sample_rate, window_s=window_s)
    return prepared_dataset(clips, stage, files_per_task, source, ["clip_id", "captions", "samples"])


def text_dataset(clips: list[Clip]):
    """drcap training rows: one per caption (text only)."""
    import ray

    rows = [{"clip_id": c.clip_id, "caption": t} for c in clips for t in c.captions]
    return ray.data.from_items(rows).materialize()
