"""Torch CLAP features (larcq_ray.models.clap_features) against transformers' ClapFeatureExtractor."""

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import tone
from larcq_ray.config import PipelineConfig
from larcq_ray.index.job import run_index
from larcq_ray.index.stages import ClapEmbedStage, DecodeChunkStage, columns, feature_settings, resolve_features
from larcq_ray.index.store import IndexStore
from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder
from larcq_ray.models.clap_features import ClapFeatureSpec, TorchClapFeatures, clap_features_torch

SR = 48000
MIN_COS = 0.9999  # the bar: 1 - cosine at most 1e-4


def noise(seconds, seed=0, amp=0.1):
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * amp).astype(np.float32)


def clips() -> dict:
    return {
        "tone": tone(10.0, SR),
        "noise": noise(10.0),
        "silence": np.zeros(10 * SR, dtype=np.float32),
        "short": tone(3.3, SR, freq=1000.0),  # repeat-padded
        "quiet": noise(10.0, seed=3, amp=1e-4),  # quiet bins: where a float32 STFT drifts
        "quiet_tone": tone(10.0, SR, amp=1e-3),  # mostly bins near the -100 dB floor: int16 noise shows
        "tone_in_noise": tone(7.0, SR) + noise(7.0, seed=4, amp=1e-3),
        "just_over_10s": noise(10.005, seed=2),  # 10 s < n < 10 s + one hop: not fused, its own frames
        "long": noise(25.0, seed=1),  # fused (3 seeded crops + shrink) or a seeded crop
    }


@pytest.fixture(scope="module", params=["tiny_clap", "tiny_clap_unfused"])
def model(request):
    path = str(request.getfixturevalue(request.param))
    fz = AudioFeaturizer(path)
    return path, fz, ClapAudioEncoder(path, device="cpu"), TorchClapFeatures(
        ClapFeatureSpec.from_extractor(fz.extractor, fz.fusion))


def embed(enc, feats, longer):
    return enc(np.asarray(feats, dtype=np.float32), np.asarray(longer, dtype=bool))


def test_features_and_embeddings_equal_the_transformers_path(model):
    path, fz, enc, tf = model
    cs = clips()
    refs = [fz(c) for c in cs.values()]
    feats, longer = tf(list(cs.values()), seed=0)  # one batched call
    assert feats.shape == (len(cs), 4 if fz.fusion else 1, 1001, 64) and feats.dtype == torch.float32
    assert longer.tolist() == [r.is_longer for r in refs]
    assert longer[-1] == fz.fusion  # the long clip really takes the fusion branch on a fused model
    for name, r, f in zip(cs, refs, feats.numpy()):
        # float64 STFT: the same log-mel up to float32 rounding (a float32 STFT is off by up to ~0.6 dB)
        assert np.abs(r.input_features - f).max() < 1e-3, name
    e_ref = embed(enc, np.stack([r.input_features for r in refs]), [r.is_longer for r in refs])
    e = embed(enc, feats, longer)
    cos = (e_ref * e).sum(1)
    assert cos.min() >= MIN_COS, dict(zip(cs, cos))


def test_float16_mel_passes_and_float16_or_int16_samples_fail(model):
    """Why the decode tasks ship float16 mel, and the device path float32 samples."""
    path, fz, enc, tf = model
    cs = list(clips().values())
    feats, longer = tf(cs)
    ref = embed(enc, feats, longer)
    f16_mel = embed(enc, feats.half().float(), longer)
    assert (ref * f16_mel).sum(1).min() >= MIN_COS
    bad = []
    for cast in (lambda c: c.astype(np.float16), lambda c: np.round(np.clip(c, -1, 1) * 32767) / 32767):
        f, lg = tf([cast(c) for c in cs])
        bad.append((ref * embed(enc, f, lg)).sum(1).min())
    assert max(bad) < MIN_COS, bad


def test_crops_are_seeded_batch_invariant_and_leave_the_global_rng(model):
    path, fz, enc, tf = model
    long = noise(31.0, seed=5)
    state = np.random.get_state()
    alone, _ = tf([long], seed=0)
    together, _ = tf([noise(4.0), long, tone(10.0, SR)], seed=0)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(state[1:], after[1:])) and np.array_equal(state[1], after[1])
    assert torch.equal(alone[0], together[1])
    other, _ = tf([long], seed=7)
    assert not torch.equal(other[0], alone[0])  # the seed is what fixes the crops
    np.testing.assert_allclose(alone[0].numpy(), AudioFeaturizer(path, fusion_seed=0)(long).input_features, atol=1e-3)


def test_public_function_takes_a_padded_batch(model):
    path, fz, enc, tf = model
    cs = [noise(10.0, seed=8), tone(4.0, SR), noise(12.0, seed=9)]
    padded = torch.zeros(len(cs), max(len(c) for c in cs))
    for i, c in enumerate(cs):
        padded[i, :len(c)] = torch.from_numpy(c)
    feats, longer = clap_features_torch(padded, fz.fusion, seed=0, lengths=[len(c) for c in cs], extractor=fz.extractor)
    want, want_longer = tf(cs, seed=0)
    assert torch.equal(feats, want) and longer.tolist() == want_longer.tolist()
    # all exactly 10 s: the batched path that never leaves the device
    fast, fl = clap_features_torch(padded[:1, :10 * SR], fz.fusion, extractor=fz.extractor)
    assert torch.equal(fast, want[:1]) and fl.tolist() == [False]


def _files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / "tone.wav", tone(3.0, SR), SR)  # shorter than a window
    sf.write(folder / "noise.flac", noise(10.0, seed=11), SR, subtype="PCM_24")  # exactly 10 s
    sf.write(folder / "silence.wav", np.zeros(5 * SR, dtype=np.float32), SR)
    sf.write(folder / "long44k.flac", tone(23.0, 44100, freq=660) + noise(23.0, seed=12, amp=0.01)[:23 * 44100],
             44100)  # resampled; fused whole-file row
    return folder


def test_decode_and_embed_stages_agree_in_every_mode(model, tmp_path):
    path, fz, enc, tf = model
    d = _files(tmp_path / "c")
    batch = {"audio_id": np.array(sorted(p.name for p in d.iterdir()), dtype=object)}
    batch["path"] = np.array([str(d / a) for a in batch["audio_id"]], dtype=object)
    chunking = {"mode": "fixed", "window_s": 10.0, "overlap_s": 0.0, "min_chunk_s": 1.0}
    embed_stage = ClapEmbedStage(model=path, device="cpu", dtype="float32", local_files_only=True, adapter=None,
                                 actors=1, cpus=1, gpus=0, torch_threads=None, fusion_seed=0)
    embed_stage.setup()
    out, rows_by_mode = {}, {}
    for mode in ("cpu-numpy", "cpu-torch", "device"):
        st = DecodeChunkStage(model=path, fusion_seed=0, local_files_only=True, chunking=chunking, whole_file=True,
                              silence_threshold_db=-80.0, memory_mb=512, features=mode)
        st.setup()
        rows = rows_by_mode[mode] = st.process_batch(batch)
        assert set(rows["status"]) == {"ok"}
        chunk = (rows["kind"] == "chunk") & (rows["end_s"] - rows["start_s"] == 10.0)
        sizes = {len(b) for b in rows["features"][chunk]}
        assert sizes == {dict(zip(("cpu-numpy", "cpu-torch", "device"), (1001 * 64 * 4, 1001 * 64 * 2, SR * 40)))[mode]}
        res = embed_stage.process_batch(rows)
        assert "features" not in res and "feat_format" not in res
        out[mode] = (rows["audio_id"], rows["chunk_index"], np.stack([np.frombuffer(e, np.float32)
                                                                     for e in res["embedding"]]))
    ref = out["cpu-numpy"]
    for mode in ("cpu-torch", "device"):
        assert np.array_equal(out[mode][0], ref[0]) and np.array_equal(out[mode][1], ref[1])
        cos = (out[mode][2] * ref[2]).sum(1)
        assert cos.min() >= MIN_COS, (mode, cos)
    # a mixed batch (mel rows, wave rows and a failed row together) embeds each row as it would alone
    def row_list(r):
        return [{k: v[i] for k, v in r.items()} for i in range(len(r["audio_id"]))]

    mel_rows, wave_rows = row_list(rows_by_mode["cpu-torch"]), row_list(rows_by_mode["device"])
    n = len(mel_rows)
    mixed = columns([{**mel_rows[0], "status": "failed", "features": b"", "feat_format": ""}]
                    + mel_rows[1:n // 2] + wave_rows[n // 2:])
    res = embed_stage.process_batch(mixed)
    assert res["embedding"][0] == b""
    got = np.stack([np.frombuffer(e, np.float32) for e in res["embedding"][1:]])
    want = np.concatenate([out["cpu-torch"][2][1:n // 2], out["device"][2][n // 2:]])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_picks_device_only_with_a_gpu(tiny_clap):
    assert resolve_features("auto", 1.0) == "device"
    assert resolve_features("auto", 0.0) == "cpu-torch"
    assert resolve_features("auto", 1.0, device="cpu") == "cpu-torch"
    assert resolve_features("cpu-numpy", 1.0) == "cpu-numpy"
    # float16 mel only towards GPU actors (bf16/fp16 models); CPU actors get the reference's float32
    assert feature_settings("cpu-torch", 1.0) == {"features": "cpu-torch", "mel_dtype": "float16"}
    assert feature_settings("auto", 0) == {"features": "cpu-torch", "mel_dtype": "float32"}
    st = DecodeChunkStage(model=str(tiny_clap), fusion_seed=0, local_files_only=True, chunking={}, whole_file=True,
                          silence_threshold_db=-80.0, memory_mb=512, features="gpu")
    with pytest.raises(ValueError, match="index.features"):
        st.setup()
    with pytest.raises(Exception, match="features"):
        PipelineConfig.model_validate({"data": {"corpus": "x"}, "model": {"name_or_path": "m"},
                                       "index": {"features": "gpu"}})


def test_index_results_unchanged_with_torch_features(ray_session, tiny_clap, tmp_path):
    d = _files(tmp_path / "corpus")
    emb = {}
    for mode in ("cpu-numpy", "cpu-torch", "device"):
        cfg = PipelineConfig.model_validate({
            "run_dir": str(tmp_path / mode), "data": {"corpus": str(d)},
            "model": {"name_or_path": str(tiny_clap), "device": "cpu"},
            "index": {"batch_size": 4, "files_per_decode_task": 2, "features": mode, "num_gpus_per_actor": 0,
                      "chunking": {"mode": "fixed", "window_s": 4.0, "min_chunk_s": 0.5}},
        })
        summary = run_index(cfg, show_progress=False)
        assert summary.done == 4 and summary.failed == 0
        ch = IndexStore(tmp_path / mode / "index").read_chunks().to_pandas().sort_values(["audio_id", "chunk_index"])
        emb[mode] = (ch.audio_id.tolist(), ch.chunk_index.tolist(),
                     np.stack([np.asarray(e, dtype=np.float32) for e in ch.embedding]))
    ref = emb["cpu-numpy"]
    for mode in ("cpu-torch", "device"):
        assert emb[mode][:2] == ref[:2]
        assert (emb[mode][2] * ref[2]).sum(1).min() >= MIN_COS, mode
    # CPU actors: cpu-torch ships float32 mel, the same values as the extractor's
    np.testing.assert_allclose(emb["cpu-torch"][2], ref[2], atol=1e-5)


def test_the_gpu_code_path_gives_the_same_log_mel(model):
    """`_log_mel` (one batched torch FFT: what runs on CUDA) against the blocked numpy CPU path, on CPU
    tensors, so the device path's arithmetic is checked without a GPU."""
    path, fz, enc, tf = model
    cs = [noise(10.0, seed=13), tone(10.0, SR, amp=1e-3), np.zeros(10 * SR, np.float32)]
    waves = torch.as_tensor(np.stack(cs))
    got = tf._log_mel(waves.double())
    want = tf.log_mel(waves)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 1001, 64)
    assert (got - want).abs().max().item() < 1e-3
    assert torch.all(got[2] == -100.0)  # the -100 dB floor, exactly
