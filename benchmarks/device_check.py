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

# Most wanted first: a budget cut drops the last ones.
SECTIONS = ("env", "clap_htsat", "cross_encoder", "listwise_lm", "qwen2_audio_7b", "af3_7b", "prefix_lm_7b",
            "prefix_lm_1b_cost")
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
            "safetensors": "safetensors", "pydantic": "pydantic", "huggingface_hub": "huggingface-hub",
            "sentence_transformers": "sentence-transformers"}
_MODELS = ["torch", "transformers", "tokenizers", "numpy", "safetensors", "huggingface_hub"]
NEEDS = {
    "env": ["torch"],
    "clap_htsat": _MODELS,
    "cross_encoder": _MODELS + ["pydantic", "sentence_transformers"],  # larcq_ray's rerank backends
    "listwise_lm": _MODELS + ["pydantic"],
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


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def run_mode() -> tuple[str, bool, str]:
    """(device, tiny, why). --cpu / DEVICE_CHECK_CPU=1: CPU; --tiny / DEVICE_CHECK_TINY=1: tiny dims;
    DEVICE_CHECK_DRY_RUN=1 (both, CI's check). No CUDA GPU: CPU and tiny (full size would not fit)."""
    if _flag("DEVICE_CHECK_DRY_RUN"):
        return "cpu", True, "DEVICE_CHECK_DRY_RUN set"
    import torch

    if _flag("DEVICE_CHECK_CPU") or not torch.cuda.is_available():
        why = "--cpu asked" if _flag("DEVICE_CHECK_CPU") else "no CUDA GPU visible to torch"
        return "cpu", True, why  # full-size 7B models on CPU would take hours: always tiny there
    return "cuda", _flag("DEVICE_CHECK_TINY"), "CUDA GPU" + (", --tiny" if _flag("DEVICE_CHECK_TINY") else "")


def dry_run() -> tuple[bool, str]:
    """(tiny, why): kept for the sections' `dry` argument (tiny dims)."""
    _, tiny, why = run_mode()
    return tiny, why


def _mode_name(device: str, tiny: bool) -> str:
    return {("cpu", True): "dry-run", ("cuda", True): "gpu-tiny"}.get((device, tiny), "gpu")


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
        if getattr(model, "generation_config", None) is not None:
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
    device = run_mode()[0]
    return (device, "bfloat16") if device == "cuda" else ("cpu", "float32")


def _after_load(device: str, t0: float) -> dict:
    _sync(device)
    figs = {"load_s": round(time.perf_counter() - t0, 2)}
    if device == "cuda":
        import torch

        figs["weights_gpu_gib"] = _gib(torch.cuda.memory_allocated())
    return figs


def _ray_importable() -> bool:
    """False on the GPU machine (no Ray) and under device_check.sh's blocker (a CPU run proves the
    sections need no Ray)."""
    try:
        importlib.import_module("ray")
    except ImportError:
        return False
    finally:
        sys.modules.pop("ray", None)  # a section must not look as if it imported Ray
    return True


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
        "cpu_count": os.cpu_count(), "mode": _mode_name(run_mode()[0], dry), "mode_why": why,
        "ray_importable": _ray_importable(),
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
    model = m = None  # the closures above hold the names: drop the model itself
    _release()
    figs.update(prefix_lm_match(work, device))
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
    if err is None:
        del backend, model, lm
        _release()
        figs.update(alm_match(work, arch, device))
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


# -- matching the CPU result -----------------------------------------------------------------------
# Each path is also run on a small input through a reduced-size model of the same architecture whose
# random weights are saved once, then loaded by the product's own loader on CPU in float32 (the
# reference), on the device in float32 (logits within FP32_TOL) and on the device in bfloat16 (first-
# token logits / embeddings with cosine >= BF16_COS). In a CPU run the bf16 comparison still runs.

FP32_TOL = 1e-3
BF16_COS = 0.99


def _cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def match_check(load, run, device: str) -> dict:
    """load(device, dtype) -> a loaded path; run(path) -> float array (rows: inputs)."""
    import numpy as np
    import torch

    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    try:
        ref = np.asarray(run(load("cpu", "float32")), np.float64)
        out: dict = {"match_rows": int(len(ref)), "match_ref_abs_max": round(float(np.abs(ref).max()), 4)}
        if device == "cuda":
            got = np.asarray(run(load("cuda", "float32")), np.float64)
            diff = float(np.abs(got - ref).max())
            out.update(fp32_max_abs_diff=diff, fp32_ok=bool(diff <= FP32_TOL))
        got16 = np.asarray(run(load(device, "bfloat16")), np.float64)
        cos = float(_cosines(got16, ref).min())
        out.update(bf16_min_cosine=round(cos, 6), bf16_ok=bool(cos >= BF16_COS), match_device=device)
        out["match_ok"] = bool(out["bf16_ok"] and out.get("fp32_ok", True))
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


def _match_or_error(load, run, device: str) -> dict:
    try:
        return match_check(load, run, device)
    except Exception as e:  # noqa: BLE001 - a failed comparison is a result; the throughput stands
        traceback.print_exc()
        return {"match_ok": False, "match_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def _release() -> None:
    """After the caller dropped its references: collect, and give the GPU its cached blocks back."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- CLAP HTSAT-fused: GPU features + encoder -------------------------------------------------------

CLAP_BATCH = 128  # 10-s chunks per encoder call on the GPU
CLAP_SR = 48000


def clap_config(tiny: bool):
    """laion/clap-htsat-fused's shape (transformers' default ClapAudioConfig is HTSAT; fusion on);
    tiny: the same architecture with small dims."""
    from transformers import ClapConfig

    text = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 80}
    audio = {"enable_fusion": True}
    if tiny:
        audio.update({"depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2], "patch_embeds_hidden_size": 8,
                      "hidden_size": 64, "patch_size": 4, "patch_stride": [4, 4], "window_size": 8})
    config = ClapConfig(text_config=text, audio_config=audio)
    config.architectures = ["ClapModel"]
    return config


def _clap_folder(folder: Path, tiny: bool, weights: bool) -> Path:
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    folder.mkdir(parents=True, exist_ok=True)
    config = clap_config(tiny)
    if weights:
        torch.manual_seed(0)
        ClapModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    ClapFeatureExtractor(truncation="fusion").save_pretrained(folder)
    return folder


def _clap_features(samples, extractor, device):
    from larcq_ray.models.clap_features import clap_features_torch  # the features helper's torch path

    return clap_features_torch(samples, True, seed=0, extractor=extractor, device=device)


def section_clap_htsat(work: Path, dry: bool, why: str) -> dict:
    import numpy as np
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from larcq_ray.models.clap import ClapAudioEncoder

    device, dtype = _device_dtype(dry)
    folder = _clap_folder(work / "clap_full", dry, weights=False)
    t = time.perf_counter()
    with _weights_from_config(ClapModel, [folder], device, 1):
        enc = ClapAudioEncoder(str(folder), device, dtype, local_files_only=True)
    figs = _after_load(device, t)
    audio = enc.model.audio_model
    figs.update(params_b=round(_n_params(enc.model.audio_model) + _n_params(enc.model.audio_projection), 4),
                dtype=str(enc.dtype), device=str(enc.device), fusion=bool(enc.model.config.audio_config.enable_fusion))
    if dry:
        with torch.device("meta"):
            full = ClapModel(clap_config(False))
        figs["full_size_audio_params_b"] = round(_n_params(full.audio_model) + _n_params(full.audio_projection), 4)
    del audio
    extractor = ClapFeatureExtractor.from_pretrained(folder)
    batch = 4 if dry else CLAP_BATCH
    rng = np.random.default_rng(0)
    host = torch.from_numpy((0.1 * rng.standard_normal((batch, int(WINDOW_S * CLAP_SR)))).astype(np.float32))
    try:
        _clap_features(host[:1].to(device), extractor, device)
        figs["features"] = "larcq_ray.models.clap_features.clap_features_torch on the device"
        gpu_features = True
    except ImportError as e:
        figs["features"] = f"precomputed (clap_features not importable: {e})"
        gpu_features = False
    fixed = None if gpu_features else torch.zeros(batch, 4, 1001, 64, device=device)

    def step(samples_host):
        samples = samples_host.to(device, non_blocking=True)
        if gpu_features:
            feats, longer = _clap_features(samples, extractor, device)
        else:
            feats, longer = fixed, torch.zeros(batch, dtype=torch.bool)
        with torch.inference_mode():
            out = enc.model.get_audio_features(input_features=feats.to(enc.dtype),
                                               is_longer=longer.reshape(-1, 1).to(device))
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def timed(fn, reps):
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / reps

    reps = 1 if dry else 5
    per_batch = timed(lambda: step(host), reps)
    figs["chunks_per_s"] = round(batch / per_batch, 1)
    figs["audio_s_per_s"] = round(batch * WINDOW_S / per_batch, 1)
    if gpu_features:
        dev_samples = host.to(device)
        feat_s = timed(lambda: _clap_features(dev_samples, extractor, device), reps)
        figs["features_ms_per_chunk"] = round(1000 * feat_s / batch, 4)
        feats, longer = _clap_features(dev_samples, extractor, device)
        feats = feats.to(enc.dtype)
        longer = longer.reshape(-1, 1)

        def encode_only():
            with torch.inference_mode():
                enc.model.get_audio_features(input_features=feats, is_longer=longer)

        figs["encoder_only_chunks_per_s"] = round(batch / timed(encode_only, reps), 1)
    figs["batch"] = batch
    figs.update(_memory(device))
    figs["path"] = "larcq_ray.models.clap.ClapAudioEncoder's model, features from larcq_ray.models.clap_features"
    enc = None  # the closures above hold the name: drop the model itself
    _release()

    small = _clap_folder(work / "clap_small", True, weights=True)
    waves = torch.from_numpy((0.1 * rng.standard_normal((2, int(WINDOW_S * CLAP_SR)))).astype(np.float32))

    def load(dev, dt):
        return ClapAudioEncoder(str(small), dev, dt, local_files_only=True)

    def run(e):
        feats, longer = _clap_features(waves.to(e.device), extractor, str(e.device)) if gpu_features else \
            (torch.zeros(2, 4, 1001, 64), torch.zeros(2, dtype=torch.bool))
        return e(feats, longer.cpu().numpy())

    figs.update(_match_or_error(load, run, device))
    return figs


# -- re-rankers -------------------------------------------------------------------------------------

RERANK_REQUESTS = 32  # queries per timed call
RERANK_DOCS = 50  # candidates per query


def _bert_tokenizer_folder(folder: Path):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in CORPUS for w in t.split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    return tok


def cross_encoder_config(tiny: bool):
    """cross-encoder/ms-marco-MiniLM-L-6-v2's shape (the default cross-encoder); tiny: small dims."""
    from transformers import BertConfig

    if tiny:
        return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=512, num_labels=1)
    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, num_labels=1)


def _cross_encoder_folder(folder: Path, tiny: bool) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    _bert_tokenizer_folder(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(cross_encoder_config(tiny)).save_pretrained(folder)  # 23 M params: quick
    return folder


def _requests(n: int, docs: int) -> list:
    return [(CORPUS[i % len(CORPUS)], [CORPUS[(i + j) % len(CORPUS)] for j in range(docs)]) for i in range(n)]


def _rerank_cfg(kind: str, model: Path, device: str, dtype: str, **kw):
    from larcq_ray.rerank.config import RerankBackendConfig

    return RerankBackendConfig(kind=kind, model=str(model), device=device, dtype=dtype, **kw)


def _time_scores(backend, requests, device: str, reps: int) -> float:
    backend.score(requests)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        backend.score(requests)
    _sync(device)
    return (time.perf_counter() - t0) / reps


def section_cross_encoder(work: Path, dry: bool, why: str) -> dict:
    import numpy as np

    from larcq_ray.rerank.backends import build_backend

    device, dtype = _device_dtype(dry)
    folder = _cross_encoder_folder(work / "ce_full", dry)
    t = time.perf_counter()
    backend = build_backend(_rerank_cfg("cross-encoder", folder, device, dtype, batch_size=256))
    figs = _after_load(device, t)
    figs.update(params_b=_n_params(backend.model.model), dtype=str(next(backend.model.model.parameters()).dtype))
    n_req, n_docs = (4, 8) if dry else (RERANK_REQUESTS, RERANK_DOCS)
    requests = _requests(n_req, n_docs)
    per_call = _time_scores(backend, requests, device, 1 if dry else 5)
    figs.update(pairs_per_s=round(n_req * n_docs / per_call, 1), requests=n_req, docs_per_request=n_docs,
                batch_size=256)
    figs.update(_memory(device))
    figs["path"] = "larcq_ray.rerank.backends.CrossEncoderBackend.score"
    del backend
    _release()
    small = _cross_encoder_folder(work / "ce_small", True)
    reqs = _requests(2, 6)

    def load(dev, dt):
        return build_backend(_rerank_cfg("cross-encoder", small, dev, dt))

    figs.update(_match_or_error(load, lambda b: np.asarray(b.score(reqs), np.float64), device))
    return figs


def listwise_config(tiny: bool, tok):
    """Qwen2.5-7B-Instruct's shape (a 7B-class listwise LM); tiny: small dims."""
    from transformers import Qwen2Config

    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": None}
    if tiny:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **ids)
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1000000.0, **ids)


def _listwise_folder(folder: Path, tiny: bool, weights: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    _, _ = build_decoder_folder(folder, True)  # tokenizer (+ a tiny Llama config, replaced below)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    config = listwise_config(tiny, tok)
    config.architectures = ["Qwen2ForCausalLM"]
    if weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def _last_logits(backend, prompts: list) -> "object":
    import torch

    enc = backend.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(backend.device)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = backend.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               position_ids=positions, logits_to_keep=1).logits[:, -1, :]
    return logits.float().cpu().numpy()


def section_listwise_lm(work: Path, dry: bool, why: str) -> dict:
    from transformers import AutoModelForCausalLM

    from larcq_ray.rerank.backends import build_backend

    device, dtype = _device_dtype(dry)
    folder = _listwise_folder(work / "lw_full", dry, weights=dry)
    t = time.perf_counter()
    max_docs = 20
    with _weights_from_config(AutoModelForCausalLM, [] if dry else [folder], device, 1):
        backend = build_backend(_rerank_cfg("transformers", folder, device, dtype, batch_size=16,
                                            max_documents_per_prompt=max_docs))
    figs = _after_load(device, t)
    figs.update(params_b=_n_params(backend.model), dtype=str(next(backend.model.parameters()).dtype))
    if dry:
        import torch

        with torch.device("meta"):
            full = AutoModelForCausalLM.from_config(listwise_config(False, backend.tokenizer))
        figs["full_size_params_b"] = _n_params(full)
    n_req, n_docs = (2, 8) if dry else (16, RERANK_DOCS)
    requests = _requests(n_req, n_docs)
    per_call = _time_scores(backend, requests, device, 1 if dry else 3)
    figs.update(candidates_per_s=round(n_req * n_docs / per_call, 1), requests=n_req, docs_per_request=n_docs,
                max_documents_per_prompt=max_docs, batch_size=16,
                prompt_tokens=int(len(backend.tokenizer(backend._render(*requests[0][:1], requests[0][1][:max_docs],
                                                                         backend.labels[:max_docs]))["input_ids"])))
    figs.update(_memory(device))
    figs["path"] = "larcq_ray.rerank.backends.TransformersListwiseBackend.score"
    del backend
    _release()
    small = _listwise_folder(work / "lw_small", True, weights=True)
    prompts = [CORPUS[0] + "\n1. " + CORPUS[1] + "\n2. " + CORPUS[2] + "\n", CORPUS[3] + "\n"]

    def load(dev, dt):
        return build_backend(_rerank_cfg("transformers", small, dev, dt, max_documents_per_prompt=4))

    figs.update(_match_or_error(load, lambda b: _last_logits(b, prompts), device))
    return figs


# -- CPU match for the captioners (first-token logits) -------------------------------------------------


def _alm_small_folder(work: Path, arch: str) -> Path:
    """A reduced-size model of `arch` with saved random weights (tokenizer and processor as the section's)."""
    import torch
    import transformers

    folder = work / f"{arch}_small"
    if arch == "Qwen2AudioForConditionalGeneration":
        from larcq_ray.offline.tiny_alm import build_tiny_qwen2_audio

        return build_tiny_qwen2_audio(folder, CORPUS, seed=0, chunk_length_s=10)
    folder, config = build_af3_folder(folder, True)
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(folder)
    return folder


def _alm_first_logits(backend, waves) -> "object":
    import torch

    inputs = backend.processor(text=backend._prompts(len(waves)), audio=waves, sampling_rate=backend.sample_rate,
                               padding=True, return_tensors="pt")
    inputs = {k: (v.to(backend.device, backend.dtype) if v.is_floating_point() else v.to(backend.device))
              for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode():
        return backend.model(**inputs).logits[:, -1, :].float().cpu().numpy()


def alm_match(work: Path, arch: str, device: str) -> dict:
    from larcq_ray.caption.config import CaptionBackendConfig
    from larcq_ray.caption.hf_audio_lm import HfAudioLmBackend

    folder = _alm_small_folder(work, arch)

    def load(dev, dt):
        return HfAudioLmBackend(CaptionBackendConfig(kind="hf-audio-lm", model=str(folder), prompt=PROMPT,
                                                     window_s=WINDOW_S, dtype=dt, device=dev, local_files_only=True))

    waves = None

    def run(backend):
        nonlocal waves
        waves = waves or _noise(2, WINDOW_S, backend.sample_rate)
        return _alm_first_logits(backend, waves)

    return _match_or_error(load, run, device)


def prefix_lm_match(work: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from larcq_ray.caption.connectors import ConnectorSpec
    from larcq_ray.caption.prefix_decoder import DecoderSpec, build_inputs
    from larcq_ray.caption.prefix_lm import EncoderSpec, PrefixLm, PrefixLmConfig

    enc = build_clap_encoder(work / "plm_small_clap", True)
    dec, config = build_decoder_folder(work / "plm_small_decoder", True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dec)
    cfg = PrefixLmConfig(encoder=EncoderSpec(name_or_path=str(enc), type="clap"), connector=ConnectorSpec(),
                         decoder=DecoderSpec(name_or_path=str(dec), train="frozen"))
    folder = PrefixLm(cfg, local_files_only=True).save(work / "plm_small")

    def load(dev, dt):
        return PrefixLm.load(folder, device=dev, dtype=dt, local_files_only=True)

    def run(model):
        feats = model.featurize(_noise(2, WINDOW_S, model.sample_rate))
        with torch.inference_mode():
            embeds, mask, pos, _ = build_inputs(model.module.decoder, model.tokenizer, model.prefix(feats),
                                                model.cfg.prompt)
            out = model.module.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
        return out.logits[:, -1, :].float().cpu().numpy()

    return _match_or_error(load, run, device)


SECTION_FNS = {"env": section_env, "prefix_lm_7b": section_prefix_lm_7b, "qwen2_audio_7b": section_qwen2_audio_7b,
               "af3_7b": section_af3_7b, "prefix_lm_1b_cost": section_prefix_lm_1b_cost,
               "clap_htsat": section_clap_htsat, "cross_encoder": section_cross_encoder,
               "listwise_lm": section_listwise_lm}


def run_section(name: str, out: Path, work: Path) -> int:
    t0 = time.perf_counter()
    rec: dict = {"section": name}
    CREATED.clear()  # several sections may share one process (a CPU dry run)
    try:
        missing = missing_packages(NEEDS[name])
        if missing:
            raise Skip(f"missing python packages: {', '.join(missing)}"
                       + (f"; {WHEELS_HINT}" if "pydantic" in missing else ""))
        device, dry, why = run_mode()
        rec["mode"] = _mode_name(device, dry)
        rec["settings"] = _settings(dry)
        import torch

        torch.manual_seed(0)
        if device == "cpu" and dry:
            torch.set_num_threads(1)  # tiny ops: more threads only spin (30x slower on a busy 2-core CI box)
        figs = SECTION_FNS[name](work / name, dry, why)
        rec["status"] = "ok"
        rec["figures"] = figs
        if "ray" in sys.modules:  # the GPU machine has no Ray: no section may need it
            rec["status"], rec["reason"] = "failed", "ray was imported (the GPU machine has no Ray)"
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


def _throughput(f: dict) -> str:
    for key, unit in (("chunks_per_s", "10-s chunks/s"), ("pairs_per_s", "pairs/s"),
                      ("candidates_per_s", "candidates/s"), ("windows_per_s", "windows/s")):
        if f.get(key) is not None:
            return f"{_fmt(f[key])} {unit}"
    return ""


def _match_cell(f: dict) -> str:
    if "match_ok" not in f:
        return ""
    if f.get("match_error"):
        return "error: " + f["match_error"][:60].replace("|", "/")
    parts = []
    if "fp32_max_abs_diff" in f:
        parts.append(f"fp32 diff {f['fp32_max_abs_diff']:.1e}")
    if "bf16_min_cosine" in f:
        parts.append(f"bf16 cos {f['bf16_min_cosine']:.4f}")
    return ("ok: " if f["match_ok"] else "NO: ") + ", ".join(parts)


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
    lines.append(f"- CPU match: a small input through a reduced-size model of the same architecture, CPU fp32 vs "
                 f"the device in fp32 (max abs diff <= {FP32_TOL:g}) and in bf16 (min cosine >= {BF16_COS:g})")
    lines += ["", ("| section | status | mode | throughput | audio s/s | tokens/s | params (B) | peak GPU GiB | "
              "load s | section s | CPU match | note |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_name = {}
    for r in recs:
        by_name[r.get("section")] = r  # the last line of a section wins
    for name in [*SECTIONS, *[n for n in by_name if n not in SECTIONS]]:
        r = by_name.get(name)
        if r is None:
            lines.append(f"| {name} | missing | | | | | | | | | | no line written |")
            continue
        f = r.get("figures") or {}
        note = r.get("reason") or ""
        if not note and name == "env":
            note = f"{f.get('gpu_name') or 'cpu'}, bf16 {f.get('bf16_supported')}"
        elif not note:
            note = f.get("path", "").split(" (")[0]
        lines.append("| " + " | ".join([name, r.get("status", "?"), r.get("mode", ""), _throughput(f),
                                        _fmt(f.get("audio_s_per_s")), _fmt(f.get("tokens_per_s")),
                                        _fmt(f.get("params_b")),
                                        _fmt(f.get("peak_gpu_gib")), _fmt(f.get("load_s")), _fmt(r.get("seconds")),
                                        _match_cell(f), note.replace("|", "/")[:160]]) + " |")
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
    m = sub.add_parser("sections", help="several sections in one process (the CPU dry run: one import of torch)")
    m.add_argument("names", nargs="+", choices=SECTIONS)
    m.add_argument("--out", required=True)
    m.add_argument("--work", required=True)
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
    if a.cmd == "sections":
        rcs = [run_section(n, Path(a.out), Path(a.work)) for n in a.names]
        return max(rcs)
    if a.cmd == "finish":
        return finish_section(a.name, Path(a.out), a.rc, a.cap)
    if a.cmd == "skip":
        return skip_section(a.name, Path(a.out), a.reason)
    if a.cmd == "report":
        return report(Path(a.out))
    return deps()


if __name__ == "__main__":
    sys.exit(main())
