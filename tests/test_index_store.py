"""The worker-written index: writer tasks put embeddings in the store, the driver commits a manifest.

A driver that dies at any moment loses nothing committed and leaves nothing half-visible: a re-run
removes what nobody names, indexes the rest once, and the embeddings equal a clean run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from conftest import tone
from larcq_ray.config import PipelineConfig
from larcq_ray.index.job import run_index
from larcq_ray.index.store import IndexStore

N_SHORT = 6
LONG_S = 130.0  # over STREAM_OVER_S: streamed window by window, its rows reach the writer in many batches


def make_cfg(run_dir, corpus, model, **index):
    return PipelineConfig.model_validate({
        "run_dir": str(run_dir),
        "data": {"corpus": str(corpus)},
        "model": {"name_or_path": str(model), "device": "cpu"},
        "index": {"batch_size": 4, "files_per_decode_task": 1, "commit_every_files": 1, "rows_per_part": 6,
                  "chunking": {"mode": "fixed", "window_s": 5.0, "min_chunk_s": 0.5}, **index},
    })


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("store_corpus")
    for i in range(N_SHORT):
        sf.write(d / f"s{i}.wav", tone(3.0 + i, 48000, freq=300 + 150 * i), 48000)
    sf.write(d / "long.flac", tone(LONG_S, 16000, freq=660, amp=0.2), 16000)
    return d


@pytest.fixture(scope="module")
def clean(ray_session, tiny_clap, corpus, tmp_path_factory):
    """A run never interrupted: the reference embeddings."""
    run = tmp_path_factory.mktemp("clean")
    summary = run_index(make_cfg(run, corpus, tiny_clap), show_progress=False)
    assert (summary.done, summary.failed) == (N_SHORT + 1, 0)
    return IndexStore(run / "index")


def _assert_same_index(store: IndexStore, clean: IndexStore) -> None:
    chunks = store.read_chunks(columns=["audio_id", "chunk_index"]).to_pandas()
    assert not chunks.duplicated(["audio_id", "chunk_index"]).any()
    got, want = store.load_embeddings(), clean.load_embeddings()
    assert got.audio_ids == want.audio_ids
    np.testing.assert_array_equal(got.chunk_offsets, want.chunk_offsets)
    np.testing.assert_allclose(got.chunk_emb, want.chunk_emb, atol=1e-6)
    np.testing.assert_allclose(got.whole_emb, want.whole_emb, atol=1e-6)


def test_writers_fill_the_store_and_the_driver_sees_status_rows_only(ray_session, tiny_clap, corpus, clean,
                                                                     tmp_path):
    columns_seen: set[str] = set()
    rows_seen = [0]

    def seen(batch):
        columns_seen.update(batch)
        rows_seen[0] += len(batch["audio_id"])

    run_index(make_cfg(tmp_path / "run", corpus, tiny_clap), show_progress=False, seen=seen)
    assert not columns_seen & {"embedding", "features", "feat_shape"}, columns_seen
    assert {"audio_id", "n_rows", "n_got", "part", "status"} <= columns_seen
    store = IndexStore(tmp_path / "run" / "index")
    files = store.current_files().to_pandas().set_index("audio_id")
    n_rows = int(files.loc["long.flac", "n_chunks"]) + 1  # + the whole-file row
    # The long file's rows came in many writer batches: several parts, one manifest row naming them all.
    assert len(files.loc["long.flac", "chunk_parts"]) >= 3
    assert rows_seen[0] < sum(int(n) + 1 for n in files.n_chunks)  # fewer rows than chunks reached the driver
    ok = store.ok_files()
    assert len(store.read_chunks_of(ok.filter(pc.equal(ok.column("audio_id"), "long.flac")))) == n_rows
    _assert_same_index(store, clean)


def test_a_driver_stopped_mid_stream_leaves_whole_files_only_and_resumes(ray_session, tiny_clap, corpus, clean,
                                                                         tmp_path):
    cfg = make_cfg(tmp_path / "run", corpus, tiny_clap)
    got = [0]

    def die(batch):  # the driver goes away with the long file's rows half arrived, writers in flight
        for a, n, total in zip(batch["audio_id"], batch["n_got"], batch["n_rows"]):
            if a == "long.flac":
                got[0] += int(n)
                if got[0] < int(total):
                    raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_index(cfg, show_progress=False, seen=die)
    store = IndexStore(tmp_path / "run" / "index")
    committed = store.current_files().to_pandas()
    assert len(committed) < N_SHORT + 1
    assert "long.flac" not in set(committed.audio_id)  # some of its chunks are in the store, it is not visible
    assert store.remove_orphans()  # and those chunks' parts are named by nobody
    current = store.current_files()
    for i, row in committed.iterrows():  # what is visible is whole
        assert len(store.read_chunks_of(current.slice(i, 1))) == row.n_chunks + 1
    time.sleep(1.0)  # writers that were in flight finish: their parts are named by nobody
    again = run_index(cfg, show_progress=False)
    assert again.done == N_SHORT + 1 - len(committed) and again.skipped == len(committed)
    named = store.referenced_parts()
    assert set(p.name for p in store.chunks_dir.glob("part-*.parquet")) == named  # orphans removed
    _assert_same_index(store, clean)


def test_kill_minus_9_during_writes_then_resume(ray_session, tiny_clap, corpus, clean, tmp_path):
    """A real kill of a `larcq-ray index` driver (SIGKILL: no cleanup at all), on the session's cluster."""
    import ray

    run = tmp_path / "run"
    cfg = make_cfg(run, corpus, tiny_clap).model_dump()
    cfg["ray"] = {"address": ray.get_runtime_context().gcs_address}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "larcq_ray.cli", "index", "--config", str(tmp_path / "c.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    files_dir = run / "index" / "files"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if files_dir.is_dir() and len(list(files_dir.glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = IndexStore(run / "index")
    before = len(store.current_files())
    assert before >= 1
    again = run_index(make_cfg(run, corpus, tiny_clap), show_progress=False)
    assert again.failed == 0 and again.done + again.skipped == N_SHORT + 1
    _assert_same_index(store, clean)


def test_float16_on_disk_and_an_old_layout_index_still_reads(ray_session, tiny_clap, corpus, clean, tmp_path):
    run_index(make_cfg(tmp_path / "h", corpus, tiny_clap, embedding_dtype="float16"), show_progress=False)
    half = IndexStore(tmp_path / "h" / "index")
    part = next(half.chunks_dir.glob("part-*.parquet"))
    assert pq.read_schema(part).field("embedding").type.value_type == pa.float16()
    got, want = half.load_embeddings(), clean.load_embeddings()
    assert got.chunk_emb.dtype == np.float32
    np.testing.assert_allclose(got.chunk_emb, want.chunk_emb, atol=2e-3)
    with pytest.raises(Exception, match="embedding_dtype"):  # resuming with the other dtype is refused
        run_index(make_cfg(tmp_path / "h", corpus, tiny_clap), show_progress=False)

    # The layout before the manifest named chunk parts: files/part-N beside chunks/part-N.
    old = tmp_path / "old" / "index"
    (old / "files").mkdir(parents=True)
    (old / "chunks").mkdir()
    (old / "meta.json").write_bytes((clean.root / "meta.json").read_bytes())
    t = clean.read_chunks()
    f = clean.read_files()
    pq.write_table(t, old / "chunks" / "part-000000.parquet")
    pq.write_table(f, old / "files" / "part-000000.parquet")
    legacy = IndexStore(old)
    np.testing.assert_allclose(legacy.load_embeddings().chunk_emb, clean.load_embeddings().chunk_emb)
    legacy.remove_orphans()
    assert (old / "chunks" / "part-000000.parquet").exists()  # named by its twin: not an orphan


def test_an_index_on_s3_is_written_in_place_and_survives_the_driver(ray_session, tiny_clap, corpus, clean,
                                                                    tmp_path, s3):
    """run_dir on a real S3 API (moto): writers PUT parts, the driver PUTs the manifest; nothing staged."""
    from larcq_ray.core.storage import open_location

    uri = s3("runs/inplace")
    cfg = make_cfg(uri, corpus, tiny_clap)
    counts: dict[str, int] = {}
    done = [False]

    def die(batch):  # the driver dies on the batch after its first committed file
        if done[0]:
            raise KeyboardInterrupt
        for a, n, total in zip(batch["audio_id"], batch["n_got"], batch["n_rows"]):
            counts[a] = counts.get(a, 0) + int(n)
            done[0] |= counts[a] == int(total)

    with pytest.raises(KeyboardInterrupt):
        run_index(cfg, show_progress=False, seen=die)
    store = IndexStore(uri.replace("?", "/index?", 1))
    assert store.root is None and store.exists()
    committed = len(store.current_files())
    assert committed >= 1  # what the dead driver committed is in the bucket already
    again = run_index(cfg, show_progress=False)
    assert again.skipped == committed and again.done + again.skipped == N_SHORT + 1
    keys = open_location(uri).list_files("index")
    assert "index/meta.json" in keys
    assert set(k.split("/", 2)[-1] for k in keys if k.startswith("index/chunks/")) == store.referenced_parts()
    _assert_same_index(store, clean)


def test_the_driver_gets_rows_while_the_stream_still_runs(ray_session):
    """A file is committed as soon as its rows arrive, not one block later: with Ray Data's default
    iterator prefetch a finished block waited for the next one, so with a few large writer outputs
    nothing was committed until the end of the run."""
    import time

    import numpy as np
    import ray

    from larcq_ray.core.file_job import FileJobSummary, FileResult, collect_files

    def slow(batch):
        time.sleep(3.0)
        return {**batch, "made": np.full(len(batch["audio_id"]), time.time())}

    ds = ray.data.from_items([{"audio_id": f"f{i}", "n_rows": 1} for i in range(3)], override_num_blocks=3)
    ds = ds.map_batches(slow, batch_size=None, batch_format="numpy", concurrency=1)  # one block every 3 s
    made, committed = [], []
    collect_files(ds, 3, assemble=lambda a, rows: FileResult(a), commit=lambda rs: committed.append(time.time()),
                  commit_every=1, summary=FileJobSummary("done", "rows"), desc="t", show_progress=False,
                  seen=lambda b: made.append(float(b["made"][0])))
    assert len(committed) == 3
    assert committed[0] < made[1], "the first file waited for the next block"


@pytest.mark.parametrize("value_type", [pa.float32(), pa.float16()])
def test_rows_are_gathered_as_arrow_takes_them_and_any_row_order_loads_the_same(value_type):
    """_take_rows (the numpy gather that sorts a shard's rows) equals Arrow's take on a chunked table;
    embeddings_from_table gives the same audios from sorted rows (no copy) and shuffled ones."""
    from larcq_ray.index.store import _take_rows, embeddings_from_table

    rng = np.random.default_rng(0)
    n, dim = 40, 6
    ids = [f"a{int(i):02d}.wav" for i in rng.integers(0, 9, n)]
    emb = rng.normal(size=(n, dim)).astype(value_type.to_pandas_dtype())
    table = pa.table({"audio_id": ids, "chunk_index": pa.array(np.arange(n), pa.int32()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
                      .cast(pa.list_(value_type))})
    chunked = pa.concat_tables([table.slice(0, 13), table.slice(13, 20), table.slice(33)])
    order = pc.sort_indices(chunked, [("audio_id", "ascending"), ("chunk_index", "ascending")])
    got, want = _take_rows(chunked, order), chunked.take(order)
    assert got.schema == want.schema and got.equals(want)
    sorted_, shuffled = embeddings_from_table(got), embeddings_from_table(chunked)
    assert sorted_.chunk_emb.dtype == value_type.to_pandas_dtype()
    assert sorted_.audio_ids == shuffled.audio_ids == sorted(set(ids))
    np.testing.assert_array_equal(sorted_.chunk_offsets, shuffled.chunk_offsets)
    np.testing.assert_array_equal(sorted_.chunk_emb, shuffled.chunk_emb)


def test_index_writers_take_no_cpu_slot():
    """Writers must be schedulable while decode tasks hold every CPU: with even a quarter CPU they
    waited until all decoding was done, and a 100,000-file run committed nothing until its end
    (benchmarks/bench_index_driver.py prints when the first status row arrives)."""
    from larcq_ray.core.stage import resolve
    from larcq_ray.index.writer import IndexWriteStage

    res = resolve(IndexWriteStage("unused").resources())
    assert res.cpus == 0 and res.gpus == 0 and res.tasks and res.tasks >= 1
