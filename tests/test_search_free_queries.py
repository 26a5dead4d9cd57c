"""Search as a product: a user's own queries (a CSV with a `query` column, or --query) over a plain
corpus, answered in results.parquet / results.md with the matched window of each query chunk; and
the `joins` query chunker that cuts free text where people join events."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from larcq_ray.core.inputs import Query, read_queries
from larcq_ray.search.query_chunking import query_chunks, split_joins

SR = 48000
EVENT_S = 4.0
# audio -> its events, EVENT_S each, back to back: event i spans [i * EVENT_S, (i + 1) * EVENT_S)
CORPUS = {
    "a.wav": ["siren", "heartbeat", "white_noise", "bell"],
    "b.wav": ["knocks", "low_rumble", "major_chord"],
    "sub/c.wav": ["crackle", "square_buzz", "water_drips"],
}
# query -> (the audio that holds its events, the window of each of its parts)
QUERIES = {
    "a heart pounds slowly and loudly and then a loud radio static hiss": ("a.wav", [(4.0, 8.0), (8.0, 12.0)]),
    "someone raps loudly on wood at a slow pace, followed by thunder grumbles loudly far away":
        ("b.wav", [(0.0, 4.0), (4.0, 8.0)]),
    "a campfire snaps and pops loudly": ("sub/c.wav", [(0.0, 4.0)]),  # one event: no join to cut at
}
MODE = "audio-max+query-sum"


# ------------------------------------------------------------------------------ the chunker


@pytest.mark.parametrize("text,chunks", [
    ("a dog barks and then rain falls", ["a dog barks", "rain falls"]),
    ("a dog barks, rain falls on a roof, a car passes", ["a dog barks", "rain falls on a roof", "a car passes"]),
    ("a bell rings while the wind howls", ["a bell rings", "the wind howls"]),
    ("a siren wails followed by a metal clank", ["a siren wails", "a metal clank"]),
    ("a dog barks; rain falls", ["a dog barks", "rain falls"]),
    ("A dog barks. Then rain falls!", ["A dog barks", "rain falls"]),
    ("a dog barks, and then rain falls", ["a dog barks", "rain falls"]),  # two joins in a row: one cut
    ("a dog barks AND  THEN rain falls", ["a dog barks", "rain falls"]),
    ("an authentic whistle", ["an authentic whistle"]),  # "then" only as a whole word
])
def test_joins_split_free_text_at_the_joins_people_write(text, chunks):
    assert split_joins(text) == chunks


def test_joins_are_configurable_and_uncut_queries_fall_back_flagged():
    q = Query(0, None, "a dog barks and then rain falls", ())
    assert query_chunks(q, "joins") == (["a dog barks", "rain falls"], False)
    assert query_chunks(q, "joins", [";"]) == (["a dog barks and then rain falls"], True)
    assert query_chunks(Query(1, None, "rain falls & a dog barks", ()), "joins", ["&"]) == (
        ["rain falls", "a dog barks"], False)
    assert query_chunks(Query(2, None, "just rain", ()), "joins") == (["just rain"], True)
    assert query_chunks(Query(2, None, "just rain.", ()), "sentences") == (["just rain."], True)
    assert query_chunks(Query(3, None, "no splits", ()), "columns") == (["no splits"], True)
    # columns (the default): benchmark queries use their split cells; free text is cut at the joins
    assert query_chunks(Query(4, None, "rain falls, then a dog barks", ("x", "y")), "columns") == (["x", "y"], False)
    assert query_chunks(q, "columns") == (["a dog barks", "rain falls"], False)


def test_queries_csv_without_ground_truth(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("query_id,query,split_1\nrain,rain falls and then a dog barks,\ndog,a dog barks,dog\n")
    qs = read_queries(p)
    assert [(q.query_id, q.name, q.audio_id, q.splits) for q in qs] == [
        (0, "rain", None, ()), (1, "dog", None, ("dog",))]
    p.write_text("query_id,query\nx,one\nx,two\n")
    from larcq_ray.core.errors import LarcqError

    with pytest.raises(LarcqError, match="already names"):
        read_queries(p)
    p.write_text("audio,query\na.wav,x\n")  # a misnamed ground-truth column is an error, not ignored
    with pytest.raises(LarcqError, match=r"lacks column\(s\) \['audio_id'\]"):
        read_queries(p)


# ------------------------------------------------------------------------------ search


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ray_session):
    """A plain corpus of long audios with events at known times, indexed with the demo CLAP."""
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.offline.demo_clap import assemble_demo_clap
    from larcq_ray.cli import main

    root = tmp_path_factory.mktemp("free_queries")
    model = assemble_demo_clap(root / "demo_clap")
    rng = np.random.default_rng(20240613)
    for aid, kinds in CORPUS.items():
        audio = np.concatenate([sw.render(sw.EventSpec(k, {"loudness": "loud"}), rng, EVENT_S, SR) for k in kinds])
        (root / "corpus" / aid).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / "corpus" / aid, audio, SR)
    cfg = {
        "run_dir": str(root / "run"),
        "data": {"corpus": str(root / "corpus")},
        "model": {"name_or_path": str(model), "device": "cpu", "local_files_only": True},
        "index": {"chunking": {"mode": "fixed", "window_s": EVENT_S, "overlap_s": 0.0, "min_chunk_s": 1.0},
                  "whole_file": True, "batch_size": 8},
        "search": {"query_chunking": "joins", "top_k": 3},
    }
    cfg_path = root / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["index", "--config", str(cfg_path)]) == 0
    return cfg_path, root / "run"


def _fresh_run(indexed, name: str) -> Path:
    cfg_path, run_dir = indexed
    out = run_dir.parent / name
    shutil.copytree(run_dir / "index", out / "index")
    return out


def _check_answers(run_dir: Path, names: list[str] | None = None):
    from larcq_ray import artifacts

    for f in ("gt_ranks.parquet", "metrics.json", "report.md"):
        assert not (run_dir / f).exists(), f"{f} written without ground truth"
    assert not list(run_dir.glob("retrieved_*.csv"))
    meta = json.loads((run_dir / "search_meta.json").read_text())
    assert meta["has_ground_truth"] is False and meta["results_mode"] == MODE
    res = artifacts.RESULTS.read(run_dir).to_pandas()
    assert set(res["mode"]) == set(meta["modes"])
    # Whole-file modes report no window; chunked-audio modes one per query chunk (-1: the whole query).
    assert res[res["mode"].isin(["none", "query-max", "query-sum"])]["start_s"].isna().all()
    am = res[res["mode"] == "audio-max"]
    assert (am["query_chunk"] == -1).all() and am["start_s"].notna().all()
    for qi, (text, (audio, windows)) in enumerate(QUERIES.items()):
        rows = res[(res["mode"] == MODE) & (res["query_id"] == qi)]
        assert rows.iloc[0]["query"] == text
        if names:
            assert rows.iloc[0]["query_name"] == names[qi]
        assert rows.iloc[0]["audio_id"] == audio, rows[["rank", "audio_id", "score"]]
        mine = rows[rows["audio_id"] == audio].sort_values("query_chunk")
        assert len(mine) == len(windows)
        got = list(zip(mine["start_s"].round(3), mine["end_s"].round(3)))
        assert got == windows, (text, mine[["query_chunk_text", "start_s", "end_s", "window_score"]])
        # ranks are 1..k, each audio once per query chunk
        assert sorted(rows["rank"].unique()) == [1, 2, 3]
    md = (run_dir / "results.md").read_text()
    assert "# Search results (audio-max+query-sum)" in md and "no ground truth" in md
    assert "| rank | audio | score | part 1 | part 2 |" in md
    assert "a heart pounds slowly and loudly" in md and "| 1 | a.wav |" in md
    assert "0:04.0-0:08.0" in md and "0:08.0-0:12.0" in md
    return res, md


def test_free_queries_from_a_csv(indexed, caplog):
    from larcq_ray.cli import main

    cfg_path, _ = indexed
    run_dir = _fresh_run(indexed, "run_csv")
    csv_path = run_dir / "my_queries.csv"
    names = ["heart-static", "knock-thunder", "fire"]
    with open(csv_path, "w") as f:
        f.write("query_id,query\n")
        for n, t in zip(names, QUERIES):
            f.write(f'{n},"{t}"\n')
    with caplog.at_level(logging.WARNING, logger="larcq_ray"):
        assert main(["search", "--config", str(cfg_path), "--run-dir", str(run_dir),
                     "--queries-csv", str(csv_path)]) == 0
    # One warning line, with the count: the one-event query has no join to cut at.
    fallback = [r.getMessage() for r in caplog.records if "could not be cut" in r.getMessage()]
    assert len(fallback) == 1 and fallback[0].startswith("1 of 3 queries"), fallback
    _check_answers(run_dir, names)
    # `run` with evaluate in its stages skips evaluation instead of failing.
    assert main(["run", "--config", str(cfg_path), "--run-dir", str(run_dir), "--set", "stages=[evaluate]"]) == 0
    assert not (run_dir / "metrics.json").exists()


def test_free_queries_from_the_command_line(indexed, capsys):
    from larcq_ray.cli import main

    cfg_path, _ = indexed
    run_dir = _fresh_run(indexed, "run_cli")
    # A stale benchmark file from an earlier search must not survive a search without ground truth.
    (run_dir / "gt_ranks.parquet").write_bytes(b"stale")
    argv = ["search", "--config", str(cfg_path), "--run-dir", str(run_dir)]
    for t in QUERIES:
        argv += ["--query", t]
    assert main(argv) == 0
    res, md = _check_answers(run_dir)
    assert list(res[res["mode"] == MODE].drop_duplicates("query_id")["query_name"]) == ["0", "1", "2"]
    q = pq.read_table(run_dir / "queries.parquet").to_pandas()
    assert set(q["audio_id"]) == {""}
    # chunks as the joins cut them, the whole query as chunk -1
    assert list(q[q["query_id"] == 0].sort_values("chunk_index")["text"]) == [
        list(QUERIES)[0], "a heart pounds slowly and loudly", "a loud radio static hiss"]
    print(md)


def test_free_queries_go_on_through_caption_and_rerank(indexed):
    """The method's second half after a search without ground truth: caption the shortlist with the
    demo captioner, re-rank it through the /rerank app the job starts, and evaluate skips."""
    import socket

    from ray import serve

    from larcq_ray import artifacts
    from larcq_ray.cli import main
    from larcq_ray.offline.demo_captioner import assemble_demo_captioner

    cfg_path, _ = indexed
    run_dir = _fresh_run(indexed, "run_rerank")
    captioner = assemble_demo_captioner(run_dir.parent / "captioner", cfg_path.parent / "demo_clap")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = ["--run-dir", str(run_dir), "--set", f"caption.backend.model={captioner}",
            "--set", "caption.backend.kind=prefix-lm", "--set", "caption.backend.device=cpu",
            "--set", "caption.backend.local_files_only=true", "--set", "caption.backend.window_s=2.5",
            "--set", "rerank.top_n=3", "--set", f"serve.port={port}", "--set", "serve.backend.device=cpu"]
    argv = ["search", "--config", str(cfg_path), *sets[:2]]
    for t in QUERIES:
        argv += ["--query", t]
    assert main(argv) == 0
    try:
        assert main(["caption", "--config", str(cfg_path), *sets]) == 0
        assert main(["rerank", "--config", str(cfg_path), *sets]) == 0
    finally:
        serve.shutdown()  # the job's Serve instance: later modules start their own on their own ports
    caps = artifacts.CAPTIONS.read(run_dir).to_pandas()
    assert (caps.status == "ok").all() and caps.caption.str.len().gt(0).all()
    rr = artifacts.RERANKED.read(run_dir).to_pandas()
    assert sorted(rr.query_id.unique()) == [0, 1, 2] and (rr.groupby("query_id").size() == 3).all()
    assert rr.rerank_score.notna().all() and (rr.note == "").all()  # every candidate was captioned
    assert main(["evaluate", "--config", str(cfg_path), "--run-dir", str(run_dir)]) == 0
    assert not (run_dir / "metrics.json").exists()
