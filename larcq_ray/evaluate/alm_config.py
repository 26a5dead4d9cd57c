"""The `eval_alm` section: how `larcq-ray eval-alm` judges a captioner / audio-language model on a
seed-004 style test list (ASR and audio captioning), for quality and for cost.

The model itself is the `caption.backend` section (kind, model, window_s, device...); this section
holds only what the evaluation adds: which test list and task, the per-task prompt, the actor pool,
how long test items are handled, and the cost protocol.
"""

from __future__ import annotations

from typing import Literal, Optional

import pydantic

# The seed's task names in the test list, by the task names of the command line.
SEED_TASKS = {"asr": "asr", "aac": "audiocaption_v2"}
DEFAULT_PROMPTS = {
    "asr": "Recognize the speech and give me the transcription.",  # SALMONN's ASR instruction
    "aac": "Please describe the audio.",  # SALMONN's audio-captioning instruction
}


class AlmPromptsConfig(pydantic.BaseModel):
    """The instruction per task. hf-audio-lm models are asked it; prefix-lm and drcap captioners
    answer the prompt they were trained with unless `eval_alm.override_trained_prompt` is set."""

    model_config = pydantic.ConfigDict(extra="forbid")

    asr: str = pydantic.Field(DEFAULT_PROMPTS["asr"], min_length=1)
    aac: str = pydantic.Field(DEFAULT_PROMPTS["aac"], min_length=1)


class AlmCostConfig(pydantic.BaseModel):
    """Seed 004's cost protocol: batch 1, `warmup_runs` untimed runs, then `timed_runs` timed ones,
    over the first `items` decodable test items (cycled)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    warmup_runs: int = pydantic.Field(3, ge=0)
    timed_runs: int = pydantic.Field(10, ge=1)
    items: int = pydantic.Field(4, ge=1)
    prompt: Optional[str] = None  # None: the prompt the task is evaluated with


class EvalAlmConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    # Set by `larcq-ray eval-alm --test-list/--task/--out` (or here).
    test_list: Optional[str] = None  # the seed's JSON: {"annotation": [{testset_id, path, task, test?}]}
    task: Optional[Literal["asr", "aac"]] = None  # aac: the list's "audiocaption_v2" entries
    out_dir: Optional[str] = None  # submission.csv, predictions.parquet, eval.json
    # Relative audio paths are read under this folder (None: the test list's folder).
    audio_root: Optional[str] = None
    prompts: AlmPromptsConfig = pydantic.Field(default_factory=AlmPromptsConfig)
    override_trained_prompt: bool = False  # prefix-lm / drcap: ask the task prompt instead of the trained one
    # A test item longer than the backend's window: caption only its first window (what SALMONN's
    # evaluation does with its 30 s Whisper window), or every window and join the texts with spaces.
    long_audio: Literal["first", "join"] = "first"
    num_actors: int = pydantic.Field(1, ge=1)
    num_gpus_per_actor: Optional[float] = None  # None: 1 where the cluster has GPUs, else 0
    batch_size: int = pydantic.Field(4, ge=1)  # test items per inference batch
    cost: AlmCostConfig = pydantic.Field(default_factory=AlmCostConfig)

    def prompt_for(self, task: str) -> str:
        return getattr(self.prompts, task)
