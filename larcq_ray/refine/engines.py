"""Generation backends for `refine`, behind one interface: `generate(prompts) -> list[str]`.

`prompts` are the filled user prompts (prompts.py); an engine renders them for its model (chat
template when there is one, see `larcq_ray.models.causal_lm.render_chat`), generates, and returns the raw
completions (no cleaning: that is cleaning.py's job), one per prompt, in order.

- `transformers` (`TransformersEngine`): any causal LM, CPU or GPU, runs inside the Ray Data actor.
- `vllm` (`build_vllm_processor`): a `ray.data.llm` processor stage for GPU clusters (see there).
- `engine_factory` (config hook): any object with `generate`, e.g. a deterministic fake in tests.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any, Callable, Protocol

from larcq_ray.core.errors import LarcqError

if TYPE_CHECKING:  # pragma: no cover
    from larcq_ray.refine.config import RefineConfig


class RefineEngine(Protocol):
    def generate(self, prompts: list[str]) -> list[str]:
        """One raw completion per prompt, in prompt order."""
        ...


class TransformersEngine:
    """AutoModelForCausalLM + AutoTokenizer (shared loader: `larcq_ray.models.causal_lm.load_causal_lm`).

    Batched with left padding (all rows of a batch end at the same position, so generation
    continues every row from its real last token). Greedy when temperature == 0, else sampled with
    `torch.manual_seed(seed)` at each call: sampled outputs then depend on how rows are batched.
    """

    def __init__(self, cfg: "RefineConfig") -> None:
        from larcq_ray.models.causal_lm import has_chat_template, load_causal_lm

        self.cfg = cfg
        self.model_name = cfg.model
        self.tokenizer, self.model, self.device = load_causal_lm(
            cfg.model, cfg.dtype, cfg.device, what="refine model", setting="refine.device")
        self._chat = has_chat_template(self.tokenizer)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        self._eos = eos if eos is not None else self.tokenizer.eos_token_id

    def render(self, prompt: str) -> str:
        from larcq_ray.models.causal_lm import render_chat

        return render_chat(self.tokenizer, prompt)

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        sample = self.cfg.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=self.cfg.max_new_tokens, do_sample=sample,
                                      pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._eos)
        if sample:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
            torch.manual_seed(self.cfg.seed)
        else:  # silence "temperature is set but do_sample=False" from the model's generation config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        for i in range(0, len(prompts), self.cfg.batch_size):
            texts = [self.render(p) for p in prompts[i:i + self.cfg.batch_size]]
            # A chat template already wrote the special tokens; a plain prompt gets the usual ones.
            enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                                 add_special_tokens=not self._chat).to(self.device)
            with torch.inference_mode():
                ids = self.model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            out.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out


def _resolve_factory(factory: Any) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, _, attr = str(factory).partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise LarcqError(f"refine.engine_factory {factory!r} cannot be imported: {exc}") from exc
    if not callable(obj):
        raise LarcqError(f"refine.engine_factory {factory!r} is not callable")
    return obj


def build_engine(cfg: "RefineConfig") -> RefineEngine:
    """The engine that runs inside a Ray Data actor (transformers, or the factory hook)."""
    if cfg.engine_factory is not None:
        engine = _resolve_factory(cfg.engine_factory)(cfg)
        if not callable(getattr(engine, "generate", None)):
            raise LarcqError(f"refine.engine_factory {cfg.engine_factory!r} returned an object "
                             "without generate(prompts)")
        return engine
    if cfg.engine == "transformers":
        return TransformersEngine(cfg)
    raise LarcqError(f"refine engine {cfg.engine!r} does not run inside an actor; "
                     "the pipeline builds it with build_vllm_processor")


# --- vLLM through ray.data.llm ------------------------------------------------------------------

def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise LarcqError("refine engine 'vllm' needs the `vllm` package (GPU clusters only): "
                         "pip install vllm (or ray[llm]) on the driver and the GPU workers")


def build_vllm_processor(cfg: "RefineConfig") -> Any:
    """A `ray.data.llm` processor (Ray 2.60 API: `vLLMEngineProcessorConfig` + `build_processor`).

    NOT RUN in this repository (vllm has no CPU wheel here): only the missing-package error is
    tested. Input rows need a `prompt` column (the filled user prompt); the processor's chat
    template stage applies the model's chat template to one user turn, as `render_chat` does for
    the transformers engine, and adds `generated_text`. Every input column is carried through; no
    postprocess, so rows that fail inference keep the same schema, with `__inference_error__` set
    (`should_continue_on_error=True`): the pipeline keeps the raw query for those rows.
    """
    require_vllm()
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    sampling: dict[str, Any] = dict(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    if cfg.temperature > 0:
        sampling.update(top_p=cfg.top_p, seed=cfg.seed)
    engine_kwargs = {"dtype": cfg.dtype, **cfg.vllm_engine_kwargs}
    config = vLLMEngineProcessorConfig(
        model_source=cfg.model,
        engine_kwargs=engine_kwargs,
        batch_size=cfg.batch_size,
        concurrency=cfg.vllm_concurrency,
        should_continue_on_error=True,
    )

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return dict(row, messages=[{"role": "user", "content": row["prompt"]}],
                    sampling_params=dict(sampling))

    return build_processor(config, preprocess=preprocess)
