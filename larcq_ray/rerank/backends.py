"""Re-ranking backends: score a (long query, candidate documents) request, many requests per call.

A Serve replica calls `build_backend(cfg)` once, then `backend.score(batch)` for each batch that
`@serve.batch` collected. Every backend flattens the whole batch into as few model calls as it can.
Heavy imports (torch, sentence-transformers, transformers, vllm) happen inside the builders so that
importing this module stays cheap (the Serve app imports it on the driver too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from larcq_ray.core.devices import resolve_device, resolve_dtype, split_on_oom
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.ray_session import quiet_weight_loading
from larcq_ray.rerank.config import RerankBackendConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

Request = tuple[str, list[str]]


class RerankBackend(Protocol):
    model_name: str

    def score(self, requests: list[Request]) -> list[list[float]]:
        """One list of relevance scores (higher = more relevant) per request, in request order."""
        ...


def _device_dtype(cfg: RerankBackendConfig) -> tuple[str, "torch.dtype"]:
    """The replica's device and torch dtype: the one rule of core/devices.py (auto: bf16 on a GPU)."""
    import torch

    device = resolve_device(cfg.device, "serve.backend.device")
    return device, getattr(torch, resolve_dtype(cfg.dtype, device, "serve.backend.dtype"))


def _in_chunks(fn, items: list, size: int, what: str) -> list:
    """`fn` over `items` in chunks of `size`; a chunk that runs out of GPU memory is split in halves
    and retried (core/devices.py split_on_oom), so one big batch never fails a request."""
    out: list = []
    for i in range(0, len(items), size):
        out.extend(split_on_oom(fn, items[i:i + size], what))
    return out


def _load_error(kind: str, model: str, exc: Exception) -> LarcqError:
    return LarcqError(f"could not load the {kind} rerank model {model!r}: {exc}")


class BiEncoderBackend:
    """Cosine similarity of normalized sentence embeddings: query vs each document."""

    def __init__(self, cfg: RerankBackendConfig) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_name = cfg.model_name()
        self.batch_size = cfg.batch_size
        quiet_weight_loading()  # a Serve replica: its "Loading weights" bar would reach the console
        device, dtype = _device_dtype(cfg)
        try:
            self.model = SentenceTransformer(self.model_name, device=device)
        except (OSError, ValueError) as exc:
            raise _load_error("bi-encoder", self.model_name, exc) from exc
        self.model.to(dtype)

    def score(self, requests: list[Request]) -> list[list[float]]:
        # Encode every distinct text of the batch once: captions repeat across requests.
        texts = list(dict.fromkeys(t for q, docs in requests for t in (q, *docs)))
        if not texts:
            return [[] for _ in requests]
        def encode(chunk: list[str]) -> np.ndarray:
            return np.asarray(self.model.encode(chunk, batch_size=len(chunk), normalize_embeddings=True,
                                                convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

        emb = np.asarray(_in_chunks(encode, texts, self.batch_size, "bi-encoder"), dtype=np.float32)
        row = {t: i for i, t in enumerate(texts)}
        return [
            (emb[[row[d] for d in docs]] @ emb[row[q]]).tolist() if docs else []
            for q, docs in requests
        ]


class CrossEncoderBackend:
    """A sentence-transformers CrossEncoder on every (query, document) pair; raw logits as scores."""

    def __init__(self, cfg: RerankBackendConfig) -> None:
        from sentence_transformers import CrossEncoder

        self.model_name = cfg.model_name()
        self.batch_size = cfg.batch_size
        quiet_weight_loading()  # a Serve replica: its "Loading weights" bar would reach the console
        device, dtype = _device_dtype(cfg)
        try:
            self.model = CrossEncoder(self.model_name, device=device)
        except (OSError, ValueError) as exc:
            raise _load_error("cross-encoder", self.model_name, exc) from exc
        self.model.model.to(dtype)

    def score(self, requests: list[Request]) -> list[list[float]]:
        import torch

        pairs = [(q, d) for q, docs in requests for d in docs]
        if not pairs:
            return [[] for _ in requests]
        # Identity: the logits themselves, whatever activation the model's config names (a sigmoid
        # would squash well-separated logits towards 1 and lose ranking resolution in float16).
        def predict(chunk: list[tuple[str, str]]) -> np.ndarray:
            return np.asarray(self.model.predict(chunk, batch_size=len(chunk), activation_fn=torch.nn.Identity(),
                                                 convert_to_numpy=True, show_progress_bar=False),
                              dtype=np.float32).reshape(len(chunk), -1)[:, 0]

        flat = np.asarray(_in_chunks(predict, pairs, self.batch_size, "cross-encoder"), dtype=np.float32)
        out: list[list[float]] = []
        start = 0
        for _, docs in requests:
            out.append(flat[start:start + len(docs)].tolist())
            start += len(docs)
        return out


class TransformersListwiseBackend:
    """Listwise LM re-ranking with any transformers causal LM (see `listwise.py` for the method).

    Prompts are batched with left padding, so the last position of every row is the real last token;
    position ids are computed from the attention mask so a padded row sees the same positions as it
    would alone.
    """

    def __init__(self, cfg: RerankBackendConfig) -> None:
        import torch

        from larcq_ray.models.causal_lm import has_chat_template, load_causal_lm
        from larcq_ray.rerank import listwise

        self.model_name = cfg.model_name()
        self.batch_size = cfg.batch_size
        self.max_docs = cfg.max_documents_per_prompt
        self.template = listwise.check_template(cfg.prompt_template or listwise.DEFAULT_TEMPLATE)
        # Left padding + pad token are set by the shared loader (larcq_ray/llm.py).
        self.tokenizer, self.model, self.device = load_causal_lm(
            self.model_name, cfg.dtype, cfg.device, what="transformers rerank model",
            setting="serve.backend.device")
        self.labels = listwise.labels_for(self.max_docs, self.tokenizer)
        self.label_ids = torch.tensor(listwise.label_token_ids(self.tokenizer, self.labels))
        self._chat = has_chat_template(self.tokenizer)

    def _render(self, query: str, documents: list[str], labels: list[str]) -> str:
        from larcq_ray.rerank import listwise

        return listwise.render(self.tokenizer,
                               listwise.build_prompt(query, documents, self.template, labels))

    def _label_scores(self, prompts: list[str], n_candidates: list[int]) -> list[np.ndarray]:
        import torch

        from larcq_ray.rerank import listwise

        def label_logits(chunk: list[str]) -> np.ndarray:
            # A chat template already wrote the special tokens; a plain prompt gets the usual ones.
            enc = self.tokenizer(list(chunk), return_tensors="pt", padding=True,
                                 add_special_tokens=not self._chat).to(self.device)
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"], attention_mask=mask,
                                    position_ids=positions, logits_to_keep=1).logits[:, -1, :]
            return logits.float()[:, self.label_ids.to(logits.device)].cpu().numpy()

        at_labels = _in_chunks(label_logits, prompts, self.batch_size, "listwise LM")
        return [listwise.scores_from_logits(row[:n]) for row, n in zip(at_labels, n_candidates)]

    def score(self, requests: list[Request]) -> list[list[float]]:
        from larcq_ray.rerank import listwise

        return listwise.score_requests(requests, self.max_docs, self.labels, self._render,
                                       self._label_scores)


class VllmListwiseBackend:
    """vLLM engine: the same listwise method as `TransformersListwiseBackend`, or a vLLM score model.

    NOT TESTED in this repository: vllm has no CPU wheel here, so only the missing-package error is
    covered. Two modes:
    - generative (default): one generated token per prompt with `allowed_token_ids` = the labels and
      their logprobs requested; the first position's logprobs go through `listwise.score_requests`
      exactly like the transformers backend.
    - pooling / score (`vllm_engine_args` has `runner: "pooling"`; vLLM 0.33 has no `task` argument):
      `LLM.score(query, documents)` for cross-encoder style rerankers (e.g. BAAI/bge-reranker-v2-m3).
    GPU only (device cpu is refused). No out-of-memory split here: vLLM reserves its KV cache up front
    (gpu_memory_utilization) and schedules the prompts of a call within it, so a big call queues
    rather than failing; a CUDA out-of-memory inside vLLM ends the engine, which no retry would mend.
    """

    def __init__(self, cfg: RerankBackendConfig) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise LarcqError("the vllm backend needs the `vllm` package (GPU only): pip install vllm") from exc

        from larcq_ray.rerank import listwise

        self.model_name = cfg.model_name()
        self.max_docs = cfg.max_documents_per_prompt
        if cfg.device == "cpu":
            raise LarcqError("serve.backend.device is 'cpu' but the vllm backend runs on a GPU only; "
                             "use auto or cuda, or another backend kind on CPU")
        resolve_device("cuda", "serve.backend.device")  # no GPU: the clear error, not vLLM's own
        args = dict(cfg.vllm_engine_args)
        self.pooling = args.get("runner") == "pooling"
        if not self.pooling:
            # The engine refuses more logprobs per token than max_logprobs (default 20).
            args.setdefault("max_logprobs", max(20, self.max_docs))
            # V1 returns raw (pre-`allowed_token_ids`) logprobs by default, so a label outside the
            # full-vocabulary top-k would be missing; processed logprobs rank the labels themselves.
            args.setdefault("logprobs_mode", "processed_logprobs")
        # The one dtype rule (auto: bf16 where the GPU has it), for generative and pooling runners;
        # vLLM's own "auto" would take the checkpoint's dtype instead.
        args.setdefault("dtype", resolve_dtype(cfg.dtype, "cuda", "serve.backend.dtype"))
        self.llm = vllm.LLM(model=self.model_name, **args)
        if self.pooling:
            return
        self.template = listwise.check_template(cfg.prompt_template or listwise.DEFAULT_TEMPLATE)
        self.tokenizer = self.llm.get_tokenizer()
        self.labels = listwise.labels_for(self.max_docs, self.tokenizer)
        self.label_ids = listwise.label_token_ids(self.tokenizer, self.labels)
        self.params = vllm.SamplingParams(max_tokens=1, temperature=0.0,
                                          logprobs=max(20, self.max_docs),
                                          allowed_token_ids=self.label_ids)

    def _render(self, query: str, documents: list[str], labels: list[str]) -> str:
        from larcq_ray.rerank import listwise

        return listwise.render(self.tokenizer,
                               listwise.build_prompt(query, documents, self.template, labels))

    def _label_scores(self, prompts: list[str], n_candidates: list[int]) -> list[np.ndarray]:
        from larcq_ray.rerank import listwise

        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        scores = []
        for out, n in zip(outputs, n_candidates):
            first = (out.outputs[0].logprobs or [{}])[0]  # dict[token_id, Logprob] at position 0
            by_token = {tid: float(lp.logprob) for tid, lp in first.items()}
            scores.append(listwise.scores_from_logprobs(by_token, self.label_ids[:n]))
        return scores

    def score(self, requests: list[Request]) -> list[list[float]]:
        from larcq_ray.rerank import listwise

        if self.pooling:
            return [[float(o.outputs.score) for o in self.llm.score(q, docs, use_tqdm=False)]
                    if docs else [] for q, docs in requests]
        return listwise.score_requests(requests, self.max_docs, self.labels, self._render,
                                       self._label_scores)


_BUILDERS: dict[str, type] = {
    "bi-encoder": BiEncoderBackend,
    "cross-encoder": CrossEncoderBackend,
    "transformers": TransformersListwiseBackend,
    "vllm": VllmListwiseBackend,
}


def build_backend(cfg: RerankBackendConfig) -> RerankBackend:
    """Load the configured model (once per Serve replica) and return its backend."""
    return _BUILDERS[cfg.kind](cfg)
