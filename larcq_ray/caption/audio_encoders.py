"""Audio encoders for the prefix-lm captioner: a transformers audio model, by hub id or folder, read as
a sequence of frames (B, T, D).

- `clap`: CLAP's audio tower (HTS-AT), ours included (a CLAP folder from `train-clap`);
- `whisper`: Whisper's encoder (SALMONN's speech encoder);
- `ast`: the Audio Spectrogram Transformer (GAMA's encoder);
- `auto`: any other transformers audio model with a feature extractor (its `.encoder` if it has one).
EAT (SLAM-AAC's encoder) and BEATs (SALMONN's second encoder) are not in transformers; CLAP's
HTS-AT and Whisper's encoder stand in for them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from larcq_ray.core.errors import LarcqError

ENCODER_TYPES = ("clap", "whisper", "ast", "auto")
_BY_MODEL_TYPE = {"clap": "clap", "whisper": "whisper", "audio-spectrogram-transformer": "ast"}


def _load(what: str, name: str, fn):
    try:
        return fn()
    except (OSError, ValueError) as e:
        raise LarcqError(f"audio encoder {name!r}: could not load its {what} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None


def encoder_type(name_or_path: str, declared: str = "auto", local_files_only: bool = False) -> str:
    """The encoder family of a model folder or hub id ("auto" -> from its config's model_type)."""
    if declared != "auto":
        return declared
    from transformers import AutoConfig

    config = _load("config", name_or_path, lambda: AutoConfig.from_pretrained(name_or_path,
                                                                               local_files_only=local_files_only))
    return _BY_MODEL_TYPE.get(config.model_type, "auto")


def load_feature_extractor(name_or_path: str, kind: str, local_files_only: bool = False):
    from transformers import (ASTFeatureExtractor, AutoFeatureExtractor, ClapFeatureExtractor,
                              WhisperFeatureExtractor)

    cls = {"clap": ClapFeatureExtractor, "whisper": WhisperFeatureExtractor, "ast": ASTFeatureExtractor}.get(
        kind, AutoFeatureExtractor)
    fe = _load("feature extractor", name_or_path,
               lambda: cls.from_pretrained(name_or_path, local_files_only=local_files_only))
    if kind == "clap":
        # The truncation mode decides the mel filters and the channel count: it must follow the audio
        # tower (fusion or not), whatever the saved extractor says (as models.clap.AudioFeaturizer does).
        from transformers import AutoConfig

        config = _load("config", name_or_path,
                       lambda: AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only))
        fused = bool(getattr(getattr(config, "audio_config", config), "enable_fusion", False))
        fe.truncation = "fusion" if fused else "rand_trunc"
    return fe


def max_seconds(fe, kind: str) -> float | None:
    """The longest audio one encoder input holds (None: no fixed limit)."""
    sr = float(fe.sampling_rate)
    if kind == "clap":
        return float(fe.nb_max_samples) / sr
    if kind == "whisper":
        return float(fe.chunk_length)
    if kind == "ast":
        return float(fe.max_length) * 0.01  # 10 ms hop
    return None


def featurize(fe, kind: str, waves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Encoder inputs for a batch of mono float32 waveforms at the extractor's rate (numpy arrays).

    CLAP: the truncation mode is the one `load_feature_extractor` set from the tower's config. The
    extractor's own `is_longer` is not used: with truncation "fusion" and no clip longer than its
    10 s it marks a random clip as longer (so a window's caption would depend on its batch-mates and
    on numpy's global RNG). Crops of longer audio are drawn from a fixed seed.
    """
    sr = int(fe.sampling_rate)
    waves = [np.asarray(w, dtype=np.float32) for w in waves]
    if kind == "clap":
        fusion = getattr(fe, "truncation", "fusion") == "fusion"
        state = np.random.get_state()
        np.random.seed(0)
        try:
            out = fe(waves, sampling_rate=sr, return_tensors="np")
        finally:
            np.random.set_state(state)
        feats = np.asarray(out["input_features"], dtype=np.float32)
        # Fusion input is 4 identical mels unless the clip really was longer (cropped and fused).
        longer = [bool(fusion and not np.array_equal(f[0], f[1])) for f in feats]
        return {"input_features": feats, "is_longer": np.asarray(longer, dtype=bool).reshape(-1, 1)}
    if kind == "whisper":
        out = fe(waves, sampling_rate=sr, return_tensors="np")
        return {"input_features": np.asarray(out["input_features"], dtype=np.float32)}
    out = fe(waves, sampling_rate=sr, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items() if k in ("input_values", "input_features", "attention_mask")}


def build_encoder_module(name_or_path: str, kind: str, local_files_only: bool = False):
    """The torch module that maps featurize()'s arrays to hidden states."""
    from transformers import ASTModel, AutoModel, ClapModel, WhisperModel

    from larcq_ray.core.ray_session import quiet_weight_loading

    quiet_weight_loading()  # runs in Ray actors: no "Loading weights" bar per actor on the driver's console
    kw = dict(local_files_only=local_files_only)
    if kind == "clap":
        return _load("model", name_or_path, lambda: ClapModel.from_pretrained(name_or_path, **kw).audio_model)
    if kind == "whisper":
        return _load("model", name_or_path, lambda: WhisperModel.from_pretrained(name_or_path, **kw).encoder)
    if kind == "ast":
        return _load("model", name_or_path, lambda: ASTModel.from_pretrained(name_or_path, **kw))
    model = _load("model", name_or_path, lambda: AutoModel.from_pretrained(name_or_path, **kw))
    return getattr(model, "encoder", model)


def frames(module, kind: str, inputs: dict[str, Any]):
    """Hidden states as (B, T, D) frames, in time order."""
    if kind == "clap":
        out = module(input_features=inputs["input_features"], is_longer=inputs.get("is_longer"))
        h = out.last_hidden_state  # (B, hidden, freq, time): HTS-AT's last stage, its time axis regrouped
        b, c, f, t = h.shape
        return h.permute(0, 3, 1, 2).reshape(b, t, c * f)
    out = module(**inputs)
    if kind == "ast":
        # [CLS, distillation, patches]; the patches run frequency-major (f0t0, f0t1, ...). Time-major
        # instead, so that stacked / windowed frames are neighbours in time.
        f, t = module.embeddings.get_shape(module.config)
        h = out.last_hidden_state[:, 2:]
        b, _, d = h.shape
        return h.reshape(b, f, t, d).transpose(1, 2).reshape(b, t * f, d)
    return out.last_hidden_state
