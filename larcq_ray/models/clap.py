"""CLAP through transformers: loading, deterministic audio features, audio and text encoders.

Split in two on purpose: `AudioFeaturizer` (mel features, CPU, cheap to build) runs in the
decode tasks, `ClapAudioEncoder` / `ClapTextEncoder` (the model) run in actors, so a GPU
actor spends its time on the forward pass and not on numpy spectrograms.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from larcq_ray.core.devices import resolve_device, resolve_dtype
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import quiet_weight_loading, verbose

log = logging.getLogger(__name__)

# A real RoBERTa BPE has ~50k entries; an offline load of a hub id silently yields only specials.
MIN_VOCAB = 50
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def quiet_transformers() -> None:
    """Per-process: weight-loading progress bars from every Ray worker flood a job's log.

    `larcq-ray --verbose` (LARCQ_VERBOSE=1) leaves transformers' logs and bars as they are.
    """
    if verbose():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    quiet_weight_loading()


def _hub_hint(name_or_path: str) -> str:
    if Path(name_or_path).exists():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f" '{name_or_path}' is not a local folder"
        + (" and HF_HUB_OFFLINE=1 forbids downloads" if offline else " and could not be fetched from the Hugging Face hub")
        + "; pass a folder that holds config.json, model weights and the processor files"
    )


def _load(what: str, fn, name_or_path: str):
    try:
        return fn()
    except (OSError, ValueError, EnvironmentError) as e:
        raise LarcqError(f"cannot load CLAP {what} from {name_or_path!r}:{_hub_hint(name_or_path)} ({str(e).splitlines()[0][:200]})") from None


def load_clap_config(name_or_path: str, local_files_only: bool = False):
    from transformers import ClapConfig

    return _load("config", lambda: ClapConfig.from_pretrained(name_or_path, local_files_only=local_files_only), name_or_path)


def load_tokenizer(name_or_path: str, local_files_only: bool = False):
    from transformers import AutoTokenizer

    tok = _load("tokenizer", lambda: AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only), name_or_path)
    if len(tok) < MIN_VOCAB:
        raise LarcqError(
            f"the tokenizer loaded from {name_or_path!r} has only {len(tok)} entries: its vocabulary files are"
            f" missing (an offline load of a hub id gives an empty tokenizer).{_hub_hint(name_or_path)}"
        )
    return tok


def load_clap_model(name_or_path: str, device: str = "auto", dtype: str = "float32", local_files_only: bool = False,
                    adapter: str | None = None):
    """A ClapModel in eval mode; `adapter`: a peft (LoRA) adapter folder merged into it."""
    import torch
    from transformers import ClapModel

    quiet_transformers()
    dev = resolve_device(device, "model.device")
    torch_dtype = getattr(torch, _DTYPES[resolve_dtype(dtype, dev, "model.dtype")])  # auto: bf16 on a GPU
    model = _load(
        "model",
        lambda: ClapModel.from_pretrained(name_or_path, dtype=torch_dtype, local_files_only=local_files_only),
        name_or_path,
    )
    if adapter:
        model = _merge_adapter(model, adapter)
    return model.to(dev).eval()


def _merge_adapter(model, adapter: str):
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise LarcqError(f"model.adapter {adapter!r} is not a peft adapter folder (no adapter_config.json in it)")
    from peft import PeftModel

    try:
        # merged, so encoders see a plain ClapModel
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LarcqError(f"cannot apply the adapter {adapter!r} to the model: {str(e).splitlines()[0][:200]}") from None


@contextlib.contextmanager
def _seeded_numpy(seed: int):
    """The feature extractor draws crops from numpy's global RNG; seed it, then put it back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


@dataclass
class AudioFeatures:
    input_features: np.ndarray  # (channels, frames, mels) float32; channels = 4 for fusion, else 1
    is_longer: bool  # True only when the fusion branch really applies


class AudioFeaturizer:
    """Deterministic CLAP mel features for one waveform at a time.

    Fixes two traps of calling ClapFeatureExtractor directly: fusion crops come from an
    unseeded global RNG (same file, different embedding), and a batch with no long clip
    marks a random clip as long, so a lone short chunk takes the fusion branch.
    """

    def __init__(self, name_or_path: str, fusion_seed: int = 0, local_files_only: bool = False):
        from transformers import ClapFeatureExtractor

        self.extractor = _load(
            "feature extractor",
            lambda: ClapFeatureExtractor.from_pretrained(name_or_path, local_files_only=local_files_only),
            name_or_path,
        )
        config = load_clap_config(name_or_path, local_files_only)
        self.fusion = bool(config.audio_config.enable_fusion)
        # A non-fused CLAP has no fusion branch: it needs a plain (seeded) crop of long input.
        self.truncation = "fusion" if self.fusion else "rand_trunc"
        self.sample_rate = int(self.extractor.sampling_rate)
        self.max_samples = int(self.extractor.nb_max_samples)
        self.fusion_seed = fusion_seed

    def __call__(self, waveform: np.ndarray) -> AudioFeatures:
        with _seeded_numpy(self.fusion_seed):
            out = self.extractor(
                [waveform], sampling_rate=self.sample_rate, truncation=self.truncation, return_tensors="np"
            )
        feats = np.asarray(out["input_features"][0], dtype=np.float32)
        if self.fusion:
            # Fusion input is 4 identical mels unless the audio really was cropped and fused.
            longer = not np.array_equal(feats[0], feats[1])
        else:
            longer = False
        return AudioFeatures(feats, longer)


def _normalize(x):
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClapAudioEncoder:
    def __init__(self, name_or_path: str, device: str = "auto", dtype: str = "float32", local_files_only: bool = False,
                 adapter: str | None = None):
        self.model = load_clap_model(name_or_path, device, dtype, local_files_only, adapter=adapter)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    def __call__(self, input_features: np.ndarray, is_longer: np.ndarray) -> np.ndarray:
        """(B, C, T, M) features + (B,) flags -> (B, D) L2-normalized float32 embeddings."""
        import torch

        with torch.inference_mode():
            feats = torch.as_tensor(input_features).to(self.device, self.dtype)
            longer = torch.as_tensor(np.asarray(is_longer, dtype=bool).reshape(-1, 1)).to(self.device)
            out = self.model.get_audio_features(input_features=feats, is_longer=longer)
            return _normalize(out.pooler_output).cpu().numpy()


@dataclass
class TextEmbeddings:
    embeddings: np.ndarray  # (N, D) float32, L2-normalized
    truncated: np.ndarray  # (N,) bool: text longer than the text tower's limit, cut to fit


class ClapTextEncoder:
    def __init__(self, name_or_path: str, device: str = "auto", dtype: str = "float32", local_files_only: bool = False,
                 adapter: str | None = None):
        self.model = load_clap_model(name_or_path, device, dtype, local_files_only, adapter=adapter)
        self.tokenizer = load_tokenizer(name_or_path, local_files_only)
        self.device = next(self.model.parameters()).device
        cfg = self.model.config.text_config
        # RoBERTa positions start after the padding index: 2 of max_position_embeddings are unusable.
        self.max_tokens = int(min(self.tokenizer.model_max_length, cfg.max_position_embeddings - 2))

    def __call__(self, texts: list[str]) -> TextEmbeddings:
        import torch

        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        truncated = np.array([n > self.max_tokens for n in lengths], dtype=bool)
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            emb = _normalize(out.pooler_output).cpu().numpy()
        return TextEmbeddings(emb, truncated)


@functools.lru_cache(maxsize=4)
def cached_featurizer(name_or_path: str, fusion_seed: int = 0, local_files_only: bool = False) -> AudioFeaturizer:
    """One AudioFeaturizer per process and model: decode tasks reuse it (the driver asks too, to fail fast)."""
    return AudioFeaturizer(name_or_path, fusion_seed, local_files_only)
