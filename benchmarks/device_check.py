"""The GPU measurements of the captioners, one section per process (driven by device_check.sh).

Sections (each writes one JSON line to $OUT/device_check.jsonl as it ends):

    env             python / torch / transformers versions, the GPU, bf16 support, missing packages
    prefix_lm_7b    larcq_ray's prefix-lm captioner (PrefixLm): CLAP audio tower (default ClapConfig
                    audio dims) -> linear connector -> a Llama-2/Vicuna-7B-shaped decoder
    qwen2_audio_7b  Qwen2-Audio-7B's architecture through larcq_ray's hf-audio-lm backend
    af3_7b          Audio Flamingo 3's architecture (AudioFlamingo3ForConditionalGeneration), likewise;
                    skipped when the installed transformers has no such class

Every model has random weights (no hub here): the figures are costs, not quality. No 7B weights touch
the disk: each model folder holds a config, a tokenizer / processor and no weights, and while a
section loads it, the model class's `from_pretrained` builds the model from the config directly on
the device, in the dtype asked for (see `_weights_from_config`). The project code in between (feature
extraction, encoder, connector, prompt building, `generate`, decoding) is the product's own.

Throughput: `batch` windows of `window_s` s of noise, greedy, exactly `max_new_tokens` new tokens per
window (min_new_tokens is set too, so a random model's early EOS cannot shorten the work); one warm-up
batch, then `timed_batches` timed ones; audio seconds captioned per wall-clock second, CPU feature
extraction included (it is part of the caption path).

DEVICE_CHECK_DRY_RUN=1, or no CUDA: the same code on CPU with tiny dims (CI's check); full-size configs
are then only instantiated on the meta device, to count their parameters.

Only the standard library is imported at the top: `deps` and `report` work without torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

SECTIONS = ("env", "prefix_lm_7b", "qwen2_audio_7b", "af3_7b", "prefix_lm_1b_cost")
# Seed 004's cost protocol (larcq_ray.evaluate.alm_cost): batch 1, warm-up runs, then timed runs.
COST_RUNS = {"warmup_runs": 2, "timed_runs": 5}
JSONL = "device_check.jsonl"
MD = "device_check.md"

WINDOW_S = 10.0
BATCH = 8
MAX_NEW_TOKENS = 32
PROMPT = "Describe the sounds in this audio."

# module -> distribution (for versions); what each section needs.
PACKAGES = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "numpy": "numpy",
            "safetensors": "safetensors", "pydantic": "pydantic", "huggingface_hub": "huggingface-hub"}
_MODELS = ["torch", "transformers", "tokenizers", "numpy", "safetensors", "huggingface_hub"]
NEEDS = {
    "env": ["torch"],
    "prefix_lm_7b": _MODELS + ["pydantic"],  # larcq_ray's caption modules are pydantic models
    "qwen2_audio_7b": _MODELS,  # pydantic too for larcq_ray's backend; without it, a direct path
    "af3_7b": _MODELS,
    "prefix_lm_1b_cost": _MODELS + ["pydantic"],
}
WHEELS_HINT = ("carry them as wheels (see the header of device_check.sh: pip download ... -d .whl pydantic==2.14.4 "
               "pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0, "
               "then carry .whl; the script installs it)")

CORPUS = [
    "a dog barks twice in the distance", "rain falls steadily on a tin roof", "a car engine starts and idles",
    "birds chirp while wind blows through trees", "a door slams and footsteps walk away",
    "people talk quietly in a crowded cafe", "a train passes over metal tracks", "thunder rumbles far away",
    "water runs from a tap into a sink", "a baby cries and a woman speaks softly", "music plays from a radio",
    "a siren wails as traffic passes by", "keys jingle and a lock clicks open", "waves crash on a rocky shore",
]


# -- small helpers (standard library only) -----------------------------------------------------------


def missing_packages(names=None) -> list[str]:
    names = names if names is not None else list(PACKAGES)
    return [n for n in names if not _importable(n)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version(module: str) -> str | None:
    try:
        return importlib.metadata.version(PACKAGES.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return None


def dry_run() -> tuple[bool, str]:
    """(dry, why): tiny CPU dims when asked for, or when torch sees no CUDA GPU."""
    if os.environ.get("DEVICE_CHECK_DRY_RUN", "").strip().lower() not in ("", "0", "false", "no"):
        return True, "DEVICE_CHECK_DRY_RUN set"
    import torch

    if not torch.cuda.is_available():
        return True, "no CUDA GPU visible to torch"
    return False, "CUDA GPU"


def write_line(out: Path, rec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / JSONL, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
    figs = rec.get("figures") or {}
    short = {k: figs[k] for k in ("audio_s_per_s", "tokens_per_s", "peak_gpu_gib", "params_b") if k in figs}
    print(f"[device_check] {rec['section']}: {rec['status']}"
          + (f" ({rec['reason']})" if rec.get("reason") else "") + (f" {short}" if short else ""), flush=True)


def read_lines(out: Path) -> list[dict]:
    p = out / JSONL
    if not p.is_file():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


class Skip(Exception):
    """A section that cannot run here, with the reason."""


# -- model building (offline, random weights) -------------------------------------------------------


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def _n_params(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e9, 4)


def meta_params(cls, config) -> float:
    """Billions of parameters of `cls(config)`, built on the meta device (no memory, no time)."""
    import torch

    with torch.device("meta"):
        return _n_params(cls._from_config(config))


CREATED: list = []  # models `_weights_from_config` built, for the figures


@contextmanager
def _weights_from_config(cls, folders, device: str, min_new_tokens: int):
    """While active, `cls.from_pretrained(folder, dtype=...)` on one of `folders` (config, no weights)
    builds the model from its config directly on `device` with random weights: a 7B model in seconds,
    with nothing written to or read from disk. Other names load as usual."""
    import torch
    from transformers import AutoConfig

    wanted = {str(Path(f).resolve()) for f in folders}
    saved = cls.__dict__.get("from_pretrained")
    original = cls.from_pretrained

    def from_pretrained(name, *args, dtype=None, **kwargs):
        if str(Path(str(name)).resolve()) not in wanted:
            return original(name, *args, dtype=dtype, **kwargs)
        config = AutoConfig.from_pretrained(name, local_files_only=True)
        dt = dtype if isinstance(dtype, torch.dtype) else (getattr(torch, dtype) if isinstance(dtype, str)
                                                           and dtype != "auto" else torch.float32)
        with torch.device(device):
            if hasattr(cls, "from_config"):  # an Auto class
                model = cls.from_config(config, dtype=dt)
            else:
                model = cls._from_config(config, dtype=dt)
        model.eval()
        model.generation_config.min_new_tokens = min_new_tokens  # random weights: no early EOS
        CREATED.append(model)
        return model

    cls.from_pretrained = from_pretrained
    try:
        yield
    finally:
        if saved is None:
            del cls.from_pretrained
        else:
            cls.from_pretrained = saved


def _count_generated(model, stats: list) -> None:
    """Record (rows, new tokens per row) of every generate call of this model instance."""
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        ids = kwargs.get("input_ids")
        prompt = ids.shape[1] if ids is not None else 0  # inputs_embeds: only new tokens come back
        stats.append((int(out.shape[0]), int(out.shape[1]) - prompt))
        return out

    model.generate = generate


def build_clap_encoder(folder: Path, dry: bool) -> Path:
    """A CLAP folder: default ClapConfig audio tower (tiny in a dry run), a tiny text tower (the
    prefix-lm reads only the audio tower), the feature extractor; random weights (~0.1 GB)."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    folder.mkdir(parents=True, exist_ok=True)
    text = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 80}
    audio = {} if not dry else {"depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2],
                                "patch_embeds_hidden_size": 8, "hidden_size": 64, "patch_size": 4,
                                "patch_stride": [4, 4], "window_size": 8}
    config = ClapConfig(text_config=text, audio_config=audio)
    torch.manual_seed(0)
    ClapModel(config).save_pretrained(folder)
    truncation = "fusion" if config.audio_config.enable_fusion else "rand_trunc"
    ClapFeatureExtractor(truncation=truncation).save_pretrained(folder)
    return folder


def decoder_config(dry: bool, tok, size: str = "7b"):
    from transformers import LlamaConfig

    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": None}
    if size == "1b" and not dry:
        # TinyLlama-1.1B's shape (Llama, grouped-query attention): 1.10 B parameters with this vocab.
        return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, **ids)
    if dry:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, **ids)
    # Llama-2-7B / Vicuna-7B (SLAM-AAC's decoder): 6.74 B parameters.
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, **ids)


def build_decoder_folder(folder: Path, dry: bool, size: str = "7b") -> tuple[Path, object]:
    """Tokenizer (byte-level BPE trained offline) + config.json, no weights."""
    from transformers import PreTrainedTokenizerFast

    from larcq_ray.offline.tiny_tokenizer import train_byte_level_bpe

    folder.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(CORPUS, 500, ["<|endoftext|>", "</s>"]),
                                  eos_token="</s>", pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    config = decoder_config(dry, tok, size)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return folder, config


def qwen2_audio_config(dry: bool, tok, audio_token_id: int, chunk_s: int):
    from transformers import Qwen2AudioConfig

    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if dry:
        audio = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                 "num_mel_bins": 128, "max_source_positions": chunk_s * 50}
        text = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **ids)
    else:
        # Qwen/Qwen2-Audio-7B's text dims (transformers' default Qwen2Config has intermediate 22016, a ~12 B
        # model); the audio tower is transformers' default (Whisper-large-v3's encoder). 8.40 B parameters.
        audio = {}
        text = dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                    max_position_embeddings=8192, rope_theta=10000.0, **ids)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=audio_token_id)
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    return config


def build_qwen2_audio_folder(folder: Path, dry: bool) -> tuple[Path, object]:
    """larcq_ray.offline's tiny Qwen2-Audio folder (tokenizer, processor), its weights replaced by nothing
    and its config by the full-size one (a dry run keeps tiny dims)."""
    from transformers import AutoProcessor

    from larcq_ray.offline.tiny_alm import AUDIO_TOKEN, build_tiny_qwen2_audio

    chunk = 10 if dry else 30  # Whisper's 30 s; a dry run's tiny tower takes 10 s (the window)
    build_tiny_qwen2_audio(folder, CORPUS, chunk_length_s=chunk)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    tok = AutoProcessor.from_pretrained(folder, local_files_only=True).tokenizer
    config = qwen2_audio_config(dry, tok, tok.convert_tokens_to_ids(AUDIO_TOKEN), chunk)
    config.save_pretrained(folder)
    return folder, config


AF3_TOKEN = "<sound>"
_AF3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'audio' %}<sound>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def af3_config(dry: bool, tok, audio_token_id: int, chunk_s: int):
    import transformers

    enc = transformers.AudioFlamingo3EncoderConfig()  # defaults: Whisper-large-v3's encoder, AF3's
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if dry:
        for k, v in {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                     "max_source_positions": chunk_s * 50}.items():
            setattr(enc, k, v)  # the attribute_map names, understood by old and new configs
        text = dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **ids)
    else:
        # AF3's LLM is Qwen2.5-7B: these are its dims (7.6 B); + the 0.64 B encoder and the projector.
        text = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    max_position_embeddings=32768, rope_theta=1000000.0, **ids)
    config = transformers.AudioFlamingo3Config(audio_config=enc.to_dict(), text_config=text,
                                               audio_token_id=audio_token_id)
    config.architectures = ["AudioFlamingo3ForConditionalGeneration"]
    return config


def build_af3_folder(folder: Path, dry: bool) -> tuple[Path, object]:
    """Qwen2 tokenizer (BPE trained offline) with AF3's <sound> token, Whisper features, AF3's processor,
    a ChatML template; config, no weights."""
    import json as _json

    import transformers
    from transformers import Qwen2Tokenizer, WhisperFeatureExtractor

    from larcq_ray.offline.tiny_tokenizer import train_byte_level_bpe

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", AF3_TOKEN]
    bpe = train_byte_level_bpe(CORPUS, 400, specials)
    model_json = _json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    tok = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    bpe.model.save(str(folder))
    chunk = 10 if dry else 30
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=chunk, n_fft=400)
    processor = transformers.AudioFlamingo3Processor(feature_extractor=fe, tokenizer=tok, chat_template=_AF3_TEMPLATE)
    processor.save_pretrained(folder)
    config = af3_config(dry, tok, tok.convert_tokens_to_ids(AF3_TOKEN), chunk)
    config.save_pretrained(folder)
    return folder, config


# -- measuring ----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _noise(n: int, seconds: float, sr: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32) for _ in range(n)]


def _memory(device: str) -> dict:
    import resource

    figs = {"peak_rss_gib": _gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}
    if device == "cuda":
        import torch

        figs["peak_gpu_gib"] = _gib(torch.cuda.max_memory_allocated())
        figs["peak_gpu_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    return figs


def measure(caption_batch, waves: list, device: str, timed_batches: int, gen_stats: list,
            featurize_s: list | None = None) -> dict:
    """One warm-up batch, then `timed_batches` timed ones."""
    t = time.perf_counter()
    captions = caption_batch(waves)
    _sync(device)
    warmup_s = time.perf_counter() - t
    gen_stats.clear()
    if featurize_s is not None:
        featurize_s.clear()
    times = []
    for _ in range(timed_batches):
        t = time.perf_counter()
        captions = caption_batch(waves)
        _sync(device)
        times.append(time.perf_counter() - t)
    total = sum(times)
    audio_s = len(waves) * WINDOW_S * timed_batches
    new_tokens = sum(rows * n for rows, n in gen_stats)
    figs = {
        "audio_s_per_s": round(audio_s / total, 3),
        "windows_per_s": round(len(waves) * timed_batches / total, 3),
        "tokens_per_s": round(new_tokens / total, 2),
        "new_tokens_per_row": sorted({n for _, n in gen_stats}),
        "batch_s": [round(x, 4) for x in times],
        "warmup_batch_s": round(warmup_s, 3),
        "sample_caption": (captions[0] if captions else "")[:80],
    }
    if featurize_s:
        figs["featurize_s_per_batch"] = round(sum(featurize_s) / len(featurize_s), 4)
    return figs


def _settings(dry: bool) -> dict:
    return {"window_s": WINDOW_S, "batch": BATCH, "max_new_tokens": MAX_NEW_TOKENS, "greedy": True,
            "timed_batches": 1 if dry else 3}


def _device_dtype(dry: bool) -> tuple[str, str]:
    return ("cpu", "float32") if dry else ("cuda", "bfloat16")


def _after_load(device: str, t0: float) -> dict:
    _sync(device)
    figs = {"load_s": round(time.perf_counter() - t0, 2)}
    if device == "cuda":
        import torch

        figs["weights_gpu_gib"] = _gib(torch.cuda.memory_allocated())
    return figs


def _project_import_error(module: str) -> str | None:
    """None when larcq_ray's `module` imports, else why not (a missing package named)."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as e:
        name = getattr(e, "name", None) or str(e)
        return f"cannot import {module}: missing python package {name!r}"


# -- sections --------------------------------------------------------------------------------------


def section_env(work: Path, dry: bool, why: str) -> dict:
    import torch

    figs = {
        "python": platform.python_version(), "python_exe": sys.executable,
        "versions": {m: version(m) for m in PACKAGES},
        "missing_packages": missing_packages(),
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(), "mode": "dry-run" if dry else "gpu", "mode_why": why,
        "carried_wheels_site": os.environ.get("DEVICE_CHECK_SITE") or None,
    }
    try:
        import larcq_ray

        figs["larcq_ray_from"] = str(Path(larcq_ray.__file__).parent)
    except ImportError as e:
        figs["larcq_ray_from"] = f"not importable: {e}"
    if _importable("transformers"):
        import transformers

        figs["has_audioflamingo3"] = hasattr(transformers, "AudioFlamingo3ForConditionalGeneration")
        figs["has_qwen2_audio"] = hasattr(transformers, "Qwen2AudioForConditionalGeneration")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figs.update(gpu_name=torch.cuda.get_device_name(0), gpu_capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=_gib(p.total_memory), gpu_count=torch.cuda.device_count(),
                    bf16_supported=bool(torch.cuda.is_bf16_supported()))
        t = time.perf_counter()
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        (a @ a).float().sum().item()
        figs["bf16_matmul_ok"] = True
        figs["cuda_init_s"] = round(time.perf_counter() - t, 3)
    else:
        figs.update(gpu_name=None, bf16_supported=False)
    return figs


def section_prefix_lm_7b(work: Path, dry: bool, why: str) -> dict:
    err = _project_import_error("larcq_ray.caption.prefix_lm")
    if err:
        raise Skip(f"{err}; {WHEELS_HINT}")
    import torch
    from transformers import AutoModelForCausalLM

    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    device, dtype = _device_dtype(dry)
    t = time.perf_counter()
    enc = build_clap_encoder(work / "clap", dry)
    dec, _ = build_decoder_folder(work / "decoder", dry)
    figs = {"build_folders_s": round(time.perf_counter() - t, 2)}
    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(enc), type="clap"), connector=ConnectorSpec(),
                         decoder=DecoderSpec(name_or_path=str(dec), train="frozen"))
    t = time.perf_counter()
    with _weights_from_config(AutoModelForCausalLM, [dec], device, MAX_NEW_TOKENS):
        model = PrefixLm(cfg, device=device, dtype=dtype, local_files_only=True)
    figs.update(_after_load(device, t))
    if not CREATED:
        raise RuntimeError("the decoder was not built from its config (load_decoder no longer calls "
                           "AutoModelForCausalLM.from_pretrained?)")
    m = model.module
    figs.update(params_b=_n_params(m), decoder_params_b=_n_params(m.decoder), encoder_params_b=_n_params(m.encoder),
                connector_params_b=_n_params(m.connector), decoder_attn=m.decoder.config._attn_implementation,
                dtype=str(next(m.decoder.parameters()).dtype), device=str(next(m.decoder.parameters()).device),
                sample_rate=model.sample_rate, encoder_max_s=model.max_seconds)
    if dry:
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(decoder_config(False, model.tokenizer))
        figs["full_size_decoder_params_b"] = _n_params(full)
    gen_stats: list = []
    _count_generated(m.decoder, gen_stats)
    feat_s: list = []

    def caption_batch(waves):  # what PrefixLmBackend.caption does per batch (no CLAP-Refine)
        t0 = time.perf_counter()
        feats = model.featurize(waves)
        feat_s.append(time.perf_counter() - t0)
        return model.generate(feats, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)

    waves = _noise(BATCH, WINDOW_S, model.sample_rate)
    with torch.inference_mode():
        figs["prefix_tokens_per_window"] = int(model.prefix(model.featurize(waves[:1])).shape[1])
    figs.update(measure(caption_batch, waves, device, _settings(dry)["timed_batches"], gen_stats, feat_s))
    figs.update(_memory(device))
    figs["path"] = "larcq_ray.caption.prefix_lm.PrefixLm (featurize + generate, as PrefixLmBackend.caption)"
    return figs


class _DirectAlm:
    """The hf-audio-lm backend's caption path without larcq_ray (used only when larcq_ray's backend cannot
    be imported here, e.g. pydantic missing): processor(text, audio) -> generate -> decode."""

    def __init__(self, folder: Path, device: str, dtype: str):
        import torch
        import transformers
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self._text_first = config.model_type in ("audioflamingo3", "musicflamingo")
        cls = getattr(transformers, config.architectures[0])
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.model = cls.from_pretrained(str(folder), dtype=self.dtype, local_files_only=True).to(self.device).eval()
        tok = self.processor.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def caption(self, waves):
        import torch

        audio, text = {"type": "audio"}, {"type": "text", "text": PROMPT}
        turn = [{"role": "user", "content": [text, audio] if self._text_first else [audio, text]}]
        prompts = self.processor.apply_chat_template([turn] * len(waves), add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=list(prompts), audio=waves, sampling_rate=self.sample_rate, padding=True,
                                return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            gen = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                      pad_token_id=self._pad_id)
        texts = self.processor.tokenizer.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]


def _alm_section(work: Path, dry: bool, build, arch: str, full_config, cost: bool = False) -> dict:
    import transformers

    cls = getattr(transformers, arch)
    device, dtype = _device_dtype(dry)
    t = time.perf_counter()
    folder, _ = build(work / arch, dry)
    figs = {"build_folders_s": round(time.perf_counter() - t, 2)}
    err = _project_import_error("larcq_ray.caption.hf_audio_lm")
    t = time.perf_counter()
    with _weights_from_config(cls, [folder], device, MAX_NEW_TOKENS):
        if err is None:
            from larcq_ray.caption.config import CaptionBackendConfig
            from larcq_ray.caption.hf_audio_lm import HfAudioLmBackend

            backend = HfAudioLmBackend(CaptionBackendConfig(
                kind="hf-audio-lm", model=str(folder), prompt=PROMPT, window_s=WINDOW_S, max_new_tokens=MAX_NEW_TOKENS,
                num_beams=1, do_sample=False, dtype=dtype, device=device, batch_size=BATCH, local_files_only=True))
            figs["path"] = "larcq_ray.caption.hf_audio_lm.HfAudioLmBackend.caption"
        else:
            backend = _DirectAlm(folder, device, dtype)
            figs["path"] = f"direct processor + generate ({err}; {WHEELS_HINT})"
    figs.update(_after_load(device, t))
    if not CREATED:
        raise RuntimeError(f"{arch} was not built from its config (the backend no longer calls from_pretrained?)")
    model = backend.model
    lm = model.get_decoder() if hasattr(model, "get_decoder") else model
    figs.update(params_b=_n_params(model), attn=model.config._attn_implementation,
                dtype=str(next(model.parameters()).dtype), device=str(next(model.parameters()).device),
                sample_rate=backend.sample_rate,
                text_hidden=int(lm.config.hidden_size) if hasattr(lm, "config") else None)
    if dry:
        figs["full_size_params_b"] = meta_params(cls, full_config(backend.processor.tokenizer))
    gen_stats: list = []
    _count_generated(model, gen_stats)
    waves = _noise(BATCH, WINDOW_S, backend.sample_rate)
    probe = backend.processor(text=[f"{getattr(backend.processor, 'audio_token', '')}x"], audio=waves[:1],
                              sampling_rate=backend.sample_rate, return_tensors="pt")
    figs["prompt_tokens_per_window"] = int(probe["input_ids"].shape[1])
    figs.update(measure(backend.caption, waves, device, _settings(dry)["timed_batches"], gen_stats))
    figs.update(_memory(device))
    if cost and err is None:  # seed 004's TTFT / TPOT / peak memory, as `larcq-ray eval-alm` measures them
        figs["cost"] = _cost(backend, "hf-audio-lm", waves[:2])
    return figs


def _cost(backend, kind: str, waves: list) -> dict:
    from larcq_ray.evaluate.alm_cost import measure_cost

    c = measure_cost(backend, kind, waves, **COST_RUNS)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items() if k != "prompt"}


def section_qwen2_audio_7b(work: Path, dry: bool, why: str) -> dict:
    import transformers

    if not hasattr(transformers, "Qwen2AudioForConditionalGeneration"):
        raise Skip(f"transformers {transformers.__version__} has no Qwen2AudioForConditionalGeneration")
    from larcq_ray.offline.tiny_alm import AUDIO_TOKEN

    return _alm_section(work, dry, build_qwen2_audio_folder, "Qwen2AudioForConditionalGeneration",
                        lambda tok: qwen2_audio_config(False, tok, tok.convert_tokens_to_ids(AUDIO_TOKEN), 30),
                        cost=True)


def section_af3_7b(work: Path, dry: bool, why: str) -> dict:
    import transformers

    missing = [n for n in ("AudioFlamingo3ForConditionalGeneration", "AudioFlamingo3Processor",
                           "AudioFlamingo3Config", "AudioFlamingo3EncoderConfig") if not hasattr(transformers, n)]
    if missing:
        raise Skip(f"transformers {transformers.__version__} has no {', '.join(missing)}")
    return _alm_section(work, dry, build_af3_folder, "AudioFlamingo3ForConditionalGeneration",
                        lambda tok: af3_config(False, tok, tok.convert_tokens_to_ids(AF3_TOKEN), 30))


def section_prefix_lm_1b_cost(work: Path, dry: bool, why: str) -> dict:
    """Seed 004's cost table for a prefix-lm with a 1B-class decoder (CLAP audio tower -> linear ->
    a TinyLlama-1.1B-shaped Llama, random weights, bf16): TTFT, TPOT, peak memory, batch 1."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    device, dtype = _device_dtype(dry)
    enc = build_clap_encoder(work / "clap", dry)
    dec, _ = build_decoder_folder(work / "decoder", dry, size="1b")
    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(enc), type="clap"), connector=ConnectorSpec(),
                         decoder=DecoderSpec(name_or_path=str(dec), train="frozen"))
    t = time.perf_counter()
    with _weights_from_config(AutoModelForCausalLM, [dec], device, MAX_NEW_TOKENS):
        model = PrefixLm(cfg, device=device, dtype=dtype, local_files_only=True)
    figs = _after_load(device, t)
    figs.update(decoder_params_b=_n_params(model.module.decoder), dtype=str(next(model.module.parameters()).dtype))
    if dry:
        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(decoder_config(False, model.tokenizer, "1b"))
        figs["full_size_decoder_params_b"] = _n_params(full)
    backend = SimpleNamespace(model=model, sample_rate=model.sample_rate)  # what PrefixLmBackend holds
    figs["cost"] = _cost(backend, "prefix-lm", _noise(2, WINDOW_S, model.sample_rate))
    figs["path"] = "larcq_ray.evaluate.alm_cost.measure_cost on larcq_ray.caption.prefix_lm.PrefixLm"
    return figs


SECTION_FNS = {"env": section_env, "prefix_lm_7b": section_prefix_lm_7b, "qwen2_audio_7b": section_qwen2_audio_7b,
               "af3_7b": section_af3_7b, "prefix_lm_1b_cost": section_prefix_lm_1b_cost}


def run_section(name: str, out: Path, work: Path) -> int:
    t0 = time.perf_counter()
    rec: dict = {"section": name}
    try:
        missing = missing_packages(NEEDS[name])
        if missing:
            raise Skip(f"missing python packages: {', '.join(missing)}"
                       + (f"; {WHEELS_HINT}" if "pydantic" in missing else ""))
        dry, why = dry_run()
        rec["mode"] = "dry-run" if dry else "gpu"
        rec["settings"] = _settings(dry)
        if dry:
            import torch

            torch.manual_seed(0)
            torch.set_num_threads(1)  # tiny ops: more threads only spin (30x slower on a busy 2-core CI box)
        figs = SECTION_FNS[name](work / name, dry, why)
        rec["status"] = "ok"
        rec["figures"] = figs
        if dry and "ray" in sys.modules:
            rec["status"], rec["reason"] = "failed", "ray was imported in a CPU dry run"
        rc = 0 if rec["status"] == "ok" else 1
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
        rc = 0
    except BaseException as e:  # noqa: BLE001 - a section's failure is a result, not a crash
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if type(e).__name__ == "OutOfMemoryError":
            reason = "out of memory: " + reason
        rec.update(status="failed", reason=reason, traceback_tail=tb.strip().splitlines()[-6:])
        rc = 1
    rec["ray_imported"] = "ray" in sys.modules
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    write_line(out, rec)
    return rc


def finish_section(name: str, out: Path, rc: int, cap: float) -> int:
    """After the section's process: a line for a section that wrote none (killed, crashed)."""
    if any(r.get("section") == name for r in read_lines(out)):
        return 0
    if rc in (124, 137):
        reason = f"timed out after {cap:g} s (killed)"
    elif rc < 0 or rc > 128:
        reason = f"the process died (exit {rc}; killed for memory?)"
    else:
        reason = f"the process exited {rc} without a result (see device_check.log)"
    write_line(out, {"section": name, "status": "failed", "reason": reason,
                     "seconds": cap if rc in (124, 137) else None})
    return 0


def skip_section(name: str, out: Path, reason: str) -> int:
    write_line(out, {"section": name, "status": "skipped", "reason": reason})
    return 0


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def report(out: Path) -> int:
    recs = read_lines(out)
    env = next((r for r in recs if r.get("section") == "env" and r.get("figures")), None)
    lines = ["# device check", ""]
    if env:
        f = env["figures"]
        lines.append(f"- machine: {f.get('gpu_name') or 'no GPU'}; mode {f.get('mode')} ({f.get('mode_why')}); "
                     f"bf16 {f.get('bf16_supported')}; torch {f['versions'].get('torch')}, "
                     f"transformers {f['versions'].get('transformers')}, python {f.get('python')}")
        if f.get("missing_packages"):
            lines.append(f"- missing python packages: {', '.join(f['missing_packages'])}")
    lines.append(f"- settings: {WINDOW_S:g} s windows, batch {BATCH}, {MAX_NEW_TOKENS} new tokens (greedy, forced), "
                 "random weights; one warm-up batch, then timed batches")
    lines += ["", ("| section | status | mode | audio s/s | windows/s | tokens/s | params (B) | peak GPU GiB | "
              "load s | section s | note |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_name = {}
    for r in recs:
        by_name[r.get("section")] = r  # the last line of a section wins
    for name in [*SECTIONS, *[n for n in by_name if n not in SECTIONS]]:
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | missing | | | | | | | | | no line written |")
            continue
        f = r.get("figures") or {}
        note = r.get("reason") or ""
        if not note and name == "env":
            note = f"{f.get('gpu_name') or 'cpu'}, bf16 {f.get('bf16_supported')}"
        elif not note:
            note = f.get("path", "").split(" (")[0]
        lines.append("| " + " | ".join([name, r.get("status", "?"), r.get("mode", ""), _fmt(f.get("audio_s_per_s")),
                                        _fmt(f.get("windows_per_s")), _fmt(f.get("tokens_per_s")),
                                        _fmt(f.get("params_b")),
                                        _fmt(f.get("peak_gpu_gib")), _fmt(f.get("load_s")), _fmt(r.get("seconds")),
                                        note.replace("|", "/")[:160]]) + " |")
    costs = [(n, r["figures"]["cost"]) for n, r in by_name.items() if (r.get("figures") or {}).get("cost")]
    if costs:
        lines += ["", f"Cost, seed 004's protocol (batch 1, {COST_RUNS['warmup_runs']} warm-up + "
                      f"{COST_RUNS['timed_runs']} timed runs, medians; larcq_ray.evaluate.alm_cost):", "",
                  "| section | device | dtype | prefill tokens | TTFT ms | TPOT ms | peak memory MiB |",
                  "|---|---|---|---|---|---|---|"]
        for n, c in costs:
            lines.append(f"| {n} | {c.get('device')} | {c.get('dtype')} | {_fmt(c.get('prefill_tokens_mean'))} | "
                         f"{_fmt(c.get('ttft_ms_median'))} | {_fmt(c.get('tpot_ms_median'))} | "
                         f"{_fmt(c.get('peak_memory_mb'))} |")
    text = "\n".join(lines) + "\n"
    (out / MD).write_text(text)
    print(text, flush=True)
    return 1 if any(r.get("status") == "failed" for r in by_name.values()) else 0


def deps() -> int:
    print(f"[device_check] python {platform.python_version()} at {sys.executable}")
    for m in PACKAGES:
        needed_by = [s for s, needs in NEEDS.items() if m in needs] or ["larcq_ray backends"]
        print(f"[device_check]   {m:16s} {version(m) or 'MISSING':14s} (needed by {', '.join(needed_by)})")
    miss = missing_packages()
    if miss:
        print(f"[device_check] MISSING python packages: {', '.join(miss)}"
              + (f" -- {WHEELS_HINT}" if "pydantic" in miss else ""), flush=True)
    spec = importlib.util.find_spec("larcq_ray") if _importable("larcq_ray") else None
    print(f"[device_check] larcq_ray: {Path(spec.origin).parent if spec and spec.origin else 'NOT importable'}",
          flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("section")
    s.add_argument("name", choices=SECTIONS)
    s.add_argument("--out", required=True)
    s.add_argument("--work", required=True)
    f = sub.add_parser("finish")
    f.add_argument("name")
    f.add_argument("--out", required=True)
    f.add_argument("--rc", type=int, required=True)
    f.add_argument("--cap", type=float, required=True)
    k = sub.add_parser("skip")
    k.add_argument("name")
    k.add_argument("--out", required=True)
    k.add_argument("--reason", required=True)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    sub.add_parser("deps")
    a = ap.parse_args(argv)
    if a.cmd == "section":
        return run_section(a.name, Path(a.out), Path(a.work))
    if a.cmd == "finish":
        return finish_section(a.name, Path(a.out), a.rc, a.cap)
    if a.cmd == "skip":
        return skip_section(a.name, Path(a.out), a.reason)
    if a.cmd == "report":
        return report(Path(a.out))
    return deps()


if __name__ == "__main__":
    sys.exit(main())
