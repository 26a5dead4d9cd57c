"""The prefix-lm captioner (SLAM-AAC / SALMONN / GAMA shape): connectors, the three encoder kinds,
what training changes, the captioner folder, CLAP-Refine, the caption backend and the caption job.
Tiny offline models only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from larcq_ray.caption.backends import build_caption_backend, describe
from larcq_ray.caption.clap_refine import ClapRefiner, best_by_cosine
from larcq_ray.caption.config import CaptionBackendConfig, ClapRefineConfig
from larcq_ray.caption.connectors import ConnectorSpec, build_connector, prefix_length
from larcq_ray.caption.job import run_caption
from larcq_ray.caption.prefix_decoder import DEFAULT_PROMPT, DecoderSpec, LoraSpec
from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmBackend, PrefixLmConfig, describe_folder
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import AudioRef

from conftest import CAPTIONS, tone

LINEAR = ConnectorSpec(type="linear", k=5, hidden=16)
QFORMER = ConnectorSpec(type="qformer", window=8, queries=2, qformer_hidden=16, qformer_layers=1, qformer_heads=2)
TARGETS = ["a dog barks loudly", "rain falls on a tin roof", "a bell rings twice"]
FREQS = (300.0, 1000.0, 3000.0)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("plm_lm"), CAPTIONS * 20 + [DEFAULT_PROMPT] * 5, seed=0)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, tiny_clap) -> dict[str, Path]:
    from larcq_ray.offline.tiny_audio_encoders import build_tiny_ast, build_tiny_whisper_encoder

    root = tmp_path_factory.mktemp("plm_encoders")
    return {"clap": tiny_clap, "whisper": build_tiny_whisper_encoder(root / "whisper", chunk_length_s=2),
            "ast": build_tiny_ast(root / "ast", max_length=200)}


def _cfg(encoder: Path, lm_dir: Path, connector: ConnectorSpec = LINEAR, train: str = "lora") -> PrefixLmConfig:
    dec = DecoderSpec(name_or_path=str(lm_dir), train=train, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    return PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(encoder)), connector=connector, decoder=dec)


def _tones(model: PrefixLm, seconds: float = 1.5) -> list[np.ndarray]:
    return [tone(seconds, model.sample_rate, f) for f in FREQS]


def _steps(model: PrefixLm, feats: dict, n: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in model.module.parameters() if p.requires_grad], lr=lr)
    model.set_train(True)
    losses = []
    for _ in range(n):
        loss = model.loss(feats, TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.set_train(False)
    return losses


# --- connectors ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [LINEAR, ConnectorSpec(type="linear", k=3), QFORMER], ids=["mlp", "linear", "qformer"])
@pytest.mark.parametrize("n_frames", [1, 8, 17, 40])
def test_connector_output_shapes(spec, n_frames):
    torch.manual_seed(0)
    conn = build_connector(spec, in_dim=12, out_dim=24)
    out = conn(torch.randn(3, n_frames, 12))
    want = -(-n_frames // spec.k) if spec.type == "linear" else -(-n_frames // spec.window) * spec.queries
    assert prefix_length(spec, n_frames) == want
    assert tuple(out.shape) == (3, want, 24)


def test_qformer_windows_are_independent_and_ignore_their_padding():
    torch.manual_seed(0)
    conn = build_connector(QFORMER, in_dim=12, out_dim=24).eval()
    x = torch.randn(1, 19, 12)  # windows of 8, 8 and 3 real frames (+ 5 padding)
    with torch.no_grad():
        full = conn(x)
        first = conn(x[:, :8])
        tail = conn(x[:, 16:])
        changed = x.clone()
        changed[:, 16:] += 1.0
    assert torch.allclose(full[:, :2], first, atol=1e-5)  # a window sees only its own frames
    assert torch.allclose(full[:, 4:], tail, atol=1e-5)  # the last window: only its 3 real frames count
    assert not torch.allclose(conn(changed)[:, 4:], full[:, 4:])


# --- the model -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clap", "whisper", "ast"])
def test_each_encoder_kind_trains_the_connector_and_lora_only(kind, encoders, lm_dir):
    torch.manual_seed(0)
    model = PrefixLm(_cfg(encoders[kind], lm_dir), trainable=True, local_files_only=True)
    assert model.kind == kind and model.max_seconds == (10.0 if kind == "clap" else 2.0)
    feats = model.featurize(_tones(model))
    with torch.no_grad():
        from larcq_ray.caption.audio_encoders import frames

        n_frames = frames(model.module.encoder, kind, model._tensors(feats)).shape[1]
    prefix = model.prefix(feats)
    assert tuple(prefix.shape[:2]) == (3, prefix_length(LINEAR, n_frames))
    model.set_train(True)
    model.loss(feats, TARGETS).backward()
    m = model.module
    assert all(not p.requires_grad and p.grad is None for p in m.encoder.parameters())
    assert all(p.grad is not None for p in m.connector.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in m.connector.parameters())
    named = dict(m.decoder.named_parameters())
    lora = {n for n in named if "lora_" in n}
    assert lora and all(named[n].grad is not None for n in lora)
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if n not in lora)


def test_clap_features_do_not_depend_on_batch_mates(encoders, lm_dir):
    """A fused CLAP's extractor marks a random short clip as 'longer' when none is: not here."""
    model = PrefixLm(_cfg(encoders["clap"], lm_dir), local_files_only=True)
    waves = _tones(model, 2.0)
    batch = model.featurize(waves)
    assert not batch["is_longer"].any()
    for i, w in enumerate(waves):
        alone = model.featurize([w])
        assert np.array_equal(alone["input_features"][0], batch["input_features"][i])
        assert np.array_equal(alone["is_longer"][0], batch["is_longer"][i])


@pytest.mark.parametrize("connector", [LINEAR, QFORMER], ids=["linear", "qformer"])
def test_a_few_steps_with_a_fully_trained_decoder_lower_the_loss(connector, encoders, lm_dir):
    torch.manual_seed(0)
    model = PrefixLm(_cfg(encoders["whisper"], lm_dir, connector, train="full"), trainable=True, local_files_only=True)
    losses = _steps(model, model.featurize(_tones(model)), 12, 3e-3)
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(p.grad is None for p in model.module.encoder.parameters())  # the encoder stays frozen


@pytest.mark.parametrize("train", ["lora", "full"])
def test_save_then_load_gives_identical_generations(train, encoders, lm_dir, tmp_path):
    torch.manual_seed(0)
    model = PrefixLm(_cfg(encoders["ast"], lm_dir, QFORMER, train=train), trainable=True, local_files_only=True)
    feats = model.featurize(_tones(model))
    _steps(model, feats, 5, 3e-3)
    before = model.generate(feats, num_beams=2, max_new_tokens=6)
    folder = model.save(tmp_path / "captioner", extra={"steps": 5})
    assert (folder / "connector.safetensors").is_file() and not (folder / "encoder.safetensors").exists()
    assert (folder / ("decoder_adapter" if train == "lora" else "decoder")).is_dir()
    assert json.loads((folder / "captioner.json").read_text())["trained"] == {"steps": 5}
    loaded = PrefixLm.load(folder, local_files_only=True)
    assert loaded.generate(feats, num_beams=2, max_new_tokens=6) == before
    assert loaded.candidates(feats, [2, 1], max_new_tokens=6) == [
        [b, g] for b, g in zip(before, loaded.generate(feats, num_beams=1, max_new_tokens=6))]


# --- CLAP-Refine -----------------------------------------------------------------------------

def test_best_by_cosine_picks_the_nearest_first_on_ties():
    audio = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text = np.array([[0.0, 1.0], [1.0, 0.1], [3.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    # window 0: rows 0,1,2 -> row 2 (cosine 1); window 1: rows 1,4,0 -> row 0 at position 2;
    # window 2: rows 3,3 (a tie) -> position 0; window 3 has no candidates.
    assert best_by_cosine(np.vstack([audio, audio[:1]]), text, [[0, 1, 2], [1, 4, 0], [3, 3], []]) == [2, 2, 0, -1]


def test_clap_refine_picks_the_candidate_with_the_highest_cosine(monkeypatch, tiny_clap):
    refiner = ClapRefiner(ClapRefineConfig(model=str(tiny_clap), beam_sizes=[2, 3]), "cpu", sample_rate=48000,
                          local_files_only=True)
    near = {"a dog barks loudly": [1.0, 0.0, 0.0], "rain falls": [0.6, 0.8, 0.0], "a bell": [0.0, 0.0, 1.0],
            "hum": [0.0, 1.0, 0.0]}
    monkeypatch.setattr(refiner, "embed_audio", lambda waves: np.array([[0.0, 1.0, 0.1], [1.0, 0.0, 0.0]][:len(waves)]))
    monkeypatch.setattr(refiner, "embed_text", lambda texts: np.array([near[t] for t in texts]))
    waves = [np.zeros(4800, np.float32)] * 2
    assert refiner.pick(waves, [["a dog barks loudly", "rain falls", "hum", "a bell"],
                                ["", "a bell", "rain falls ", "a dog barks loudly"]]) == ["hum", "a dog barks loudly"]
    assert refiner.pick(waves[:1], [["", "  "]]) == [""]
    with pytest.raises(LarcqError, match="candidate lists"):
        refiner.pick(waves, [["hum"]])


def test_clap_refine_with_a_real_clap_agrees_with_the_clap_encoders(tiny_clap):
    """The pick is the argmax of cosines computed independently by ClapAudioEncoder / ClapTextEncoder,
    whatever the candidates' order; windows at another rate are resampled to the CLAP's."""
    from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder, ClapTextEncoder

    clap = str(tiny_clap)
    waves48 = [tone(2.0, 48000, f) for f in FREQS]
    fz = AudioFeaturizer(clap, local_files_only=True)
    feats = [fz(w) for w in waves48]
    audio = ClapAudioEncoder(clap, "cpu", local_files_only=True)(np.stack([f.input_features for f in feats]),
                                                                  np.array([f.is_longer for f in feats]))
    text = ClapTextEncoder(clap, "cpu", local_files_only=True)(CAPTIONS).embeddings
    expect = [CAPTIONS[int(np.argmax(text @ a))] for a in audio]

    cfg = ClapRefineConfig(model=clap, beam_sizes=[2])
    refiner = ClapRefiner(cfg, "cpu", sample_rate=48000, local_files_only=True)
    assert np.allclose(refiner.embed_audio(waves48), audio, atol=1e-5)  # the shared tower is the same model
    assert refiner.pick(waves48, [list(CAPTIONS)] * 3) == expect
    assert refiner.pick(waves48, [list(reversed(CAPTIONS))] * 3) == expect
    rotated = [CAPTIONS[3:] + CAPTIONS[:3] for _ in waves48]
    assert refiner.pick(waves48, rotated) == expect

    at16 = ClapRefiner(cfg, "cpu", sample_rate=16000, local_files_only=True)
    waves16 = [tone(2.0, 16000, f) for f in FREQS]
    cos = np.sum(at16.embed_audio(waves16) * audio, axis=1)
    assert (cos > 0.98).all(), cos


# --- the caption backend and job -------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner(encoders, lm_dir, tmp_path_factory) -> Path:
    """A whisper-encoder (16 kHz, 2 s) captioner that memorized one caption per tone."""
    torch.manual_seed(0)
    model = PrefixLm(_cfg(encoders["whisper"], lm_dir, LINEAR, train="full"), trainable=True, local_files_only=True)
    _steps(model, model.featurize(_tones(model, 2.0)), 30, 3e-3)
    return model.save(tmp_path_factory.mktemp("plm_captioner") / "captioner", extra={"steps": 30})


def _backend_cfg(folder: Path, **kw) -> CaptionBackendConfig:
    return CaptionBackendConfig(kind="prefix-lm", model=str(folder), max_new_tokens=8, local_files_only=True,
                                device="cpu", **kw)


def test_describe_reads_the_folder_without_weights(captioner):
    spec = describe(_backend_cfg(captioner))
    assert (spec.name, spec.sample_rate, spec.window_s, spec.prompt) == (str(captioner), 16000, 2.0, DEFAULT_PROMPT)
    assert describe_folder(_backend_cfg(captioner, window_s=1.5)).window_s == 1.5


def test_backend_captions_in_batches(captioner):
    backend = build_caption_backend(_backend_cfg(captioner, batch_size=2))
    assert isinstance(backend, PrefixLmBackend)
    assert (backend.name, backend.sample_rate, backend.window_s) == (str(captioner), 16000, 2.0)
    waves = [tone(2.0, 16000, f) for f in FREQS]
    got = backend.caption(waves)
    assert got == TARGETS  # it memorized them
    assert got == backend.model.generate(backend.model.featurize(waves), max_new_tokens=8)
    assert backend.caption(waves[1:2]) == got[1:2]


def test_backend_with_clap_refine_picks_among_beam_size_candidates(captioner, tiny_clap):
    cfg = _backend_cfg(captioner, batch_size=2, clap_refine={"model": str(tiny_clap), "beam_sizes": [1, 2, 3]})
    backend = build_caption_backend(cfg)
    assert backend.refiner is not None and backend.refiner.sample_rate == 16000 and backend.refiner.clap_rate == 48000
    waves = [tone(2.0, 16000, f) for f in FREQS]
    cands = backend.model.candidates(backend.model.featurize(waves), [1, 2, 3], max_new_tokens=8)
    assert all(len(c) == 3 for c in cands)
    got = backend.caption(waves)
    assert all(g in c for g, c in zip(got, cands))
    assert got == backend.refiner.pick(waves, cands)


def test_backend_errors(captioner, tmp_path):
    empty = tmp_path / "not_a_captioner"
    empty.mkdir()
    for fn in (describe, build_caption_backend):
        with pytest.raises(LarcqError, match="no captioner.json"):
            fn(_backend_cfg(empty))
        with pytest.raises(LarcqError, match="not a folder"):
            fn(_backend_cfg(tmp_path / "missing"))
        with pytest.raises(LarcqError, match=r"window_s 3 s is longer than the encoder .* \(2 s\)"):
            fn(_backend_cfg(captioner, window_s=3.0))
        with pytest.raises(LarcqError, match="caption.adapter does not apply"):
            fn(_backend_cfg(captioner, adapter=str(tmp_path)))
    (empty / "captioner.json").write_text(json.dumps({"kind": "prefix-lm"}))
    with pytest.raises(LarcqError, match="not a valid prefix-lm config"):
        describe(_backend_cfg(empty))


def test_run_caption_with_the_prefix_lm_backend(ray_session, captioner, tiny_clap, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", tone(2.0, 16000, 300.0), 16000)  # one window
    sf.write(audio / "b.wav", tone(5.0, 48000, 1000.0), 48000)  # 2 + 2 + 1 s, resampled to 16 kHz
    sf.write(audio / "c.flac", tone(4.0, 22050, 3000.0, channels=2), 22050)  # 2 + 2 s
    refs = [AudioRef(p.name, str(p)) for p in sorted(audio.iterdir())]
    refine = {"model": str(tiny_clap), "beam_sizes": [1, 2]}
    cfg = _backend_cfg(captioner, batch_size=3, clap_refine=refine)
    out = tmp_path / "run" / "captions.parquet"
    with pytest.raises(LarcqError, match="longer than"):
        run_caption(refs, cfg.model_copy(update={"window_s": 2.5}), out)
    summary = run_caption(refs, cfg, out)
    assert (summary.done, summary.failed, summary.units) == (3, 0, 6)

    t = pq.read_table(out).to_pandas()
    windows = t[t.chunk_index >= 0]
    assert sorted(zip(windows.audio_id, windows.chunk_index)) == [
        ("a.wav", 0), ("b.wav", 0), ("b.wav", 1), ("b.wav", 2), ("c.flac", 0), ("c.flac", 1)]
    assert (t.status == "ok").all() and (t.caption.str.len() > 0).all()
    assert set(t.captioner) == {str(captioner)} and set(t.prompt) == {DEFAULT_PROMPT}
    settings = {json.loads(s)["clap_refine"]["beam_sizes"] == [1, 2] and json.loads(s)["kind"] == "prefix-lm"
                for s in t.settings}
    assert settings == {True}
    assert json.loads(t.settings.iloc[0])["clap_refine"] == {"model": str(tiny_clap), "beam_sizes": [1, 2],
                                                             "adapter": None}
    # the whole-window rows of the tones the captioner memorized carry their captions
    first = windows[windows.chunk_index == 0].set_index("audio_id").caption
    assert first["a.wav"] == TARGETS[0] and first["b.wav"] == TARGETS[1]
