"""Long files are decoded, chunked and featurized window by window, with the whole-file path's output."""

import numpy as np
import pytest
import soundfile as sf

from larcq_ray.index.stages import DecodeChunkStage


def _stage(model, mode, **kw):
    stage = DecodeChunkStage(
        model=str(model), fusion_seed=3, local_files_only=True,
        chunking={"mode": mode, "window_s": 10.0, "overlap_s": 2.0 if mode == "fixed" else 0.0, "min_chunk_s": 1.0},
        whole_file=True, silence_threshold_db=-80.0, memory_mb=512, **kw)
    stage.setup()
    return stage


def _rows(out):
    parts = [out] if isinstance(out, dict) else list(out)
    return parts, sorted(({k: p[k][i] for k in p} for p in parts for i in range(len(p["audio_id"]))),
                         key=lambda r: (str(r["audio_id"]), int(r["chunk_index"])))


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    # 44.1 kHz stereo, 75 s: many 2**18-frame blocks, resampled to 48 kHz on the way.
    d = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    n = int(75.3 * 44100)
    x = (0.1 * rng.standard_normal((n, 2))).astype(np.float32)
    x[:, 0] += 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 44100)
    x[n // 2:, 1] += 0.2 * np.sin(2 * np.pi * 3000 * np.arange(n - n // 2) / 44100)
    sf.write(d / "long.flac", x, 44100)
    sf.write(d / "short.wav", x[: 3 * 44100, 0], 44100)
    return d


@pytest.mark.parametrize("mode", ["fixed", "equal", "none"])
@pytest.mark.parametrize("fused", [True, False])
def test_windowed_decoding_gives_the_whole_file_features(tiny_clap, tiny_clap_unfused, long_file, mode, fused):
    model = tiny_clap if fused else tiny_clap_unfused
    batch = {"audio_id": np.array(["long.flac", "short.wav"]),
             "path": np.array([str(long_file / "long.flac"), str(long_file / "short.wav")])}
    old = _stage(model, mode).process_batch(batch)  # 75 s < stream_over_s: the whole-file path
    assert isinstance(old, dict)
    streamed = _stage(model, mode, stream_over_s=30.0, rows_per_batch=4).process_batch(batch)
    assert not isinstance(streamed, dict)  # a generator: Ray Data streams its batches on
    parts, new = _rows(streamed)
    _, ref = _rows(old)
    assert all(len(p["audio_id"]) <= 4 for p in parts) and (len(parts) > 1 or mode == "none")
    assert len(new) == len(ref)
    for a, b in zip(new, ref):
        for k in ("audio_id", "chunk_index", "start_s", "end_s", "is_longer", "n_rows", "n_chunks", "status",
                  "warning", "duration_s", "sample_rate", "channels"):
            assert a[k] == b[k], (k, a[k], b[k])
        np.testing.assert_array_equal(a["feat_shape"], b["feat_shape"])
        fa, fb = np.frombuffer(a["features"], np.float32), np.frombuffer(b["features"], np.float32)
        if a["chunk_index"] >= 0 or not fused:
            np.testing.assert_array_equal(fa, fb)  # the same samples through the same featurizer
        else:
            # the fusion shrink's interpolation is redone here, in float32 like torch: within rounding
            np.testing.assert_allclose(fa, fb, rtol=0, atol=1e-4)
    assert "downmixed 2 channels" in new[0]["warning"]
    whole = [r for r in new if r["chunk_index"] == -1 and r["audio_id"] == "long.flac"]
    assert len(whole) == 1 and whole[0]["is_longer"] == fused


def test_a_bad_long_file_is_one_failed_row(tiny_clap, tmp_path):
    x = (0.1 * np.random.default_rng(1).standard_normal(48000 * 40)).astype(np.float32)
    x[48000 * 35] = np.nan  # in a late block
    sf.write(tmp_path / "nan.wav", x, 48000, subtype="FLOAT")
    sf.write(tmp_path / "silent.flac", np.zeros(48000 * 40, dtype=np.float32), 48000)
    stage = _stage(tiny_clap, "fixed", stream_over_s=30.0)
    _, rows = _rows(stage.process_batch({"audio_id": np.array(["nan.wav", "silent.flac"]),
                                         "path": np.array([str(tmp_path / "nan.wav"), str(tmp_path / "silent.flac")])}))
    bad = [r for r in rows if r["audio_id"] == "nan.wav"]
    assert len(bad) == 1 and bad[0]["status"] == "failed" and bad[0]["error"] == "invalid samples: 1 NaN/Inf values"
    silent = [r for r in rows if r["audio_id"] == "silent.flac"]
    assert len(silent) == 6 == silent[0]["n_rows"] and all(r["status"] == "ok" for r in silent)  # whole + 5 windows
    assert silent[0]["warning"].startswith("silent: peak -inf dBFS")


def test_a_file_that_changes_while_streamed_fails_whole(tiny_clap, tmp_path, monkeypatch):
    sf.write(tmp_path / "a.wav", (0.1 * np.random.default_rng(2).standard_normal(48000 * 40)).astype(np.float32), 48000)
    import larcq_ray.core.audio as audio

    real = audio.stream_audio

    def cut(path, rate, block_frames=audio.BLOCK_FRAMES):  # the file shrinks after the check
        for i, block in enumerate(real(path, rate, block_frames)):
            if i == 3:
                return
            yield block

    monkeypatch.setattr(audio, "stream_audio", cut)
    stage = _stage(tiny_clap, "fixed", stream_over_s=30.0)
    _, rows = _rows(stage.process_batch({"audio_id": np.array(["a.wav"]), "path": np.array([str(tmp_path / "a.wav")])}))
    assert len(rows) == rows[0]["n_rows"] == 6  # every row arrives, so the driver completes the file...
    failed = [r for r in rows if r["status"] != "ok"]
    assert failed and failed[0]["error"].startswith("internal: RuntimeError: decoded")  # ...and records it failed


def test_store_retries_files_that_failed_as_silent():
    from larcq_ray.core.file_job import reason_kind
    from larcq_ray.index.store import RETRY_KINDS

    assert reason_kind("silent: peak -inf dBFS is below -80 dBFS") in RETRY_KINDS
    assert reason_kind("invalid samples: 3 NaN/Inf values") not in RETRY_KINDS


def test_streamed_batches_go_through_ray_data_and_regroup(ray_session, tiny_clap, long_file):
    from larcq_ray.core.file_job import FileJobSummary, FileResult, collect_files, file_dataset
    from larcq_ray.core.inputs import AudioRef
    from larcq_ray.core.stage import map_stage

    stage = DecodeChunkStage(model=str(tiny_clap), fusion_seed=3, local_files_only=True,
                             chunking={"mode": "fixed", "window_s": 10.0, "overlap_s": 0.0, "min_chunk_s": 1.0},
                             whole_file=True, silence_threshold_db=-80.0, memory_mb=512, stream_over_s=30.0,
                             rows_per_batch=3)
    refs = [AudioRef(audio_id=n, path=str(long_file / n)) for n in ("long.flac", "short.wav")]
    ds = map_stage(file_dataset(refs, 2), stage, 2)
    got = {}
    collect_files(ds, 2, assemble=lambda a, rows: FileResult(a, units=len(rows), payload=rows),
                  commit=lambda rs: got.update({r.audio_id: r.payload for r in rs}), commit_every=1,
                  summary=FileJobSummary("x", "y"), desc="t", show_progress=False)
    assert sorted(int(r["chunk_index"]) for r in got["long.flac"]) == list(range(-1, 8))  # whole + 8 windows
    assert all(str(r["status"]) == "ok" for rows in got.values() for r in rows)
