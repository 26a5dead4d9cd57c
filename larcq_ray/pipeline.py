"""The pipeline: which stage runs what, in which order, and where its run directory lives.

Each stage package has a `job.run(cfg)`, the one entry the CLI, `jobs/` and the demo call. A remote
run_dir (s3://...) is staged around the commands that write it: its files are pulled to a local
scratch folder, the stages work there, and what changed is uploaded, also when a stage fails.
"""

from __future__ import annotations

import logging

from larcq_ray import artifacts
from larcq_ray.config import ALL_STAGES, PipelineConfig, dump_config
from larcq_ray.core.errors import LarcqError

log = logging.getLogger(__name__)


def _synthesize(cfg: PipelineConfig):
    from larcq_ray.synthesize import job

    return job.run(cfg)


def _refine(cfg: PipelineConfig):
    from larcq_ray.refine import job

    return job.run(cfg)


def _index(cfg: PipelineConfig):
    from larcq_ray.index import job

    return job.run(cfg)


def _search(cfg: PipelineConfig):
    from larcq_ray.search import job

    return job.run(cfg)


def _caption(cfg: PipelineConfig):
    from larcq_ray.caption import job

    return job.run(cfg)


def _rerank(cfg: PipelineConfig):
    from larcq_ray.rerank import job

    return job.run(cfg)


def _evaluate(cfg: PipelineConfig):
    from larcq_ray.evaluate import job

    if artifacts.SEARCH_META.exists(cfg.run_dir) and artifacts.SEARCH_META.read(cfg.run_dir).get(
            "has_ground_truth") is False:
        # A user's own queries: nothing to measure; the answers are in results.md.
        log.warning("evaluate: skipped, the queries searched in %s have no ground truth (audio_id); "
                    "their answers are in %s", cfg.run_dir, artifacts.RESULTS_MD)
        return None
    return job.run(cfg)


# The stage registry, in pipeline order (config.ALL_STAGES names them for validation).
STAGE_RUNNERS = {"synthesize": _synthesize, "refine": _refine, "index": _index, "search": _search,
                 "caption": _caption, "rerank": _rerank, "evaluate": _evaluate}
assert tuple(STAGE_RUNNERS) == ALL_STAGES


def run_stages(cfg: PipelineConfig) -> None:
    """The config's `stages`, always in pipeline order. After `refine`, later stages search the
    refined queries (unless data.queries_csv names other ones)."""
    for stage in [s for s in ALL_STAGES if s in cfg.stages]:
        result = STAGE_RUNNERS[stage](cfg)
        if stage == "refine" and not cfg.data.queries_csv:
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"queries_csv": result})})


def run_benchmark(cfg: PipelineConfig) -> None:
    """Every stage: synthesize -> refine (when refine.mode is set) -> index -> ... -> evaluate."""
    if not cfg.data.benchmark:
        raise LarcqError("the benchmark run needs data.benchmark (set it to synthesize.out_dir)")
    stages = [s for s in ALL_STAGES if s != "refine" or cfg.refine.mode]
    run_stages(cfg.model_copy(update={"stages": stages}))


def _serve(cfg: PipelineConfig) -> None:
    """/rerank, and with serve.search (`larcq-ray serve --search`) /search beside it on serve.host:port."""
    from larcq_ray.core.serve_runner import serve_until_stopped
    from larcq_ray.rerank.app import rerank_app

    apps = [rerank_app(cfg.serve)]
    if cfg.serve.search:
        from larcq_ray.search.app import check_index, search_app

        check_index(cfg)
        apps.append(search_app(cfg))
    serve_until_stopped(apps, cfg.serve.host, cfg.serve.port, cfg.ray.address, cfg.ray.num_cpus)


def _serve_search(cfg: PipelineConfig) -> None:
    from larcq_ray.core.serve_runner import serve_until_stopped
    from larcq_ray.search.app import check_index, search_app

    check_index(cfg)
    sc = cfg.search.serve
    serve_until_stopped([search_app(cfg)], sc.host, sc.port, cfg.ray.address, cfg.ray.num_cpus)


def _build_ann(cfg: PipelineConfig):
    from larcq_ray.search import ann

    return ann.run(cfg)


def _train_clap(cfg: PipelineConfig):
    from larcq_ray.train import job

    return job.run(cfg)


def _train_captioner(cfg: PipelineConfig):
    from larcq_ray.train import captioner_job

    return captioner_job.run(cfg)


def _eval_alm(cfg: PipelineConfig):
    from larcq_ray.evaluate import alm_job

    return alm_job.run(cfg)


COMMANDS = {**STAGE_RUNNERS, "run": run_stages, "benchmark": run_benchmark, "serve": _serve,
            "serve-search": _serve_search, "train-clap": _train_clap, "train-captioner": _train_captioner,
            "eval-alm": _eval_alm, "build-ann": _build_ann}
# Commands whose artifacts go to run_dir: a remote run_dir (s3://...) is staged around them.
RUN_DIR_COMMANDS = {"index", "search", "evaluate", "caption", "rerank", "run", "benchmark"}
# Commands that keep finished work when interrupted (a re-run resumes).
RESUMABLE_COMMANDS = {"index", "caption", "run", "synthesize", "benchmark", "train-clap", "train-captioner", "refine"}


def run_command(command: str, cfg: PipelineConfig) -> None:
    from larcq_ray.core.storage import staged_run_dir

    if command not in COMMANDS:
        raise LarcqError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    if command not in RUN_DIR_COMMANDS:
        COMMANDS[command](cfg)
        return
    with staged_run_dir(cfg.run_dir) as local:
        if command in ("index", "run", "benchmark"):
            local.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, local / artifacts.RUN_CONFIG)  # as given: run_dir stays the user's location
        update: dict = {"run_dir": str(local)}
        if str(local) != str(cfg.run_dir) and not cfg.index.location:  # staged: the index stays where it is
            from larcq_ray.index.store import index_root

            update["index"] = cfg.index.model_copy(update={"location": index_root(cfg)})
        COMMANDS[command](cfg.model_copy(update=update))
