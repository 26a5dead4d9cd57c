"""`larcq-ray`: a thin command line over the library. Each stage is also a Ray job entrypoint
(`python -m jobs.<stage> --config ...`), which calls the same functions.

Errors the user can fix print as one message and exit 2; nothing prints a traceback unless
--debug is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from larcq_ray.errors import LarcqError, user_message  # noqa: F401 - user_message is part of the CLI's API

log = logging.getLogger("larcq_ray")


def _add_common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="pipeline YAML (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set index.batch_size=8 (repeatable)")
    p.add_argument("--run-dir", help="override run_dir")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="larcq-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("index", "decode, chunk and embed a corpus into a Parquet index"),
        ("search", "embed the queries and score every indexed audio (shortlist.parquet)"),
        ("evaluate", "R@k, mAP@10 and ranks per scoring mode (metrics.json, report.md)"),
        ("run", "index -> search -> caption -> rerank -> evaluate from one config (its `stages`)"),
        ("caption", "caption every window of the shortlisted audios with an audio-language model (captions.parquet)"),
        ("rerank", "re-rank the shortlist from its captions through the /rerank service (reranked.parquet)"),
        ("serve", "run the /rerank Ray Serve application until stopped"),
        ("synthesize", "build a LARCQ benchmark (long audios + long queries) from a captioned clip dataset"),
        ("refine", "rewrite the benchmark's raw queries with an LLM (queries_condensed.csv / queries_rephrased.csv)"),
        ("train-clap", "contrastive CLAP training (full or --lora) on Ray Train (model_best/, train_summary.json)"),
        ("benchmark", "the full benchmark run: synthesize -> refine (if refine.mode) -> index -> search -> caption "
                      "-> rerank -> evaluate"),
    ]:
        p = sub.add_parser(name, help=help_)
        _add_common(p)
        if name == "refine":
            p.add_argument("--mode", choices=["condense", "rephrase"], help="overrides refine.mode")
        if name == "train-clap":
            p.add_argument("--lora", action="store_true", help="train LoRA adapters only (sets train.lora.enabled)")
        if name == "caption":
            p.add_argument("--audio-ids", help="caption the ids listed in this file (.txt one per line, .csv or "
                                               ".parquet with an audio_id column) instead of the shortlist")
    demo = sub.add_parser("demo", help="offline demo: sound-world benchmark + the trained demo CLAP + the whole pipeline")
    demo.add_argument("--out", required=True, help="folder for the benchmark, model and run")
    demo.add_argument("--audios", type=int, default=16, help="number of long audios")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    return parser


def _config(args):
    from larcq_ray.config import load_config

    overrides = list(args.set)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.address:
        overrides.append(f"ray.address={args.address}")
    if getattr(args, "mode", None):
        overrides.append(f"refine.mode={args.mode}")
    if getattr(args, "lora", False):
        overrides.append("train.lora.enabled=true")
    if getattr(args, "audio_ids", None):
        overrides.append(f"caption.audio_ids={json.dumps(args.audio_ids)}")  # quoted: stays a string
    return load_config(args.config, overrides)


def cmd_synthesize(cfg) -> None:
    from larcq_ray.synthesis.pipeline import run_synthesize

    sc = cfg.synthesize
    log.info("synthesizing %d long audios from %s into %s", sc.n_audios, sc.captions_csv, sc.out_dir)
    summary = run_synthesize(sc, address=cfg.ray.address, num_cpus=cfg.ray.num_cpus)
    for line in summary.lines():
        log.info(line)
    if summary.failed:
        raise LarcqError(f"{len(summary.failed)} of {summary.planned} long audios failed and are left out of "
                         f"queries.csv (reasons in {sc.out_dir}/synthesis_report.json); re-run to retry them")


def cmd_refine(cfg) -> str:
    """Runs refine; returns the refined queries CSV (the stages after it search with it)."""
    from larcq_ray.refine.pipeline import run_refine

    if not cfg.refine.mode:
        raise LarcqError("refine needs a mode: --mode condense|rephrase, or refine.mode in the config")
    if not cfg.data.benchmark:
        raise LarcqError("refine needs data.benchmark (the folder holding queries.csv)")
    log.info("refining the queries of %s (%s) with %s", cfg.data.benchmark, cfg.refine.mode, cfg.refine.model)
    summary = run_refine(Path(cfg.data.benchmark), cfg.refine.mode, cfg.refine, address=cfg.ray.address)
    log.info("%d queries: %d rewritten, %d flagged (raw query kept), %d errors (raw query kept), %d resumed; %s "
             "(reasons in %s)", summary["n_rows"], summary["n_rewritten"], summary["n_flagged"], summary["n_errors"],
             summary["n_resumed"], summary["out_path"], summary["report_path"])
    return str(summary["out_path"])


def cmd_index(cfg) -> None:
    from larcq_ray.index_pipeline import run_index
    from larcq_ray.inputs import check_queries_against_corpus, corpus_root, list_corpus, queries_csv_path, read_queries

    refs = list_corpus(cfg.data)
    if cfg.data.benchmark or cfg.data.queries_csv:  # fail before hours of indexing, not after
        check_queries_against_corpus(read_queries(queries_csv_path(cfg.data)), {r.audio_id for r in refs},
                                     corpus_root(cfg.data))
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    log.info("indexing %d files from %s into %s", len(refs), corpus_root(cfg.data), Path(cfg.run_dir) / "index")
    t0 = time.time()
    summary = run_index(cfg, refs)
    for line in summary.lines():
        log.info(line)
    log.info("index done in %.1f s", time.time() - t0)


def cmd_search(cfg) -> None:
    from larcq_ray.search import run_search

    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    meta = run_search(cfg)
    log.info("searched %d queries over %d audios (%s); shortlist: %s", meta["n_queries"], meta["n_audios"],
             ", ".join(meta["modes"]), Path(cfg.run_dir) / "shortlist.parquet")


def cmd_evaluate(cfg) -> None:
    from larcq_ray.evaluate import run_evaluate

    metrics = run_evaluate(cfg.run_dir)
    log.info("%-22s %7s %7s %7s %8s %9s", "mode", "R@1", "R@5", "R@10", "mAP@10", "mean rank")
    for mode, m in metrics.items():
        if mode == "final":
            log.info("after re-ranking (%s, top %d): R@1 %.2f (CLAP %.2f), R@5 %.2f; %d fixed, %d demoted",
                     m["mode"], m["top_n"], m["R@1"], m["clap_R@1"], m["R@5"], m["fixed_top1"], m["demoted_top1"])
            continue
        log.info("%-22s %7.2f %7.2f %7.2f %8.2f %9.2f", mode, m["R@1"], m["R@5"], m["R@10"], m["mAP@10"], m["mean_rank"])
    log.info("report: %s", Path(cfg.run_dir) / "report.md")


def cmd_caption(cfg) -> None:
    from larcq_ray.caption.pipeline import read_audio_id_list, run_caption, unique_audio_ids_from_shortlist
    from larcq_ray.inputs import AudioRef, corpus_root

    run_dir, cc = Path(cfg.run_dir), cfg.caption
    if cc.audio_ids:
        ids = read_audio_id_list(cc.audio_ids)
        source = f"listed in {cc.audio_ids}"
    else:
        mode, top_n = cc.mode or cfg.rerank.mode, cc.top_n or cfg.rerank.top_n
        ids = unique_audio_ids_from_shortlist(run_dir / "shortlist.parquet", modes=[mode], top_n=top_n)
        source = f"top {top_n} of the {mode} shortlist"
    root = corpus_root(cfg.data)
    log.info("captioning %d unique audios (%s) with %s", len(ids), source, cc.backend.model)
    summary = run_caption([AudioRef(a, str(root / a)) for a in ids], cc.backend, run_dir / "captions.parquet",
                          num_actors=cc.num_actors, num_gpus=cc.num_gpus_per_actor, address=cfg.ray.address,
                          show_progress=True)
    for line in summary.lines():
        log.info(line)


def cmd_serve(cfg) -> None:
    from larcq_ray.ray_session import ensure_ray
    from larcq_ray.rerank.app import run_server

    import ray
    from ray import serve

    def _stop(signum, frame):  # SIGTERM (container stop, kill) stops as cleanly as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    try:
        run_server(cfg.serve, blocking=True)  # returns after Ctrl-C, app deleted
    finally:
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            serve.shutdown()  # our own local Ray: stop it here, not in an interruptible atexit hook
            ray.shutdown()
    log.info("re-rank service stopped")


def cmd_rerank(cfg) -> None:
    from larcq_ray.rerank_job import SERVE_SCHEME, make_client, rerank_shortlist

    started = False
    endpoint, key = cfg.rerank.endpoint, cfg.rerank.api_key
    if endpoint is None or endpoint.startswith(SERVE_SCHEME):
        from larcq_ray.ray_session import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    if endpoint is None:  # deploy the service in this Ray cluster for the job, call it by handle
        from larcq_ray.rerank.app import APP_NAME, run_server

        run_server(cfg.serve, blocking=False)
        endpoint, started = SERVE_SCHEME + APP_NAME, True
    try:
        meta = rerank_shortlist(Path(cfg.run_dir), cfg.rerank, make_client(endpoint, key))
    finally:
        if started:
            from ray import serve

            from larcq_ray.rerank.app import APP_NAME

            serve.delete(APP_NAME)
    log.info("re-ranked the top %d of %d queries (%s shortlist) via %s: %s", meta["top_n"], meta["n_queries"],
             meta["mode"], endpoint, Path(cfg.run_dir) / "reranked.parquet")


def cmd_train_clap(cfg) -> None:
    from larcq_ray.train.job import run_train_clap

    s = run_train_clap(cfg)  # needs a local run_dir (not staged: workers write model_best/ into it)
    log.info("trained %s%s: %d steps (resumed from step %d) on %d pairs, %d inputs skipped; best val R@1 %s "
             "(epoch %s); model: %s", s["base_model"], " (LoRA)" if s["lora"] else "", s["steps"] or 0,
             s["resumed_from_step"] or 0, s["n_train_pairs"], s["skipped"]["total"], s["best_val_R@1"],
             s["best_epoch"], s["paths"]["model_best"])


def _stage_steps() -> dict:
    return {"synthesize": cmd_synthesize, "refine": cmd_refine, "index": cmd_index, "search": cmd_search,
            "caption": cmd_caption, "rerank": cmd_rerank, "evaluate": cmd_evaluate}


def cmd_run(cfg) -> None:
    steps = _stage_steps()
    for stage in [s for s in steps if s in cfg.stages]:  # always in pipeline order
        result = steps[stage](cfg)
        if stage == "refine" and not cfg.data.queries_csv:  # later stages search the refined queries
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"queries_csv": result})})


def cmd_benchmark(cfg) -> None:
    from larcq_ray.config import ALL_STAGES

    if not cfg.data.benchmark:
        raise LarcqError("the benchmark run needs data.benchmark (set it to synthesize.out_dir)")
    stages = [s for s in ALL_STAGES if s != "refine" or cfg.refine.mode]
    cmd_run(cfg.model_copy(update={"stages": stages}))


# Commands whose artifacts go to run_dir: a remote run_dir (s3://...) is staged around them.
_RUN_DIR_COMMANDS = {"index", "search", "evaluate", "caption", "rerank", "run", "benchmark"}


def run_command(command: str, cfg) -> None:
    from larcq_ray.config import dump_config
    from larcq_ray.storage import staged_run_dir

    commands = {**_stage_steps(), "run": cmd_run, "benchmark": cmd_benchmark, "serve": cmd_serve,
                "train-clap": cmd_train_clap}
    if command not in _RUN_DIR_COMMANDS:
        commands[command](cfg)
        return
    with staged_run_dir(cfg.run_dir) as local:
        if command in ("index", "run", "benchmark"):
            local.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, local / "config.yaml")  # as given: run_dir stays the user's location
        commands[command](cfg.model_copy(update={"run_dir": str(local)}))


def cmd_demo(args) -> None:
    from larcq_ray.demo import run_demo

    run_demo(Path(args.out), n_audios=args.audios, seed=args.seed, address=args.address)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("larcq_ray").setLevel(logging.INFO)
    for noisy in ("transformers", "ray", "filelock", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            cmd_demo(args)
        else:
            run_command(args.command, _config(args))
        return 0
    except KeyboardInterrupt:
        hint = "; finished work is kept, re-run to resume" if args.command in ("index", "run", "demo", "synthesize", "benchmark",
                                                                             "train-clap") else ""
        print(f"larcq-ray {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into messages
        if args.debug:
            raise
        msg = user_message(e)
        if msg is None:
            msg = f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}" \
                  " (re-run with --debug for the traceback)"
        print(f"larcq-ray {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
