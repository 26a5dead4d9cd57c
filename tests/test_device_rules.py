"""The device rules of every model stage (core/devices.py), on CPU:

- device "cuda" without a GPU is a clear LarcqError for every stage kind (CLAP, the three caption
  backends' loaders, the four re-rank backends), raised before any weights load;
- dtype: "auto" is float32 on CPU, bfloat16 (float16 without bf16) on a GPU; an explicit dtype is
  honoured by every backend's model;
- a CUDA out-of-memory (a real torch.cuda.OutOfMemoryError, or any exception class of that name)
  splits the batch and retries, in a Ray Data stage (the caption stage, alone and in Ray Data) and
  in the re-rank backends and service, which are not Ray Data stages; no row or request is lost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from larcq_ray.caption.stages import CaptionStage  # noqa: E402
from larcq_ray.core import devices  # noqa: E402
from larcq_ray.core.devices import is_out_of_memory, resolve_device, resolve_dtype, split_on_oom  # noqa: E402
from larcq_ray.core.errors import LarcqError  # noqa: E402
from larcq_ray.core.stage import run_batch  # noqa: E402

TEXTS = ["a dog barks", "rain on a roof", "a car engine idles", "birds sing", "a door slams", "a bell rings"]

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")


class OutOfMemoryError(Exception):
    """Another library's out-of-memory class (only its name is known to the rule)."""


def _cuda_oom(msg: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> BaseException:
    return torch.cuda.OutOfMemoryError(msg)  # a real instance; constructible without a GPU


# -- recognizing out of memory ------------------------------------------------------------------


def test_out_of_memory_is_recognized_by_class_text_and_cause():
    assert is_out_of_memory(_cuda_oom())
    assert isinstance(_cuda_oom(), torch.cuda.OutOfMemoryError)
    assert is_out_of_memory(OutOfMemoryError("no text"))
    assert is_out_of_memory(type("PoolOOM", (torch.cuda.OutOfMemoryError,), {})("x"))  # a subclass
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    try:  # a library wrapping the OOM in its own error
        try:
            raise _cuda_oom()
        except Exception as e:
            raise RuntimeError("generation failed") from e
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("bad input"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))


def test_split_on_oom_halves_until_it_fits_and_reraises_a_single_item():
    calls = []

    def fn(items):
        calls.append(len(items))
        if len(items) > 2:
            raise _cuda_oom()
        return [x * 10 for x in items]

    assert split_on_oom(fn, list(range(7))) == [x * 10 for x in range(7)]
    assert calls[0] == 7 and max(c for c in calls if c <= 2) <= 2
    with pytest.raises(torch.cuda.OutOfMemoryError):
        split_on_oom(lambda items: (_ for _ in ()).throw(_cuda_oom()), [1])
    with pytest.raises(ValueError):  # not memory: no retry
        split_on_oom(lambda items: (_ for _ in ()).throw(ValueError("bad")), [1, 2, 3])


# -- device and dtype ----------------------------------------------------------------------------


def test_resolve_device_and_dtype_rules(monkeypatch):
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"  # explicit: honoured
    with pytest.raises(LarcqError, match="model.dtype is 'half'"):
        resolve_dtype("half", "cpu", "model.dtype")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4 / V100
    assert resolve_dtype("auto", "cuda:0") == "float16"
    with pytest.raises(LarcqError, match="bfloat16 but this GPU cannot run it"):
        resolve_dtype("bfloat16", "cuda")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(LarcqError, match="caption.backend.device is 'cuda' but this worker has no CUDA GPU"):
            resolve_device("cuda", "caption.backend.device")


# fixtures: tiny models, built offline


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("dr_lm"), TEXTS * 10, seed=0)


@pytest.fixture(scope="module")
def tiny_alm(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio

    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("dr_alm"), TEXTS * 10, seed=0)


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    out = tmp_path_factory.mktemp("dr_ce")
    words = sorted({w for t in TEXTS for w in t.split()})
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(vocab_file=str(out / "vocab.txt"))
    tok.save_pretrained(out)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=128, num_labels=1)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prefix_captioner(tmp_path_factory, tiny_clap, tiny_lm) -> Path:
    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(tiny_clap), type="clap"), connector=ConnectorSpec(),
                         decoder=DecoderSpec(name_or_path=str(tiny_lm), train="frozen"))
    torch.manual_seed(0)
    return PrefixLm(cfg, local_files_only=True).save(tmp_path_factory.mktemp("dr_plm") / "captioner")


def _rerank_cfg(kind, model, **kw):
    from larcq_ray.rerank.config import RerankBackendConfig

    return RerankBackendConfig(kind=kind, model=str(model) if model else None, max_documents_per_prompt=4, **kw)


@needs_no_gpu
def test_device_cuda_without_a_gpu_is_a_clear_error_for_every_stage_kind(tiny_clap, tiny_alm, prefix_captioner,
                                                                         tiny_lm, tiny_cross_encoder, monkeypatch):
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.models.clap import ClapAudioEncoder, ClapTextEncoder
    from larcq_ray.rerank.backends import build_backend

    with pytest.raises(LarcqError, match="model.device is 'cuda' but this worker has no CUDA GPU"):
        ClapAudioEncoder(str(tiny_clap), "cuda", "auto", local_files_only=True)  # index's embed stage
    with pytest.raises(LarcqError, match="model.device is 'cuda'"):
        ClapTextEncoder(str(tiny_clap), "cuda", "float32", local_files_only=True)  # search's text stage

    from larcq_ray.caption.backends import build_caption_backend

    for kind, model in (("hf-audio-lm", tiny_alm), ("prefix-lm", prefix_captioner)):
        with pytest.raises(LarcqError, match="caption.backend.device is 'cuda' but this worker has no CUDA GPU"):
            build_caption_backend(CaptionBackendConfig(kind=kind, model=str(model), device="cuda",
                                                       local_files_only=True))
    for kind, model in (("bi-encoder", None), ("cross-encoder", tiny_cross_encoder), ("transformers", tiny_lm)):
        with pytest.raises(LarcqError, match="serve.backend.device is 'cuda' but this worker has no CUDA GPU"):
            build_backend(_rerank_cfg(kind, model, device="cuda"))

    # vllm (not installable here): a stand-in module, so the device rule is reached before vLLM's own
    built = []
    fake = types.SimpleNamespace(LLM=lambda **kw: built.append(kw), SamplingParams=None)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for device, match in (("cuda", "serve.backend.device is 'cuda' but this worker has no CUDA GPU"),
                          ("auto", "no CUDA GPU"), ("cpu", "runs on a GPU only")):
        with pytest.raises(LarcqError, match=match):
            build_backend(_rerank_cfg("vllm", "some/model", device=device))
    assert built == []  # no engine was started


def test_every_backend_honours_an_explicit_dtype(tiny_clap, tiny_alm, tiny_lm, tiny_cross_encoder):
    """bfloat16 asked on CPU (no GPU here): each model's weights are in bfloat16; auto on CPU: float32."""
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.caption.hf_audio_lm import HfAudioLmBackend
    from larcq_ray.models.clap import ClapAudioEncoder
    from larcq_ray.rerank.backends import build_backend

    def dtype_of(module):
        return next(module.parameters()).dtype

    assert ClapAudioEncoder(str(tiny_clap), "cpu", "bfloat16", local_files_only=True).dtype == torch.bfloat16
    assert ClapAudioEncoder(str(tiny_clap), "cpu", "auto", local_files_only=True).dtype == torch.float32
    alm = HfAudioLmBackend(CaptionBackendConfig(model=str(tiny_alm), device="cpu", dtype="bfloat16",
                                                local_files_only=True))
    assert dtype_of(alm.model) == torch.bfloat16 and alm.dtype == torch.bfloat16
    ce = build_backend(_rerank_cfg("cross-encoder", tiny_cross_encoder, device="cpu", dtype="bfloat16"))
    assert dtype_of(ce.model.model) == torch.bfloat16
    assert all(np.isfinite(ce.score([("a dog barks", TEXTS[:3])])[0]))
    lw = build_backend(_rerank_cfg("transformers", tiny_lm, device="cpu", dtype="bfloat16"))
    assert dtype_of(lw.model) == torch.bfloat16
    lw_auto = build_backend(_rerank_cfg("transformers", tiny_lm, device="cpu", dtype="auto"))
    assert dtype_of(lw_auto.model) == torch.float32


# -- out of memory in a Ray Data stage: the caption stage -----------------------------------------


class _OomBackend:
    """A caption backend that runs out of GPU memory on more than `fits` windows at once."""

    name, sample_rate, window_s = "oom-test", 16000, 1.0

    def __init__(self, fits: int, exc=_cuda_oom):
        self.fits, self.exc, self.calls = fits, exc, []

    def caption(self, waves):
        self.calls.append(len(waves))
        if len(waves) > self.fits:
            raise self.exc()
        return [f"len {len(w)}" for w in waves]


def _caption_batch(n: int) -> dict:
    status = np.array(["ok"] * n, dtype=object)
    status[1] = "failed"  # a row that failed upstream keeps its own reason
    error = np.array([""] * n, dtype=object)
    error[1] = "decode: bad file"
    return {"audio_id": np.array([f"a{i}" for i in range(n)], dtype=object), "status": status, "error": error,
            "samples": np.array([np.zeros(100 + i, np.float32).tobytes() for i in range(n)], dtype=object)}


def _caption_stage(backend):
    from larcq_ray.caption.stages import CaptionStage

    stage = CaptionStage(backend={}, actors=1, cpus=1, gpus=0)
    stage._backend = backend
    return stage


@pytest.mark.parametrize("exc", [_cuda_oom, lambda: OutOfMemoryError("pool exhausted")],
                         ids=["torch.cuda.OutOfMemoryError", "a class named OutOfMemoryError"])
def test_caption_stage_splits_on_out_of_memory_and_loses_no_row(exc):
    backend = _OomBackend(fits=2, exc=exc)
    out = run_batch(_caption_stage(backend), _caption_batch(9))
    assert list(out["audio_id"]) == [f"a{i}" for i in range(9)]
    assert list(out["status"]) == ["ok", "failed"] + ["ok"] * 7
    assert out["error"][1] == "decode: bad file"
    assert [c for i, c in enumerate(out["caption"]) if i != 1] == [f"len {100 + i}" for i in range(9) if i != 1]
    assert backend.calls[0] == 8 and max(c for c in backend.calls[1:] if c <= 2) <= 2


def test_caption_stage_row_that_never_fits_fails_with_the_reason():
    out = run_batch(_caption_stage(_OomBackend(fits=0)), _caption_batch(4))
    assert len(out["audio_id"]) == 4 and list(out["status"]) == ["failed"] * 4
    assert out["error"][1] == "decode: bad file"
    assert all(e == "caption: out of memory on a single row (OutOfMemoryError)" for i, e in enumerate(out["error"])
               if i != 1)


@dataclass
class OomCaptionStage(CaptionStage):
    """The caption stage with the OOM backend, built in each Ray actor (setup)."""

    fits: int = 3

    def setup(self) -> None:
        self._backend = _OomBackend(self.fits)


def test_caption_stage_in_ray_data_splits_on_a_real_cuda_oom(ray_session):
    import ray
    import ray.cloudpickle

    from larcq_ray.core.stage import map_stage

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    rows = _caption_batch(12)
    ds = ray.data.from_items([{k: v[i] for k, v in rows.items()} for i in range(12)])
    stage = OomCaptionStage(backend={}, actors=1, cpus=1, gpus=0, fits=3)
    out = map_stage(ds, stage, batch_size=12).take_all()
    by_id = {r["audio_id"]: r for r in out}
    assert sorted(by_id) == sorted(rows["audio_id"])  # no row lost
    assert by_id["a1"]["status"] == "failed" and by_id["a1"]["error"] == "decode: bad file"
    assert all(by_id[f"a{i}"]["status"] == "ok" and by_id[f"a{i}"]["caption"] == f"len {100 + i}"
               for i in range(12) if i != 1)


# -- out of memory in the re-rank backends and the service (not Ray Data) --------------------------


def _inject_oom(monkeypatch, obj, name: str, fits: int, exc=_cuda_oom) -> list:
    calls: list = []
    real = getattr(obj, name)

    def wrapped(items, *args, **kwargs):
        calls.append(len(items))
        if len(items) > fits:
            raise exc()
        return real(items, *args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def test_rerank_backends_split_a_batch_that_runs_out_of_memory(tiny_lm, tiny_cross_encoder, monkeypatch):
    from larcq_ray.rerank.backends import build_backend

    requests = [("a dog barks", TEXTS), ("rain on a roof", TEXTS[::-1]), ("nothing", [])]
    for kind, model, attr in (("cross-encoder", tiny_cross_encoder, "predict"), ("bi-encoder", None, "encode")):
        backend = build_backend(_rerank_cfg(kind, model, device="cpu", batch_size=8))
        want = backend.score(requests)
        calls = _inject_oom(monkeypatch, backend.model, attr, fits=2,
                            exc=lambda: OutOfMemoryError("CUDA out of memory"))
        got = backend.score(requests)
        assert [len(r) for r in got] == [6, 6, 0], kind
        np.testing.assert_allclose(np.concatenate(got[:2]), np.concatenate(want[:2]), atol=1e-4, err_msg=kind)
        assert calls[0] > 2 and len(calls) > 3 and max(c for c in calls if c <= 2) <= 2, (kind, calls)

    lw = build_backend(_rerank_cfg("transformers", tiny_lm, device="cpu", batch_size=4))
    want = lw.score(requests)
    calls = []
    model = lw.model

    def forward(**kw):  # the LM's forward runs out of memory on more than one prompt
        calls.append(int(kw["input_ids"].shape[0]))
        if calls[-1] > 1:
            raise _cuda_oom()
        return model(**kw)

    monkeypatch.setattr(lw, "model", forward)
    got = lw.score(requests)
    np.testing.assert_allclose(np.concatenate(got[:2]), np.concatenate(want[:2]), atol=1e-4)
    assert calls[0] == 4 and 1 in calls


class _FakeBackend:
    model_name = "fake"

    def __init__(self, fits: int):
        self.fits, self.calls = fits, []

    def score(self, pairs):
        self.calls.append(len(pairs))
        if any(q == "poison" for q, _ in pairs):
            raise ValueError("poisoned request")
        if len(pairs) > self.fits:
            raise _cuda_oom()
        return [[float(len(d)) for d in docs] for _, docs in pairs]


def test_rerank_service_splits_a_serve_batch_on_out_of_memory():
    from larcq_ray.rerank.serving import RerankServing

    backend = _FakeBackend(fits=2)
    serving = RerankServing(backend, max_batch_size=8)
    pairs = [(f"q{i}", ["x" * i, "y"]) for i in range(7)]
    out = asyncio.run(serving._score_split(pairs, len(pairs)))
    assert [o.scores for o in out] == [[float(i), 1.0] for i in range(7)]  # every request scored, in order
    assert all(o.error is None and o.batch_size == 7 for o in out)
    assert backend.calls[0] == 7 and 3 in backend.calls and max(c for c in backend.calls if c <= 2) <= 2

    # one request alone still out of memory: that request gets an error, the others their scores
    tight = RerankServing(_FakeBackend(fits=0), max_batch_size=8)
    out = asyncio.run(tight._score_split(pairs[:3], 3))
    assert len(out) == 3 and all(o.scores is None and "OutOfMemoryError" in o.error for o in out)
    mixed = asyncio.run(serving._score_split([("poison", ["a"]), ("q", ["bb"])], 2))
    assert mixed[0].error and "poisoned" in mixed[0].error and mixed[1].scores == [2.0]
    serving.close()
    tight.close()


def test_oom_rule_frees_the_cache_between_tries(monkeypatch):
    freed = []
    monkeypatch.setattr(devices, "free_accelerator_memory", lambda: freed.append(1))
    calls = []

    def fn(items):
        calls.append(len(items))
        if len(items) > 1:
            raise _cuda_oom()
        return items

    assert split_on_oom(fn, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert len(freed) == 3  # once per split (4 -> 2 + 2 -> 1 + 1 + 1 + 1)
