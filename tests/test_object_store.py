"""Run dirs and benchmark output on an object store: a real S3 API (moto's server) on 127.0.0.1,
reached through pyarrow's S3 filesystem by URI, from the driver and from Ray tasks."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import yaml

from larcq_ray.cli import main
from larcq_ray.core.storage import is_uri, open_location, staged_run_dir

from test_synthesis import _clotho_source, _files


def test_uri_detection():
    assert is_uri("s3://b/k") and is_uri("file:///tmp/x") and is_uri("gs://b")
    assert not is_uri("/tmp/x") and not is_uri("runs/a") and not is_uri("C:\\data")


def test_synthesize_into_s3_matches_local_bytes(ray_session, s3, tmp_path):
    from larcq_ray.synthesize.config import SynthesizeConfig
    from larcq_ray.synthesize.job import run_synthesize

    csv_path, audio = _clotho_source(tmp_path / "src")
    kw = dict(captions_csv=str(csv_path), audio_dir=str(audio), n_audios=4, clips_per_audio=2, seed=3)
    run_synthesize(SynthesizeConfig(out_dir=str(tmp_path / "local"), **kw))
    summary = run_synthesize(SynthesizeConfig(out_dir=s3("bench"), **kw))  # render tasks PUT the audios
    assert summary.written == 4
    remote = open_location(s3("bench"))
    local = _files(tmp_path / "local")
    got = {rel: remote.read_bytes(rel) for rel in local}
    assert got == local  # byte for byte, audios included
    again = run_synthesize(SynthesizeConfig(out_dir=s3("bench"), **kw))  # resume state lives in the bucket
    assert (again.resumed, again.written) == (4, 0)


def test_pipeline_run_dir_on_s3(ray_session, s3, tiny_clap, tmp_path):
    from larcq_ray.offline.demo_benchmark import DemoBenchmarkSpec, write_demo_benchmark

    bench = write_demo_benchmark(tmp_path / "bench", DemoBenchmarkSpec(n_audios=4, seed=1))
    run_uri = s3("runs/r1")
    cfg = {"run_dir": run_uri, "stages": ["index", "search", "evaluate"], "data": {"benchmark": str(bench)},
           "model": {"name_or_path": str(tiny_clap), "device": "cpu", "local_files_only": True},
           "index": {"batch_size": 4, "num_actors": 1}, "search": {"top_k": 4}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(tmp_path / "c.yaml")]) == 0
    loc = open_location(run_uri)
    files = loc.list_files()
    assert {"config.yaml", "shortlist.parquet", "metrics.json", "report.md"} <= set(files)
    assert any(f.startswith("index/") for f in files)
    assert yaml.safe_load(loc.read_bytes("config.yaml"))["run_dir"] == run_uri  # the user's location, not scratch
    metrics = json.loads(loc.read_bytes("metrics.json"))
    assert "R@1" in metrics["audio-max+query-sum"]

    # A later stage starts from what the bucket holds: search again (index pulled, shortlist replaced).
    before = pq.read_table(io.BytesIO(loc.read_bytes("shortlist.parquet")))
    assert main(["search", "--config", str(tmp_path / "c.yaml")]) == 0
    assert pq.read_table(io.BytesIO(loc.read_bytes("shortlist.parquet"))).equals(before)
    # And resuming the index finds every file done.
    assert main(["index", "--config", str(tmp_path / "c.yaml")]) == 0
    assert loc.list_files("index") == [f for f in files if f.startswith("index/")]


def test_staged_run_dir_uploads_what_a_failing_stage_committed(s3):
    uri = s3("runs/crash")
    with pytest.raises(RuntimeError):
        with staged_run_dir(uri) as local:
            (local / "index").mkdir()
            (local / "index" / "part-0.parquet").write_bytes(b"committed before the crash")
            raise RuntimeError("stage died")
    assert open_location(uri).read_bytes("index/part-0.parquet") == b"committed before the crash"


def test_publish_uploads_a_committed_part_before_the_stage_ends(s3):
    """Caption parts go up when committed: a driver killed later (no cleanup runs) has not lost them."""
    from larcq_ray.core.storage import publish

    uri = s3("runs/publish")
    with staged_run_dir(uri) as local:
        part = local / "captions.parts" / "part-000000.parquet"
        part.parent.mkdir()
        part.write_bytes(b"one committed part")
        assert publish(part)
        assert open_location(uri).read_bytes("captions.parts/part-000000.parquet") == b"one committed part"
    assert not publish(part)  # nothing staged any more: a local run_dir needs no upload
