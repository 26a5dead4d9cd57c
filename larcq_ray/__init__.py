"""larcq_ray: long-audio retrieval with long, multi-event text queries (LARCQ) on Ray.

The folders are the pipeline's stages, data flowing one way:
synthesize -> refine -> index -> search -> caption -> rerank -> evaluate (and train, for CLAP).
`core/` and `models/` hold what the stages share; `offline/` the demo kit, which product code never
imports. `artifacts.py` names every file a stage leaves in the run directory; `pipeline.py` runs
the stages; `cli.py` is a thin command line over both.
"""

__version__ = "0.1.0"
