"""larcq_ray: long-audio retrieval with long, multi-event text queries (LARCQ) on Ray."""

__version__ = "0.1.0"
