"""Re-ranking of shortlisted audios by their captions: bi-encoder, cross-encoder, listwise LMs."""

from larcq_ray.rerank.backends import (
    DEFAULT_MODELS,
    RerankBackend,
    RerankBackendConfig,
    build_backend,
)

__all__ = ["DEFAULT_MODELS", "RerankBackend", "RerankBackendConfig", "build_backend"]
