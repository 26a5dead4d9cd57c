"""Benchmark synthesis: long audios and long queries from a captioned clip dataset (see pipeline.py)."""

from larcq_ray.synthesis.config import SynthesizeConfig

__all__ = ["SynthesizeConfig"]
