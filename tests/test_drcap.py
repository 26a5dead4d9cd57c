"""The drcap captioner (DRCap): projection onto the caption support, retrieval, text-only training,
the captioner folder, the caption backend and the caption job. Tiny offline models only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from larcq_ray.caption.backends import build_caption_backend, describe
from larcq_ray.caption.config import CaptionBackendConfig
from larcq_ray.caption.drcap import (DrCap, DrcapConfig, describe_folder, join_retrieved, pick_similar,
                                     project_onto_support)
from larcq_ray.caption.job import run_caption
from larcq_ray.caption.prefix_decoder import DEFAULT_PROMPT, DecoderSpec, LoraSpec
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import AudioRef

from conftest import CAPTIONS, tone

SR = 48000  # the tiny CLAP's feature extractor rate


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("drcap_clap"), CAPTIONS * 20, fusion=False, seed=1)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("drcap_lm"), CAPTIONS * 20 + [DEFAULT_PROMPT] * 5, seed=0)


def _cfg(clap_dir: Path, lm_dir: Path, train: str = "lora", **kw) -> DrcapConfig:
    dec = DecoderSpec(name_or_path=str(lm_dir), train=train, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    return DrcapConfig(clap={"name_or_path": str(clap_dir)}, decoder=dec, prefix_tokens=2, **kw)


def _steps(model: DrCap, n: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in model.module.parameters() if p.requires_grad], lr=lr)
    model.set_train(True)
    for i in range(n):
        loss = model.loss_from_text(CAPTIONS, rng=i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.set_train(False)


def _eval_loss(model: DrCap) -> float:
    with torch.no_grad():
        return float(model.loss_from_text(CAPTIONS, rng=123))


@pytest.fixture(scope="module")
def trained(clap_dir, lm_dir, tmp_path_factory):
    """A drcap captioner with a fully trained (tiny) decoder, saved: (folder, loss before, loss after)."""
    torch.manual_seed(0)
    model = DrCap(_cfg(clap_dir, lm_dir, train="full"), captions=CAPTIONS, trainable=True)
    before = _eval_loss(model)
    _steps(model, 25, lr=3e-3)
    after = _eval_loss(model)
    folder = model.save(tmp_path_factory.mktemp("drcap") / "captioner", extra={"steps": 25})
    return folder, before, after


def _waves() -> list[np.ndarray]:
    return [tone(2.0, SR, 440.0), tone(1.5, SR, 880.0), tone(3.0, SR, 220.0)]


# --- the math ----------------------------------------------------------------------------------

def test_a_support_of_one_caption_returns_that_embedding(clap_dir, lm_dir):
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    assert torch.allclose(project_onto_support(q, s, 0.07), s.expand(4, -1), atol=1e-6)

    model = DrCap(_cfg(clap_dir, lm_dir), captions=["a dog barks loudly"])
    assert model.captions == ["a dog barks loudly"] and model.support.shape == (1, 64)
    a = model.embed_audio(_waves())
    want = torch.as_tensor(model.embed_texts(["a dog barks loudly"]))
    assert torch.allclose(project_onto_support(a, model.support, model.tau), want.expand(3, -1), atol=1e-5)
    assert model.retrieve_for_audio(a) == [["a dog barks loudly"]] * 3


def test_tau_is_the_clap_audio_to_text_temperature(clap_dir, lm_dir):
    model = DrCap(_cfg(clap_dir, lm_dir), captions=CAPTIONS)
    assert model.tau == pytest.approx(1.0 / float(model.clap.logit_scale_a.exp()))
    assert model.tau == pytest.approx(0.07, rel=1e-4)  # an untrained CLAP: its initial 1/0.07 scale


def test_a_small_tau_projects_a_support_member_onto_itself_and_exclusion_removes_it(clap_dir, lm_dir):
    model = DrCap(_cfg(clap_dir, lm_dir), captions=CAPTIONS)
    s = model.support
    q = s[[3, 7]]
    assert torch.allclose(project_onto_support(q, s, 1e-4), q, atol=1e-4)
    # At the model's tau the tiny CLAP's near-identical captions mix, but the query still weighs most.
    mixed = project_onto_support(q, s, model.tau)
    assert not torch.allclose(mixed, q, atol=1e-4)
    # Excluding the query's own row is the projection onto the support without that row.
    exclude = torch.zeros(2, len(s), dtype=torch.bool)
    exclude[0, 3] = exclude[1, 7] = True
    got = project_onto_support(q, s, model.tau, exclude)
    keep3 = [i for i in range(len(s)) if i != 3]
    assert torch.allclose(got[0], project_onto_support(q[:1], s[keep3], model.tau)[0], atol=1e-6)
    everything = torch.ones(1, len(s), dtype=torch.bool)
    with pytest.raises(LarcqError, match="at least two"):
        project_onto_support(q[:1], s, model.tau, everything)


def test_pick_similar_band_and_top():
    sims = np.array([1.0, 0.80, 0.78, 0.82, 0.90, 0.95, 0.50, 0.76])
    self_row = np.zeros(8, dtype=bool)
    self_row[0] = True
    assert pick_similar(sims, 3, exclude=self_row) == [5, 4, 3]  # test time: top 3
    assert pick_similar(sims, 3) == [0, 5, 4]
    seen = set()
    for seed in range(30):
        got = pick_similar(sims, 3, (0.75, 0.85), np.random.default_rng(seed), self_row)
        assert len(got) == 3 and set(got) <= {1, 2, 3, 7} and got == sorted(got, key=lambda i: -sims[i])
        seen |= set(got)
    assert seen == {1, 2, 3, 7}  # sampled, not always the same three
    # Fewer in the band than k: those; none in the band: the top ones (never the excluded row).
    assert pick_similar(sims, 3, (0.79, 0.81), np.random.default_rng(0), self_row) == [1]
    assert pick_similar(sims, 3, (0.96, 0.99), np.random.default_rng(0), self_row) == [5, 4, 3]
    assert pick_similar(sims, 0) == [] and pick_similar(sims, 2, exclude=np.ones(8, bool)) == []
    assert join_retrieved(["a dog barks.", " rain falls ", ""]) == "a dog barks. rain falls"


def _unit_with_cos(base: np.ndarray, other: np.ndarray, cos: float) -> np.ndarray:
    return cos * base + np.sqrt(1 - cos ** 2) * other


def test_training_retrieval_excludes_the_caption_itself_test_retrieval_is_top_3(clap_dir, lm_dir):
    model = DrCap(_cfg(clap_dir, lm_dir), captions=CAPTIONS)
    eye = np.eye(64, dtype=np.float32)
    names = ["a dog barks loudly", "A dog barks loudly.", "in band one", "in band two", "in band three",
             "very close", "closer still", "far away"]
    cos = [1.0, 1.0, 0.80, 0.78, 0.82, 0.90, 0.95, 0.30]
    emb = np.stack([_unit_with_cos(eye[0], eye[i + 1], c) for i, c in enumerate(cos)])
    model.set_datastore(names, emb)
    for seed in range(10):
        got = model.retrieve_for_text(["a dog barks loudly"], rng=seed)[0]
        assert len(got) == 3 and set(got) <= {"in band one", "in band two", "in band three"}
    # The caption itself (and its copy up to case / final period) is never in its own support.
    mask = model.self_mask(["a dog barks loudly", "far away", "not in the store"])
    assert mask[0].tolist() == [True, True] + [False] * 6
    assert mask[1].nonzero().flatten().tolist() == [7] and not mask[2].any()
    # No caption in the band: the most similar others, never itself.
    narrow = model.cfg.model_copy(update={"retrieval_band": (0.96, 0.99)})
    model.cfg = narrow
    assert model.retrieve_for_text(["a dog barks loudly"], rng=0) == [["closer still", "very close", "in band three"]]
    # Test time (audio to text): the top 3, whatever they are.
    q = torch.as_tensor(emb[:1])
    assert model.retrieve_for_audio(q) == [["a dog barks loudly", "A dog barks loudly.", "closer still"]]

    real = DrCap(_cfg(clap_dir, lm_dir), captions=CAPTIONS)
    a = real.embed_audio(_waves())
    sims = (a @ real.support.T).numpy()
    for row, got in zip(sims, real.retrieve_for_audio(a)):
        assert got == [CAPTIONS[i] for i in np.argsort(-row, kind="stable")[:3]]
    for cap, got in zip(CAPTIONS, real.retrieve_for_text(CAPTIONS, rng=0)):
        assert len(got) == 3 and cap not in got


# --- training ----------------------------------------------------------------------------------

def test_loss_from_text_trains_the_projector_and_lora_never_clap(clap_dir, lm_dir):
    torch.manual_seed(0)
    model = DrCap(_cfg(clap_dir, lm_dir, train="lora"), captions=CAPTIONS, trainable=True)
    module_params = {id(p) for p in model.module.parameters()}
    assert not any(id(p) in module_params for p in model.clap.parameters())  # CLAP is outside the module
    assert not any(p.requires_grad for p in model.clap.parameters())
    model.set_train(True)
    assert not model.clap.training
    loss = model.loss_from_text(CAPTIONS[:4], rng=0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.module.projector.parameters())
    lora = {n: p for n, p in model.module.decoder.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad and p.grad is not None for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    base = [p for n, p in model.module.decoder.named_parameters() if "lora_" not in n]
    assert base and all(not p.requires_grad and p.grad is None for p in base)
    assert all(p.grad is None for p in model.clap.parameters())


def test_a_few_steps_lower_the_loss(trained):
    _, before, after = trained
    assert after < 0.6 * before, (before, after)


# --- the folder --------------------------------------------------------------------------------

def test_save_then_load_gives_identical_generations(trained):
    folder, _, _ = trained
    assert {p.name for p in folder.iterdir()} >= {"captioner.json", "projector.safetensors", "datastore.parquet",
                                                   "decoder"}
    cfg = json.loads((folder / "captioner.json").read_text())
    assert cfg["kind"] == "drcap" and cfg["trained"] == {"steps": 25} and cfg["top_k"] == 3
    store = pq.read_table(folder / "datastore.parquet")
    assert store.column_names == ["caption", "embedding"] and store.column("caption").to_pylist() == CAPTIONS
    a = DrCap.load(folder)
    b = DrCap.load(folder)
    waves = _waves()
    first = a.generate_from_audio(waves, num_beams=2, max_new_tokens=8)
    assert len(first) == 3 and all(first)
    assert b.generate_from_audio(waves, num_beams=2, max_new_tokens=8) == first
    assert torch.equal(a.support, b.support)
    cands = a.candidates(waves[:2], [1, 2, 3], max_new_tokens=8)
    assert len(cands) == 2 and all(len(c) == 3 for c in cands)
    assert [c[1] for c in cands] == first[:2]  # beam size 2 = the num_beams=2 caption


def test_lora_captioner_round_trips_with_relative_paths(clap_dir, lm_dir, tmp_path):
    torch.manual_seed(1)
    model = DrCap(_cfg(clap_dir, lm_dir, train="lora", projector="mlp", projector_hidden=32),
                  captions=CAPTIONS, trainable=True)
    _steps(model, 3, lr=5e-2)  # LoRA B moves off zero: the adapter changes generations
    folder = model.save(tmp_path / "cap")
    assert (folder / "decoder_adapter").is_dir() and not (folder / "decoder").exists()
    want = model.generate_from_audio(_waves(), num_beams=1, max_new_tokens=6)
    assert DrCap.load(folder).generate_from_audio(_waves(), num_beams=1, max_new_tokens=6) == want

    # A folder that ships its base models, named relative to it, can move.
    shutil.copytree(clap_dir, folder / "clap")
    shutil.copytree(lm_dir, folder / "lm")
    cfg = json.loads((folder / "captioner.json").read_text())
    cfg["clap"]["name_or_path"], cfg["decoder"]["name_or_path"] = "clap", "lm"
    (folder / "captioner.json").write_text(json.dumps(cfg))
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), moved)
    spec = describe_folder(CaptionBackendConfig(kind="drcap", model=str(moved), local_files_only=True))
    assert (spec.name, spec.sample_rate, spec.window_s, spec.prompt) == (str(moved), SR, 10.0, DEFAULT_PROMPT)
    assert DrCap.load(moved, local_files_only=True).generate_from_audio(_waves(), num_beams=1,
                                                                       max_new_tokens=6) == want


def test_a_folder_without_captioner_json_is_a_clear_error(tmp_path, trained):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LarcqError, match="not a drcap captioner folder .no captioner.json"):
        DrCap.load(empty)
    with pytest.raises(LarcqError, match="no captioner.json"):
        describe(CaptionBackendConfig(kind="drcap", model=str(empty)))
    with pytest.raises(LarcqError, match="not a folder"):
        describe(CaptionBackendConfig(kind="drcap", model=str(tmp_path / "missing")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "captioner.json").write_text(json.dumps({"kind": "prefix-lm"}))
    with pytest.raises(LarcqError, match="prefix-lm"):
        DrCap.load(other)
    (other / "captioner.json").write_text("{not json")
    with pytest.raises(LarcqError, match="not valid JSON"):
        DrCap.load(other)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(trained[0] / "captioner.json", partial / "captioner.json")
    with pytest.raises(LarcqError, match="projector.safetensors"):
        DrCap.load(partial)


# --- the backend and the job -------------------------------------------------------------------

def _backend_cfg(folder: Path, **kw) -> CaptionBackendConfig:
    return CaptionBackendConfig(kind="drcap", model=str(folder), max_new_tokens=6, local_files_only=True, **kw)


def test_backend_captions_waveforms(trained):
    folder, _, _ = trained
    spec = describe(_backend_cfg(folder))
    assert (spec.name, spec.sample_rate, spec.window_s, spec.prompt) == (str(folder), SR, 10.0, DEFAULT_PROMPT)
    backend = build_caption_backend(_backend_cfg(folder, batch_size=2, num_beams=2, device="cpu", dtype="float32"))
    assert (backend.name, backend.sample_rate, backend.window_s) == (str(folder), SR, 10.0)
    waves = _waves()
    got = backend.caption(waves)
    assert len(got) == 3 and all(isinstance(c, str) and c for c in got)
    assert got == backend.model.generate_from_audio(waves, num_beams=2, max_new_tokens=6)  # batches of 2 = one of 3
    assert backend.caption([]) == []
    assert describe(_backend_cfg(folder, window_s=4.0)).window_s == 4.0
    with pytest.raises(LarcqError, match="longer than"):
        describe(_backend_cfg(folder, window_s=12.0))  # a non-fused CLAP would cut the rest off
    with pytest.raises(LarcqError, match="caption.adapter"):
        build_caption_backend(_backend_cfg(folder, adapter=str(folder)))


def test_backend_with_clap_refine_picks_among_beam_size_candidates(trained, clap_dir):
    folder, _, _ = trained
    cfg = _backend_cfg(folder, batch_size=2, clap_refine={"model": str(clap_dir), "beam_sizes": [1, 2, 3]})
    backend = build_caption_backend(cfg)
    waves = _waves()
    got = backend.caption(waves)
    cands = backend.model.candidates(waves, [1, 2, 3], max_new_tokens=6)
    assert len(got) == 3 and all(g in c for g, c in zip(got, cands))
    assert got == backend.refiner.pick(waves, cands)


def test_run_caption_writes_a_row_per_window(ray_session, trained, tmp_path):
    folder, _, _ = trained
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", tone(2.0, SR, 440), SR)  # one window
    sf.write(audio / "b.wav", tone(5.0, 16000, 660), 16000)  # 2 + 2 + 1 s (resampled)
    sf.write(audio / "c.flac", tone(4.5, 22050, 300, channels=2), 22050)  # 2 + 2 s, 0.5 s tail dropped
    refs = [AudioRef(p.name, str(p)) for p in sorted(audio.iterdir())]
    cfg = _backend_cfg(folder, window_s=2.0, batch_size=2)
    out = tmp_path / "run" / "captions.parquet"
    summary = run_caption(refs, cfg, out)
    assert (summary.done, summary.failed, summary.units) == (3, 0, 6)
    t = pq.read_table(out).to_pandas()
    windows = t[t.chunk_index >= 0]
    assert sorted(windows.groupby("audio_id").size().items()) == [("a.wav", 1), ("b.wav", 3), ("c.flac", 2)]
    assert (windows.status == "ok").all() and (windows.caption.str.len() > 0).all()
    assert set(t.captioner) == {str(folder)} and set(t.prompt) == {DEFAULT_PROMPT}
    assert len(t[t.chunk_index == -1]) == 3
