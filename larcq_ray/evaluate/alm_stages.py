"""eval-alm's Ray Data stages (the stage contract of core/stage.py).

1. `AlmDecodeStage` (CPU tasks): one row per test item: its audio decoded to the captioner's rate
   and cut to what will be captioned (the first window, or the whole file for `long_audio: join`),
   or a failed row saying why (missing, unreadable, ...).
2. `AlmInferStage` (actor pool, one model per actor): the item's window(s) -> text with the task
   prompt; with `join`, every window is captioned and the texts joined with spaces.
3. `AlmCostStage` (one actor, run after inference so nothing else competes for the cores or the
   GPU): seed 004's cost protocol on a few decodable items (evaluate/alm_cost.py), one row of figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from larcq_ray.core.stage import Batch, Resources

# Only digital silence fails to decode: a test item is captioned however quiet it is.
_NO_SILENCE_CHECK_DB = float("-inf")


def _columns(rows: list[dict]) -> Batch:
    return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], (str, bytes)) else None)
            for k in rows[0]}


def _decode_first_or_all(path: str, sample_rate: int, window_s: float, whole: bool) -> tuple[Optional[np.ndarray], str]:
    from larcq_ray.core.audio import decode_audio

    dec = decode_audio(path, sample_rate, _NO_SILENCE_CHECK_DB)
    if dec.status != "ok":
        return None, dec.error
    x = dec.samples
    return (x if whole else x[:max(1, int(round(window_s * sample_rate)))]), ""


def _build_backend(backend: dict, prompt: Optional[str]):
    """The caption backend; `prompt` replaces a prefix-lm / drcap captioner's trained prompt."""
    from larcq_ray.caption.backends import build_caption_backend
    from larcq_ray.caption.config import CaptionBackendConfig

    b = build_caption_backend(CaptionBackendConfig(**backend))
    if prompt is not None and backend.get("kind") in ("prefix-lm", "drcap"):
        b.model.cfg = b.model.cfg.model_copy(update={"prompt": prompt})
        b.prompt = prompt
    return b


@dataclass
class AlmDecodeStage:
    sample_rate: int
    window_s: float
    long_audio: str  # "first" | "join"
    memory_mb: int = 256
    name: str = "decode"

    def resources(self) -> Resources:
        return Resources(cpus=1, memory_mb=self.memory_mb)

    def setup(self) -> None:
        pass

    def process_batch(self, batch: Batch) -> Batch:
        rows = []
        for key, path in zip(batch["key"], batch["path"]):
            try:
                x, err = _decode_first_or_all(str(path), self.sample_rate, self.window_s, self.long_audio == "join")
            except Exception as e:  # noqa: BLE001 - an odd file costs one item, never the run
                x, err = None, f"internal: {type(e).__name__}: {e}"[:300]
            rows.append({"key": str(key), "samples": b"" if x is None else x.tobytes(),
                         "status": "ok" if x is not None else "failed", "error": err})
        return _columns(rows)

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return _columns([{"key": str(k), "samples": b"", "status": "failed", "error": reason} for k in batch["key"]])


@dataclass
class AlmInferStage:
    backend: dict  # CaptionBackendConfig fields (its prompt: the task prompt for hf-audio-lm)
    prompt_override: Optional[str]  # prefix-lm / drcap: the task prompt instead of the trained one
    long_audio: str
    actors: int
    cpus: float
    gpus: Union[float, str]
    torch_threads: Optional[int] = None
    name: str = "eval_alm"
    _backend: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, actors=self.actors, torch_threads=self.torch_threads)

    def setup(self) -> None:
        self._backend = _build_backend(self.backend, self.prompt_override)

    def _windows(self, x: np.ndarray) -> list[np.ndarray]:
        from larcq_ray.caption.windows import caption_windows

        b = self._backend
        if self.long_audio != "join":
            return [x]
        return [x[s:e] for s, e in caption_windows(len(x), b.sample_rate, b.window_s)] or [x]

    def process_batch(self, batch: Batch) -> Batch:
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        texts = np.empty(len(status), dtype=object)
        texts[:] = ""
        ok = np.flatnonzero(status == "ok")
        per_item = {int(i): self._windows(np.frombuffer(batch["samples"][i], dtype=np.float32)) for i in ok}
        flat = [w for i in ok for w in per_item[int(i)]]
        if flat:
            out = iter(self._backend.caption(flat))
            for i in ok:
                parts = [next(out).strip() for _ in per_item[int(i)]]
                texts[i] = " ".join(p for p in parts if p)
                if not texts[i]:
                    status[i], error[i] = "failed", "generate: the model generated no text"
        return {"key": batch["key"], "prediction": texts, "status": status, "error": error}

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        was_ok = status == "ok"  # rows that failed earlier keep their own reason
        status[was_ok], error[was_ok] = "failed", reason
        texts = np.empty(len(status), dtype=object)
        texts[:] = ""
        return {"key": batch["key"], "prediction": texts, "status": status, "error": error}


@dataclass
class AlmCostStage:
    backend: dict
    prompt_override: Optional[str]
    cost_prompt: Optional[str]  # None: the backend's (task) prompt
    warmup_runs: int
    timed_runs: int
    gpus: Union[float, str]
    cpus: float = 1.0
    torch_threads: Optional[int] = None
    name: str = "alm_cost"
    _backend: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, actors=1, torch_threads=self.torch_threads)

    def setup(self) -> None:
        self._backend = _build_backend(self.backend, self.prompt_override)

    def process_batch(self, batch: Batch) -> Batch:
        from larcq_ray.evaluate.alm_cost import measure_cost

        b = self._backend
        waves, errors = [], []
        for path in batch["path"]:
            x, err = _decode_first_or_all(str(path), b.sample_rate, b.window_s, whole=False)
            if x is not None:
                waves.append(x)
            else:
                errors.append(err)
        if not waves:
            return {"cost": np.asarray([""], dtype=object), "error": np.asarray(
                [f"cost: no item decoded ({errors[0] if errors else 'none given'})"], dtype=object)}
        figures = measure_cost(b, self.backend["kind"], waves, prompt=self.cost_prompt,
                               warmup_runs=self.warmup_runs, timed_runs=self.timed_runs)
        return {"cost": np.asarray([json.dumps(figures)], dtype=object), "error": np.asarray([""], dtype=object)}

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return {"cost": np.asarray([""], dtype=object), "error": np.asarray([reason], dtype=object)}
