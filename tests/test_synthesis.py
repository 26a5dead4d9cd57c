"""Benchmark synthesis: Clotho-layout source -> long audios, queries.csv, provenance.parquet."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import read_queries
from larcq_ray.core.stage import Resources
from larcq_ray.synthesize.config import SynthesizeConfig
from larcq_ray.synthesize.job import run_synthesize
from larcq_ray.synthesize.plan import LongAudioPlan, PlannedClip
from larcq_ray.synthesize.render import render_batch, run_render_tasks

from conftest import CAPTIONS, tone

N_GOOD = 8


def _clotho_source(root: Path, loud: bool = False) -> tuple[Path, Path]:
    """8 good clips (mixed rates and channels) plus one row per kind of bad input."""
    audio = root / "development"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(N_GOOD):
        sr = 22050 if i < 5 else 16000  # most common: 22050; the others are resampled
        x = tone(1.0 + 0.25 * i, sr, freq=200 + 90 * i, channels=2 if i == 3 else 1, amp=0.99 if loud else 0.3)
        name = f"clip_{i}.wav"
        sf.write(audio / name, x, sr)
        rows.append([name] + [f"{CAPTIONS[i]} (take {k})." if k > 1 else f"{CAPTIONS[i].capitalize()}." for k in range(1, 6)])
    rows.append(["clip_0.wav"] + ["a duplicate row"] * 5)  # duplicate file name
    rows.append(["gone.wav"] + ["listed but missing"] * 5)
    (audio / "text.wav").write_text("not audio at all\n" * 20)
    rows.append(["text.wav"] + ["unreadable file"] * 5)
    sf.write(audio / "quiet.wav", tone(1.0, 22050), 22050)
    rows.append(["quiet.wav", "", "caption two", "", "", ""])  # caption_1 empty
    csv_path = root / "clotho_captions_development.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
        w.writerows(rows)
    return csv_path, audio


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _clotho_source(tmp_path_factory.mktemp("clotho"))


def _cfg(source, out: Path, **kw) -> SynthesizeConfig:
    csv_path, audio = source
    base = dict(captions_csv=str(csv_path), audio_dir=str(audio), out_dir=str(out), n_audios=6,
                clips_per_audio=(2, 3), seed=7, gap_s=0.25, commit_every=2)
    return SynthesizeConfig(**{**base, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "_synthesis" not in p.parts and p.name != "synthesis_report.json"}


def test_synthesize_writes_the_larcq_layout_with_provenance(ray_session, source, tmp_path):
    out = tmp_path / "bench"
    summary = run_synthesize(_cfg(source, out))
    assert (summary.planned, summary.written, summary.resumed, summary.failed) == (6, 6, 0, {})
    assert summary.usable_clips == N_GOOD and summary.sample_rate == 22050
    assert summary.skipped_clips == {"duplicate file name": 1, "missing": 1, "unreadable": 1, "empty caption": 1}
    skipped = {r["file"]: r["reason"] for r in csv.DictReader(open(out / "skipped_clips.csv"))}
    assert set(skipped) == {"clip_0.wav", "gone.wav", "text.wav", "quiet.wav"}

    with open(out / "queries.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["audio_id", "query", "split_1", "split_2", "split_3"]
    prov = pq.read_table(out / "provenance.parquet").to_pandas()
    captions_of = {f"clip_{i}.wav": f"{CAPTIONS[i].capitalize()}." for i in range(N_GOOD)}
    for row in rows[1:]:
        aid, query, splits = row[0], row[1], [s for s in row[2:] if s]
        p = prov[prov.audio_id == aid].sort_values("position")
        assert 2 <= len(p) <= 3 and list(p.position) == list(range(1, len(p) + 1))
        assert p.source_file.is_unique  # never the same clip twice in one long audio
        assert splits == [captions_of[f] for f in p.source_file] == list(p.caption)
        # the research recipe: trailing period removed, ", "-joined, lower-cased
        assert query == ", ".join(s.rstrip(".") for s in splits).lower()
        # ground truth localized in time: each clip's span, 0.25 s of silence between clips
        durations = [sf.info(str(source[1] / f)).duration for f in p.source_file]
        assert np.allclose(p.end_s - p.start_s, durations, atol=1e-3)
        assert np.allclose(p.start_s.iloc[1:].values, p.end_s.iloc[:-1].values + 0.25, atol=1e-3)
        x, sr = sf.read(out / "audios" / aid)
        assert sr == 22050 and x.ndim == 1 and abs(len(x) / sr - p.end_s.iloc[-1]) < 1e-3
        gap = x[int(p.end_s.iloc[0] * sr) + 5: int(p.start_s.iloc[1] * sr) - 5]
        assert len(gap) > 0 and np.abs(gap).max() < 1e-3
    parsed = read_queries(out / "queries.csv")  # what index/search read
    assert [q.audio_id for q in parsed] == [r[0] for r in rows[1:]]
    report = json.loads((out / "synthesis_report.json").read_text())
    assert report["n_written"] == 6 and report["clips_resampled"] == 3


def test_same_seed_same_bytes_and_resume_renders_only_what_is_missing(ray_session, source, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_synthesize(_cfg(source, a))
    run_synthesize(_cfg(source, b))
    first = _files(a)
    assert first == _files(b) and len([k for k in first if k.startswith("audios/")]) == 6
    other = tmp_path / "c"
    run_synthesize(_cfg(source, other, seed=8))
    assert (other / "queries.csv").read_bytes() != first["queries.csv"]

    # A crash after 4 audios: two audios and the final tables are missing.
    victims = sorted((a / "audios").iterdir())[:2]
    for p in victims + [a / "queries.csv", a / "provenance.parquet"]:
        p.unlink()
    again = run_synthesize(_cfg(source, a))
    assert (again.resumed, again.written) == (4, 2)
    assert _files(a) == first
    assert run_synthesize(_cfg(source, a)).written == 0  # all done: nothing re-rendered

    with pytest.raises(LarcqError, match="other settings"):
        run_synthesize(_cfg(source, a, gap_s=0.5))


def test_constraints_reuse_cap_duration_bounds_and_crossfade(ray_session, tmp_path):
    src = _clotho_source(tmp_path / "loud", loud=True)
    out = tmp_path / "capped"
    # 8 clips, cap 1 use each, 2 clips per audio: exactly 4 audios fit
    run_synthesize(_cfg(src, out, n_audios=4, clips_per_audio=2, max_clip_uses=1, gap_s=0.0))
    prov = pq.read_table(out / "provenance.parquet").to_pandas()
    assert prov.source_file.value_counts().max() == 1 and len(prov) == 8
    with pytest.raises(LarcqError, match="max_clip_uses"):
        run_synthesize(_cfg(src, tmp_path / "too_many", n_audios=5, clips_per_audio=2, max_clip_uses=1))
    with pytest.raises(LarcqError, match="duration bounds"):
        run_synthesize(_cfg(src, tmp_path / "impossible", min_duration_s=100.0, max_draws=50))

    out = tmp_path / "xfade"
    run_synthesize(_cfg(src, out, gap_s=0.0, crossfade_s=0.2, clips_per_audio=3, min_duration_s=3.5,
                        max_duration_s=5.0))
    prov = pq.read_table(out / "provenance.parquet").to_pandas()
    for aid, p in prov.groupby("audio_id"):
        p = p.sort_values("position")
        total = p.end_s.iloc[-1]
        assert 3.5 - 1e-3 <= total <= 5.0 + 1e-3
        assert np.allclose(p.start_s.iloc[1:].values, p.end_s.iloc[:-1].values - 0.2, atol=1e-3)  # overlaps
        x, _ = sf.read(out / "audios" / aid, dtype="float32")
        assert np.abs(x).max() <= 0.9991  # loud clips summed in the fades: scaled, not clipped
    with pytest.raises(ValueError, match="exclude each other"):
        SynthesizeConfig(gap_s=0.1, crossfade_s=0.1)


def test_a_clip_that_fails_to_decode_fails_its_audio_only(tmp_path, source):
    plan = LongAudioPlan("x.wav", (PlannedClip("clip_1.wav", "a", 22050, 100), PlannedClip("vanished.wav", "b", 22050, 100)))
    good = LongAudioPlan("y.wav", (PlannedClip("clip_1.wav", "a", 22050, 100),))
    out = render_batch({"plan": np.array([plan.to_json(), good.to_json()])}, audio_dir=str(source[1]),
                       out_dir=str(tmp_path), rate=22050, gap_s=0.0, crossfade_s=0.0, subtype="PCM_16")
    assert list(out["status"]) == ["failed", "ok"]
    assert "vanished.wav" in out["error"][0] or "FileNotFound" in out["error"][0]
    assert not (tmp_path / "audios" / "x.wav").exists() and (tmp_path / "audios" / "y.wav").exists()


def test_synthesize_cli_and_bad_source(ray_session, source, tmp_path, capsys):
    from larcq_ray.cli import main

    csv_path, audio = source
    cfg = {"synthesize": {"captions_csv": str(csv_path), "audio_dir": str(audio), "out_dir": str(tmp_path / "o"),
                          "n_audios": 2, "clips_per_audio": 2, "query_caption": "random"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["synthesize", "--config", str(tmp_path / "c.yaml")]) == 0
    assert len(read_queries(tmp_path / "o" / "queries.csv")) == 2
    report = json.loads((tmp_path / "o" / "synthesis_report.json").read_text())
    assert report["n_written"] == 2 and report["usable_clips"] == N_GOOD + 1  # "random": caption_2 serves quiet.wav

    cfg["synthesize"]["caption_columns"] = ["caption"]
    cfg["synthesize"]["query_caption"] = "caption"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["synthesize", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "lacks column(s) ['caption']" in capsys.readouterr().err
    cfg["synthesize"]["query_caption"] = "caption_9"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["synthesize", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "query_caption" in capsys.readouterr().err


@dataclass
class _MeetStage:
    """Rows "long", "s0", "s1", ... and "die". "long" runs until every "s*" row has finished, and
    each "s*" row first waits for "long" to be running (a wait gives up after 30 s, or once
    "long" has ended, noted "timeout"); a row notes how many rows were running beside it; "die" kills its worker."""

    folder: str
    n_short: int
    name: str = "meet"

    def resources(self) -> Resources:
        return Resources(cpus=1)

    def setup(self) -> None:
        pass

    def _wait(self, ready) -> str:
        deadline = time.monotonic() + 30
        while not ready():
            if time.monotonic() > deadline or (Path(self.folder) / "end-long").exists():
                return "timeout"
            time.sleep(0.02)
        return "ok"

    def process_batch(self, batch: dict) -> dict:
        folder, out = Path(self.folder), []
        for key in batch["key"]:
            key = str(key)
            if key == "die":
                os._exit(1)
            (folder / f"run-{key}").touch()
            if key == "long":
                note = self._wait(lambda: len(list(folder.glob("done-*"))) >= self.n_short)
                running = 0
                (folder / "end-long").touch()  # short rows that still wait for it give up
            else:
                note = self._wait(lambda: (folder / "run-long").exists())
                running = len(list(folder.glob("run-*")))
                (folder / f"done-{key}").touch()
            (folder / f"run-{key}").unlink()
            out.append((key, note, running))
        return {"key": np.asarray([o[0] for o in out]), "note": np.asarray([o[1] for o in out]),
                "running": np.asarray([o[2] for o in out])}

    def failed_batch(self, batch: dict, reason: str) -> dict:
        n = len(batch["key"])
        return {"key": np.asarray(batch["key"]), "note": np.asarray([reason] * n), "running": np.zeros(n, dtype=int)}


def test_render_tasks_keep_every_worker_busy_and_lose_no_row(ray_session, tmp_path):
    """The render stage scales with workers: a finished render's slot is refilled at once.

    With 2 workers, one long render runs until all the short ones are done, and each short one
    waits for the long one to be running: they must all run beside it, one after another in the
    other slot. A runner that ran one render at a time, or waited for every render in flight
    before starting more, leaves them at their timeouts. (The
    Ray Data stage it replaces did get there, but only after up to 0.1 s of idle slot per task:
    benchmarks/bench_synthesis.py measures that; this test checks the structure without timing.)
    """
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    n_short = 6
    keys = ["long"] + [f"s{i}" for i in range(n_short)] + ["die"]
    stage = _MeetStage(str(tmp_path), n_short)
    rows = [row for b in run_render_tasks(stage, [{"key": np.asarray([k])} for k in keys], 2)
            for row in zip(b["key"], b["note"], b["running"])]
    assert sorted(r[0] for r in rows) == sorted(keys)  # every row back, once
    notes = {str(k): str(n) for k, n, _ in rows}
    assert all(notes[k] == "ok" for k in keys[:-1]), notes  # "long" and every "s*" met
    assert "WorkerCrashedError" in notes["die"] or "died" in notes["die"].lower(), notes["die"]
    # each short render ran beside "long", and never a third one: 2 workers, both busy
    assert {int(r) for k, _, r in rows if str(k).startswith("s")} == {2}


def test_synthesize_renders_one_audio_per_task_with_num_workers(ray_session, source, tmp_path, monkeypatch):
    import larcq_ray.synthesize.job as job

    calls = []

    def spy(stage, batches, workers):
        calls.append(([len(b["plan"]) for b in batches], workers))
        return run_render_tasks(stage, batches, workers)

    monkeypatch.setattr(job, "run_render_tasks", spy)
    summary = run_synthesize(_cfg(source, tmp_path / "w", num_workers=2))
    assert summary.written == 6 and calls == [([1] * 6, 2)]
