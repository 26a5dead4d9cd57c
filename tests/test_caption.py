"""Caption job: tiny offline Qwen2-Audio backend, windowing, the Ray job end to end, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from larcq_ray.caption.backends import build_caption_backend
from larcq_ray.caption.config import CaptionBackendConfig
from larcq_ray.caption.windows import caption_windows, timeline_caption
from larcq_ray.caption.job import run_caption, unique_audio_ids_from_shortlist
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import AudioRef

from conftest import CAPTIONS, tone


@pytest.fixture(scope="module")
def tiny_alm(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio

    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_alm"), CAPTIONS * 20, seed=0)


def _cfg(model: Path, **kw) -> CaptionBackendConfig:
    return CaptionBackendConfig(model=str(model), max_new_tokens=6, local_files_only=True, **kw)


# --- windows ---------------------------------------------------------------------------------

def test_windows_shorter_than_one_window():
    assert caption_windows(16000, 16000, 30.0) == [(0, 16000)]
    assert caption_windows(100, 16000, 30.0) == [(0, 100)]  # tiny but the only window: kept
    assert caption_windows(0, 16000, 30.0) == []


def test_windows_exact_multiple_and_tails():
    sr = 100
    assert caption_windows(90 * sr, sr, 30.0) == [(0, 3000), (3000, 6000), (6000, 9000)]
    assert caption_windows(75 * sr, sr, 30.0) == [(0, 3000), (3000, 6000), (6000, 7500)]  # partial tail kept
    assert caption_windows(60 * sr + 50, sr, 30.0) == [(0, 3000), (3000, 6000)]  # 0.5 s tail dropped
    spans = caption_windows(150 * sr + 7, sr, 30.0)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back


def test_timeline_caption():
    text = timeline_caption(["rain falls", " a dog barks ", ""], [(30.0, 60.0), (0.0, 30.0), (60.0, 75.5)])
    assert text == "0-30 s: a dog barks; 30-60 s: rain falls"
    with pytest.raises(ValueError):
        timeline_caption(["x"], [])


# --- backend ---------------------------------------------------------------------------------

def test_backend_captions_a_batch(tiny_alm):
    backend = build_caption_backend(_cfg(tiny_alm, batch_size=2))
    assert backend.sample_rate == 16000 and backend.window_s == 4.0  # the tiny model's chunk_length
    waves = [tone(2.0, 16000, 440.0), tone(3.0, 16000, 880.0)]
    first = backend.caption(waves)
    assert len(first) == 2 and all(isinstance(c, str) and c for c in first)
    assert backend.caption(waves) == first  # greedy: deterministic
    assert backend.caption(waves[:1]) == first[:1]  # left padding: batch-mates do not change a caption


def test_backend_with_lora_adapter(tiny_alm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2AudioForConditionalGeneration

    lora = get_peft_model(Qwen2AudioForConditionalGeneration.from_pretrained(tiny_alm),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    backend = build_caption_backend(_cfg(tiny_alm, adapter=str(tmp_path / "lora")))
    assert backend.name == f"{tiny_alm}+{tmp_path / 'lora'}"
    assert backend.caption([tone(2.0, 16000)])[0]
    with pytest.raises(LarcqError, match="not a folder"):
        build_caption_backend(_cfg(tiny_alm, adapter=str(tmp_path / "missing")))


def test_backend_errors(tiny_alm, tmp_path):
    with pytest.raises(LarcqError, match="no such folder"):
        build_caption_backend(_cfg(tmp_path / "nope" / "model"))
    with pytest.raises(LarcqError, match="hub"):
        build_caption_backend(_cfg(Path("someone/not-a-real-alm")))
    with pytest.raises(LarcqError, match="longer than"):
        build_caption_backend(_cfg(tiny_alm, window_s=10.0))


# --- the Ray job -----------------------------------------------------------------------------

def _corpus(folder: Path) -> list[AudioRef]:
    folder.mkdir()
    sf.write(folder / "a.wav", tone(2.0, 16000, 440), 16000)  # one window
    sf.write(folder / "b.wav", tone(5.0, 48000, 660), 48000)  # 2 + 2 + 1 s (resampled)
    sf.write(folder / "c.flac", tone(4.5, 22050, 300, channels=2), 22050)  # 2 + 2 s, 0.5 s tail dropped
    (folder / "broken.wav").write_text("not audio\n" * 20)
    return [AudioRef(p.name, str(p)) for p in sorted(folder.iterdir())]


def test_run_caption_end_to_end_and_resume(ray_session, tiny_alm, tmp_path):
    refs = _corpus(tmp_path / "audio")
    cfg = _cfg(tiny_alm, window_s=2.0, batch_size=4)
    out = tmp_path / "run" / "captions.parquet"
    summary = run_caption(refs + refs[:2], cfg, out)  # duplicates are captioned once
    assert (summary.done, summary.failed, summary.skipped, summary.units) == (3, 1, 0, 6)
    assert summary.reasons == {"unreadable": 1}

    t = pq.read_table(out).to_pandas()
    assert set(t.columns) == {"audio_id", "chunk_index", "start_s", "end_s", "captioner", "prompt", "caption",
                              "status", "error", "settings"}
    assert json.loads(t.settings.iloc[0])["window_s"] == 2.0 and json.loads(t.settings.iloc[0])["max_new_tokens"] == cfg.max_new_tokens
    assert not (out.parent / "captions.parts").exists()  # the run's parts were folded into one file
    assert not t.duplicated(["audio_id", "chunk_index"]).any()
    assert set(t.captioner) == {str(tiny_alm)} and set(t.prompt) == {cfg.prompt}
    windows = {aid: g.sort_values("chunk_index") for aid, g in t.groupby("audio_id")}
    assert [len(windows[a]) for a in ("a.wav", "b.wav", "c.flac")] == [2, 4, 3]  # windows + timeline
    b = windows["b.wav"]
    assert list(b.chunk_index) == [-1, 0, 1, 2]
    assert np.allclose(b.start_s.iloc[1:], [0, 2, 4]) and np.allclose(b.end_s.iloc[1:], [2, 4, 5])
    assert (b.status == "ok").all() and (b.caption.str.len() > 0).all()
    assert b.caption.iloc[0].startswith("0-2 s: ") and "; 4-5 s: " in b.caption.iloc[0]
    broken = windows["broken.wav"]
    assert len(broken) == 1 and broken.chunk_index.iloc[0] == -1 and broken.status.iloc[0] == "failed"
    assert broken.error.iloc[0].startswith("unreadable")

    # Resume: the good files are skipped; the broken one is retried and its row replaced, not duplicated.
    again = run_caption(refs, cfg, out)
    assert (again.skipped, again.done, again.failed) == (3, 0, 1)
    t2 = pq.read_table(out).to_pandas()
    assert len(t2) == len(t) and not t2.duplicated(["audio_id", "chunk_index"]).any()
    good = [r for r in refs if r.audio_id != "broken.wav"]
    assert run_caption(good, cfg, out).skipped == 3

    # Any setting that changes a caption makes a file due again (not only model and prompt).
    for change in ({"max_new_tokens": 3}, {"window_s": 1.5}, {"num_beams": 2}):
        redo = run_caption(good[:1], cfg.model_copy(update=change), out)
        assert (redo.skipped, redo.done) == (0, 1), change
    t3 = pq.read_table(out).to_pandas()
    assert not t3.duplicated(["audio_id", "chunk_index"]).any()
    a = t3[t3.audio_id == "a.wav"]
    assert {json.loads(s)["num_beams"] for s in a.settings} == {2}  # the newest captions replaced the old


def test_an_interrupted_caption_run_keeps_its_committed_parts(ray_session, tiny_alm, tmp_path, monkeypatch):
    """Parts committed before a failure survive it, and the next run skips their files."""
    from larcq_ray.caption import job as caption_job

    refs = [r for r in _corpus(tmp_path / "audio") if r.audio_id != "broken.wav"]
    cfg = _cfg(tiny_alm, window_s=2.0, batch_size=4)
    out = tmp_path / "run" / "captions.parquet"
    real_collect = caption_job.collect_files

    def die_after_first_commit(ds, n, **kw):  # like Ctrl-C once one file is committed
        commit = kw["commit"]

        def commit_then_interrupt(results):
            commit(results)
            raise KeyboardInterrupt

        return real_collect(ds, n, **{**kw, "commit": commit_then_interrupt})

    monkeypatch.setattr(caption_job, "collect_files", die_after_first_commit)
    with pytest.raises(KeyboardInterrupt):
        run_caption(refs, cfg, out, commit_every_files=1)
    monkeypatch.undo()
    kept = pq.read_table(out).to_pandas().query("chunk_index == -1")
    assert len(kept) == 1 and kept.status.iloc[0] == "ok"
    again = run_caption(refs, cfg, out)
    assert (again.skipped, again.done) == (1, 2)


def test_unique_audio_ids_from_shortlist(tmp_path):
    path = tmp_path / "shortlist.parquet"
    pq.write_table(pa.table({
        "query_id": [0, 0, 0, 1, 1, 1, 0, 1],
        "mode": ["m1"] * 6 + ["m2"] * 2,
        "rank": [1, 2, 3, 1, 2, 3, 1, 1],
        "audio_id": ["x", "y", "z", "y", "w", "x", "v", "x"],
        "score": [0.9, 0.8, 0.7, 0.9, 0.8, 0.7, 0.5, 0.5],
    }), path)
    assert unique_audio_ids_from_shortlist(path) == ["x", "v", "y", "w", "z"]  # best rank first
    assert unique_audio_ids_from_shortlist(path, modes=["m1"], top_n=2) == ["x", "y", "w"]
    with pytest.raises(LarcqError, match="no rows for mode"):
        unique_audio_ids_from_shortlist(path, modes=["nope"])
    with pytest.raises(LarcqError, match="no shortlist"):
        unique_audio_ids_from_shortlist(tmp_path / "missing.parquet")


def test_caption_cli_from_a_plain_id_list(ray_session, tiny_alm, tmp_path, capsys):
    """`larcq-ray caption --audio-ids FILE`: no shortlist needed; an id with no file ends as a failed row."""
    import yaml

    from larcq_ray.core.inputs import read_audio_id_list
    from larcq_ray.cli import main

    _corpus(tmp_path / "audio")
    ids = tmp_path / "ids.txt"
    ids.write_text("# to caption\na.wav\n\nb.wav\na.wav\nmissing.wav\n")
    assert read_audio_id_list(ids) == ["a.wav", "b.wav", "missing.wav"]
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"corpus": str(tmp_path / "audio")},
           "caption": {"backend": {"model": str(tiny_alm), "max_new_tokens": 4, "local_files_only": True,
                                   "window_s": 2.0}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["caption", "--config", str(tmp_path / "c.yaml"), "--audio-ids", str(ids)]) == 0
    t = pq.read_table(tmp_path / "run" / "captions.parquet").to_pandas()
    assert sorted(t.audio_id.unique()) == ["a.wav", "b.wav", "missing.wav"]
    assert (t[t.audio_id != "missing.wav"].status == "ok").all()
    missing = t[t.audio_id == "missing.wav"]
    assert len(missing) == 1 and missing.status.iloc[0] == "failed" and missing.error.iloc[0]

    pq.write_table(pa.table({"audio_id": ["c.flac"], "other": [1]}), tmp_path / "ids.parquet")
    assert read_audio_id_list(tmp_path / "ids.parquet") == ["c.flac"]
    (tmp_path / "ids.csv").write_text("query,audio_id\nx,c.flac\ny,a.wav\n")
    assert read_audio_id_list(tmp_path / "ids.csv") == ["c.flac", "a.wav"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    assert main(["caption", "--config", str(tmp_path / "c.yaml"), "--audio-ids", str(tmp_path / "empty.txt")]) == 2
    assert "holds no ids" in capsys.readouterr().err

    # `--audio-ids index`: every audio the index holds (a failed file is not one), e.g. for /search's rerank
    cfg["run_dir"] = str(tmp_path / "run2")
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["caption", "--config", str(tmp_path / "c2.yaml"), "--audio-ids", "index"]) == 2
    assert "no index in" in capsys.readouterr().err
    from larcq_ray.index.store import IndexStore

    store = IndexStore(tmp_path / "run2" / "index")
    store.open_for_write({"model": "m"})
    ok = {"duration_s": 4.0, "sample_rate": 16000, "channels": 1, "n_chunks": 1, "status": "ok"}
    store.commit([{"audio_id": "b.wav", **ok}, {"audio_id": "a.wav", **ok},
                  {"audio_id": "bad.wav", **ok, "status": "failed", "error": "corrupt"}],
                 [{"audio_id": a, "chunk_index": 0, "start_s": 0.0, "end_s": 4.0, "embedding": [0.0, 1.0]}
                  for a in ("a.wav", "b.wav")])
    assert main(["caption", "--config", str(tmp_path / "c2.yaml"), "--audio-ids", "index"]) == 0
    t = pq.read_table(tmp_path / "run2" / "captions.parquet").to_pandas()
    assert sorted(t.audio_id.unique()) == ["a.wav", "b.wav"] and (t.status == "ok").all()
