"""What a captioner costs to run, by seed 004's protocol: batch 1, `warmup_runs` untimed runs, then
`timed_runs` timed ones, each on one test window.

- TTFT (time to first token): the prefill. From the model's input tensors (feature extraction, a
  CPU step the seed's data loader does, is left out) through the audio encoder, the connector /
  projection and the decoder's forward over the whole input, to the argmax of the first token.
- TPOT (time per output token): one cached decode step: the decoder's forward on that one token
  with the prefill's past_key_values.
- Peak memory: torch.cuda.max_memory_allocated over the runs on a GPU (weights included, as they
  stay allocated); on CPU the peak resident set of the measuring process (`peak_rss_mb`), which
  includes loading the model and everything else the process did: measure in a fresh process
  (eval-alm measures in its own Ray actor; the benchmark in one child process per backend).

Each backend kind is measured on the model objects its caption backend holds:
- hf-audio-lm: the transformers model's forward on the processor's inputs (audio + chat prompt);
- prefix-lm: encoder -> connector -> [prefix][prompt] into the causal LM;
- drcap: CLAP audio embedding -> top-k retrieval -> projection onto the support -> projector ->
  [retrieved captions][prefix][prompt] into the causal LM.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np


def peak_rss_mb() -> tuple[float, str]:
    """(peak resident set of this process in MiB, how it was read).

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory since it
    started. resource.getrusage's ru_maxrss is the fallback (macOS, BSD): on Linux it survives exec,
    so a fresh worker would report its parent's peak if the parent had used more.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "peak RSS of the process (VmHWM)"
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "peak RSS of the process (getrusage ru_maxrss)"


def _cache_kw(model) -> str:
    """The forward's keyword for the KV cache: `cache` from transformers 5.2x on (where
    `past_key_values` is deprecated), `past_key_values` before. A peft wrapper passes it through."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _next_token(logits):
    return logits[:, -1, :].argmax(dim=-1, keepdim=True)


def _grow(mask):
    import torch

    return torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


class _HfAudioLmSteps:
    def __init__(self, backend, prompt: Optional[str]):
        self.b, self.prompt = backend, prompt if prompt is not None else backend.prompt
        self.model = backend.model
        self.device = backend.device
        self.cache_kw = _cache_kw(self.model)

    def prepare(self, wave: np.ndarray) -> dict:
        import torch

        b = self.b
        old, b.prompt = b.prompt, self.prompt
        try:
            text = b._prompts(1)
        finally:
            b.prompt = old
        inputs = b.processor(text=text, audio=[wave], sampling_rate=b.sample_rate, padding=True, return_tensors="pt")
        return {k: (v.to(self.device, b.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def prefill(self, inputs: dict):
        out = self.model(**inputs, use_cache=True)
        return _next_token(out.logits), _cache_of(out), inputs["attention_mask"]

    def decode(self, token, past, mask):
        return self.model(input_ids=token, attention_mask=_grow(mask), use_cache=True, **{self.cache_kw: past}).logits


class _DecoderSteps:
    """The causal-LM half prefix-lm and drcap share: [before][prefix][prompt] -> first token, then one step."""

    def __init__(self, decoder, tokenizer, prompt: str):
        self.decoder, self.tokenizer, self.prompt = decoder, tokenizer, prompt
        self.cache_kw = _cache_kw(decoder)

    def _prefill_from(self, prefix, before: Optional[list[str]] = None):
        from larcq_ray.caption.prefix_decoder import build_inputs

        embeds, mask, pos, _ = build_inputs(self.decoder, self.tokenizer, prefix, self.prompt, before)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        return _next_token(out.logits), _cache_of(out), mask

    def decode(self, token, past, mask):
        return self.decoder(input_ids=token, attention_mask=_grow(mask), use_cache=True, **{self.cache_kw: past}).logits


class _PrefixLmSteps(_DecoderSteps):
    def __init__(self, backend, prompt: Optional[str]):
        self.lm = backend.model
        self.device = self.lm.device
        own = self.lm.cfg.prompt  # the prompt the captioner was trained with
        super().__init__(self.lm.module.decoder, self.lm.tokenizer, prompt if prompt is not None else own)

    def prepare(self, wave: np.ndarray) -> dict:
        return self.lm.featurize([wave])

    def prefill(self, feats: dict):
        return self._prefill_from(self.lm.prefix(feats))


class _DrcapSteps(_DecoderSteps):
    def __init__(self, backend, prompt: Optional[str]):
        self.dc = backend.model
        self.device = self.dc.device
        own = self.dc.cfg.prompt  # the prompt the captioner was trained with
        super().__init__(self.dc.module.decoder, self.dc.tokenizer, prompt if prompt is not None else own)

    def prepare(self, wave: np.ndarray):
        import torch

        f = self.dc.featurizer(np.asarray(wave, dtype=np.float32))
        x = torch.as_tensor(np.asarray(f.input_features)[None]).to(self.device)
        longer = torch.as_tensor(np.array([[f.is_longer]], dtype=bool)).to(self.device)
        return x, longer

    def prefill(self, state):
        import torch

        from larcq_ray.caption.drcap import join_retrieved

        x, longer = state
        a = self.dc.clap.get_audio_features(input_features=x, is_longer=longer)
        a = torch.nn.functional.normalize(getattr(a, "pooler_output", a).float(), dim=-1)
        before = [join_retrieved(r) for r in self.dc.retrieve_for_audio(a)]
        return self._prefill_from(self.dc.prefix(a), before)


_STEPS = {"hf-audio-lm": _HfAudioLmSteps, "prefix-lm": _PrefixLmSteps, "drcap": _DrcapSteps}


def measure_cost(backend: Any, kind: str, waves: list[np.ndarray], *, prompt: Optional[str] = None,
                 warmup_runs: int = 3, timed_runs: int = 10) -> dict:
    """TTFT, TPOT (ms) and peak memory of `backend` (a built caption backend of `kind`) on `waves`
    (mono float32 at its sample rate, each at most its window), batch 1, the waves cycled.
    `prompt`: the instruction to prefill with (None: the backend's own)."""
    import torch

    if kind not in _STEPS:
        raise ValueError(f"no cost measurement for backend kind {kind!r}; known: {list(_STEPS)}")
    if not waves:
        raise ValueError("measure_cost needs at least one waveform")
    if timed_runs < 1 or warmup_runs < 0:
        raise ValueError("timed_runs must be >= 1 and warmup_runs >= 0")
    steps = _STEPS[kind](backend, prompt)
    device = torch.device(steps.device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    states = [steps.prepare(np.asarray(w, dtype=np.float32)) for w in waves]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ttft, tpot, prefill_len = [], [], []
    with torch.inference_mode():
        for i in range(warmup_runs + timed_runs):
            state = states[i % len(states)]
            sync()
            t0 = time.perf_counter()
            token, past, mask = steps.prefill(state)
            sync()
            t1 = time.perf_counter()
            steps.decode(token, past, mask)
            sync()
            t2 = time.perf_counter()
            if i >= warmup_runs:
                ttft.append((t1 - t0) * 1000)
                tpot.append((t2 - t1) * 1000)
                prefill_len.append(int(mask.shape[1]))
    if cuda:
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    else:
        peak, peak_kind = peak_rss_mb()
    return {
        "kind": kind, "device": str(device), "dtype": str(_dtype(backend)).replace("torch.", ""),
        "batch_size": 1, "warmup_runs": warmup_runs, "timed_runs": timed_runs, "n_waves": len(waves),
        "audio_s_mean": float(np.mean([len(w) for w in waves]) / backend.sample_rate),
        "prefill_tokens_mean": float(np.mean(prefill_len)),
        "ttft_ms_mean": statistics.fmean(ttft), "ttft_ms_median": statistics.median(ttft),
        "tpot_ms_mean": statistics.fmean(tpot), "tpot_ms_median": statistics.median(tpot),
        "peak_memory_mb": float(peak), "peak_memory_kind": peak_kind, "prompt": steps.prompt,
    }


def _dtype(backend) -> Any:
    """hf-audio-lm backends hold their dtype; prefix-lm / drcap backends' models do."""
    return getattr(backend, "dtype", None) or getattr(getattr(backend, "model", None), "dtype", "float32")
