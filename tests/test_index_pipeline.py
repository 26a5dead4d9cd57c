"""The Ray Data index job on real files: bad input, resume, crash leftovers."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import tone, write_bad_audio
from larcq_ray.core.audio import decode_audio
from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder
from larcq_ray.config import PipelineConfig
from larcq_ray.core.errors import LarcqError
from larcq_ray.index.job import run_index
from larcq_ray.index.store import IndexStore


def make_cfg(run_dir, corpus, model, **index):
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus)},
        "model": {"name_or_path": str(model), "device": "cpu"},
        "index": {"batch_size": 4, "files_per_decode_task": 2, "commit_every_files": 2,
                  "chunking": {"mode": "fixed", "window_s": 2.0, "min_chunk_s": 0.5}, **index},
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    expect = write_bad_audio(d)
    sf.write(d / "long.flac", tone(7.0, 32000, freq=880), 32000)  # 4 fixed chunks of 2 s (last 1 s)
    expect["long.flac"] = ""
    return d, expect


def test_every_file_ends_as_a_row_and_bad_ones_say_why(ray_session, tiny_clap, corpus, tmp_path):
    d, expect = corpus
    summary = run_index(make_cfg(tmp_path / "run", d, tiny_clap), show_progress=False)
    assert summary.done == sum(1 for k in expect.values() if not k)
    assert summary.failed == sum(1 for k in expect.values() if k)
    assert summary.lines()[0].startswith(f"{summary.done} indexed, {summary.failed} failed")

    store = IndexStore(tmp_path / "run" / "index")
    files = store.read_files().to_pandas().set_index("audio_id")
    assert sorted(files.index) == sorted(expect)
    for aid, kind in expect.items():
        row = files.loc[aid]
        if kind:
            assert row.status == "failed" and row.error.startswith(kind), (aid, row.error)
        else:
            assert row.status == "ok" and row.error == "", (aid, row.error)
    assert "downmixed" in files.loc["stereo.flac", "warning"]
    assert files.loc["stereo.flac", "channels"] == 2 and files.loc["odd_rate.wav", "sample_rate"] == 7350

    chunks = store.read_chunks().to_pandas()
    assert set(chunks.audio_id) == {a for a, k in expect.items() if not k}
    long = chunks[chunks.audio_id == "long.flac"].sort_values("chunk_index")
    assert long.chunk_index.tolist() == [-1, 0, 1, 2, 3]  # whole file + 4 windows
    assert np.allclose(long.start_s, [0, 0, 2, 4, 6]) and np.allclose(long.end_s, [7, 2, 4, 6, 7])
    assert files.loc["long.flac", "n_chunks"] == 4
    assert not chunks.duplicated(["audio_id", "chunk_index"]).any()

    # The pipeline's embedding equals the model applied directly to the same window.
    fz = AudioFeaturizer(str(tiny_clap))
    x = decode_audio(d / "long.flac", fz.sample_rate).samples
    f = fz(x[2 * 48000: 4 * 48000])
    direct = ClapAudioEncoder(str(tiny_clap), device="cpu")(f.input_features[None], np.array([f.is_longer]))[0]
    got = np.asarray(long[long.chunk_index == 1].embedding.iloc[0], dtype=np.float32)
    np.testing.assert_allclose(got, direct, atol=1e-5)


def test_resume_skips_done_files_and_never_duplicates(ray_session, tiny_clap, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"a{i}.wav", tone(3.0, 48000, freq=300 + 100 * i), 48000)
    cfg = make_cfg(tmp_path / "run", d, tiny_clap)
    first = run_index(cfg, show_progress=False)
    assert (first.done, first.skipped) == (3, 0)
    again = run_index(cfg, show_progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, 3)

    # A crash mid-commit leaves a chunks part without its files part: it is cleaned up.
    store = IndexStore(tmp_path / "run" / "index")
    orphan = store.chunks_dir / "part-000099.parquet"
    pq.write_table(store.read_chunks().slice(0, 1), orphan)
    sf.write(d / "new.wav", tone(3.0, 48000, freq=1234), 48000)
    third = run_index(cfg, show_progress=False)
    assert (third.done, third.skipped) == (1, 3)
    assert not orphan.exists()
    files = store.read_files().to_pandas()
    chunks = store.read_chunks().to_pandas()
    assert sorted(files.audio_id) == ["a0.wav", "a1.wav", "a2.wav", "new.wav"]
    assert not chunks.duplicated(["audio_id", "chunk_index"]).any()
    emb = store.load_embeddings()
    assert emb.audio_ids == ["a0.wav", "a1.wav", "a2.wav", "new.wav"]
    assert emb.whole_emb.shape == (4, 64) and list(np.diff(emb.chunk_offsets)) == [2, 2, 2, 2]


def test_resume_with_other_settings_is_refused(ray_session, tiny_clap, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sf.write(d / "a.wav", tone(3.0, 48000), 48000)
    run_index(make_cfg(tmp_path / "run", d, tiny_clap), show_progress=False)
    other = make_cfg(tmp_path / "run", d, tiny_clap, chunking={"mode": "equal", "window_s": 2.0})
    with pytest.raises(LarcqError, match="built with other settings.*chunking"):
        run_index(other, show_progress=False)


def test_chunking_none_indexes_whole_files_only(ray_session, tiny_clap, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sf.write(d / "a.wav", tone(14.0, 48000), 48000)  # > 10 s: the fusion branch
    cfg = make_cfg(tmp_path / "run", d, tiny_clap, chunking={"mode": "none"}, whole_file=False)
    assert run_index(cfg, show_progress=False).done == 1
    emb = IndexStore(tmp_path / "run" / "index").load_embeddings()
    assert emb.chunk_emb.shape == (1, 64) and emb.whole_emb.shape == (1, 64)
    np.testing.assert_allclose(emb.chunk_emb[0], emb.whole_emb[0])


def test_fixed_files_are_retried_edited_ones_reindexed_deleted_ones_dropped(ray_session, tiny_clap, tmp_path):
    import os

    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):
        sf.write(d / f"a{i}.wav", tone(3.0, 48000, freq=300 + 100 * i), 48000)
    (d / "bad.wav").write_text("not audio\n" * 10)  # unreadable: can change without an edit, retried every run
    nan = tone(1.0, 48000)
    nan[100:110] = np.nan
    sf.write(d / "nan.wav", nan, 48000, subtype="FLOAT")  # invalid samples, its content: retried only if edited
    cfg = make_cfg(tmp_path / "run", d, tiny_clap)
    first = run_index(cfg, show_progress=False)
    assert (first.done, first.failed) == (3, 2)
    store = IndexStore(tmp_path / "run" / "index")
    before = store.load_embeddings()

    sf.write(d / "a1.wav", tone(3.0, 48000, freq=2000), 48000)  # edited: same size, new content
    st = os.stat(d / "a1.wav")
    os.utime(d / "a1.wav", ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # coarse clocks: make the edit visible
    (d / "a2.wav").unlink()  # deleted
    second = run_index(cfg, show_progress=False)
    # a1 indexed again; bad.wav retried (unreadable can change without an edit) and still failing;
    # a0 and nan.wav (its samples are its content) skipped
    assert (second.done, second.failed, second.skipped) == (1, 1, 2)
    text = "\n".join(second.lines())
    assert "1 file(s) no longer in the corpus" in text and "1 file(s) changed" in text and "1 file(s) that failed" in text

    sf.write(d / "bad.wav", tone(3.0, 48000, freq=1500), 48000)  # fixed
    third = run_index(cfg, show_progress=False)
    assert (third.done, third.failed, third.skipped) == (1, 0, 3)

    assert sorted(store.read_files().column("audio_id").to_pylist()) == ["a0.wav", "a1.wav", "bad.wav", "nan.wav"]
    after = store.load_embeddings()
    assert after.audio_ids == ["a0.wav", "a1.wav", "bad.wav"]  # a2 no longer searchable, nan.wav never was
    chunks = store.read_chunks().to_pandas()
    assert not chunks.duplicated(["audio_id", "chunk_index"]).any()
    old = dict(zip(before.audio_ids, before.whole_emb))
    new = dict(zip(after.audio_ids, after.whole_emb))
    np.testing.assert_allclose(new["a0.wav"], old["a0.wav"])
    assert not np.allclose(new["a1.wav"], old["a1.wav"])  # the edited file's new sound, not its old one

    fourth = run_index(cfg, show_progress=False)
    assert (fourth.done, fourth.failed, fourth.skipped) == (0, 0, 4)  # nan.wav is not retried unchanged


def test_reindexing_with_another_adapter_is_refused(ray_session, tiny_clap, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sf.write(d / "a.wav", tone(3.0, 48000), 48000)
    run_index(make_cfg(tmp_path / "run", d, tiny_clap), show_progress=False)
    other = make_cfg(tmp_path / "run", d, tiny_clap)
    other = other.model_copy(update={"model": other.model.model_copy(update={"adapter": str(tmp_path / "lora")})})
    with pytest.raises(LarcqError, match="built with other settings.*adapter"):
        run_index(other, show_progress=False)


def test_corpus_entries_that_cannot_be_accepted_fail_alone(ray_session, tiny_clap, tmp_path, monkeypatch, caplog):
    """A link outside the root, a name that is not UTF-8, a folder that cannot be listed, a file
    gone before decoding: one failed row each, the good files indexed, `larcq-ray index` exits 0."""
    import logging
    import os

    import yaml

    from larcq_ray.cli import main
    from larcq_ray.index import job
    from larcq_ray.index.job import plan_resume
    from larcq_ray.index.store import file_stat
    from test_inputs import _bytes_name_ok, _lock

    d, out = tmp_path / "c", tmp_path / "out"
    (d / "sub").mkdir(parents=True)
    (d / "locked").mkdir()
    out.mkdir()
    for i, p in enumerate([d / "good.wav", d / "sub" / "b.wav", d / "locked" / "c.wav", d / "gone.wav",
                           out / "o.wav"]):
        sf.write(p, tone(2.0, 48000, freq=300 + 100 * i), 48000)
    (d / "link.wav").symlink_to(out / "o.wav")  # good audio, but outside the root
    expect = {"good.wav": "", "sub/b.wav": "", "link.wav": "outside", "locked/": "unreadable",
              "gone.wav": "missing"}
    if _bytes_name_ok(d):
        sf.write(os.fsencode(str(d)) + b"/bad\xff.wav", tone(2.0, 48000), 48000, format="WAV")
        expect["bad\\xff.wav"] = "invalid name"
    _lock(monkeypatch, d / "locked")  # chmod 000 would not stop root (CI)
    real_list = job.list_corpus

    def list_then_delete(data):  # the file vanishes between listing and decoding
        refs = real_list(data)
        (d / "gone.wav").unlink()
        return refs

    monkeypatch.setattr(job, "list_corpus", list_then_delete)
    cfg = make_cfg(tmp_path / "run", d, tiny_clap)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with caplog.at_level(logging.INFO, logger="larcq_ray"):
        assert main(["index", "--config", str(tmp_path / "c.yaml")]) == 0
    n_bad = len(expect) - 2
    assert f"2 indexed, {n_bad} failed" in caplog.text
    assert "cannot be indexed (recorded as failed)" in caplog.text

    store = IndexStore(tmp_path / "run" / "index")
    files = store.read_files().to_pandas().set_index("audio_id")
    assert sorted(files.index) == sorted(expect)
    for aid, kind in expect.items():
        row = files.loc[aid]
        assert (row.status, row.error.split(":", 1)[0]) == (("failed", kind) if kind else ("ok", "")), (aid, row.error)
    assert set(store.load_embeddings().audio_ids) == {"good.wav", "sub/b.wav"}  # o.wav never decoded

    # Next run: the folder still cannot be listed (retried, still failing), the link is now a real
    # file (indexed), the bad name has not changed (skipped, same id), gone.wav is dropped.
    monkeypatch.setattr(job, "list_corpus", real_list)
    (d / "link.wav").unlink()
    sf.write(d / "link.wav", tone(2.0, 48000, freq=1500), 48000)
    again = run_index(cfg, show_progress=False)
    assert (again.done, again.failed, again.skipped) == (1, 1, len(expect) - 3)  # good, sub/b (, bad name)
    assert dict(again.reasons) == {"unreadable": 1}
    text = "\n".join(again.lines())
    assert "1 file(s) no longer in the corpus" in text and "2 file(s) that failed for a reason that can change" in text
    files = store.read_files().to_pandas().set_index("audio_id")
    assert files.loc["link.wav", "status"] == "ok" and "gone.wav" not in files.index

    # Once the folder can be listed, its files are indexed and its row is dropped.
    monkeypatch.undo()
    refs = job.list_corpus(cfg.data)
    todo, _, _, gone = plan_resume(store, refs, {r.audio_id: file_stat(r.path) for r in refs if not r.reject})
    assert [r.audio_id for r in todo] == ["locked/c.wav"] and gone == ["locked/"]
