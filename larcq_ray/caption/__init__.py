"""Captioning: audio-language models describe every window of each audio (captions.parquet)."""

from larcq_ray.caption.backends import CaptionBackend, CaptionBackendConfig, build_caption_backend
from larcq_ray.caption.windows import caption_windows, timeline_caption

__all__ = ["CaptionBackend", "CaptionBackendConfig", "build_caption_backend", "caption_windows",
           "timeline_caption", "run_caption", "unique_audio_ids_from_shortlist", "CaptionSummary"]


def __getattr__(name: str):  # the Ray job pulls in pyarrow/ray; import it only when asked for
    if name in ("run_caption", "unique_audio_ids_from_shortlist", "CaptionSummary"):
        from larcq_ray.caption import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
