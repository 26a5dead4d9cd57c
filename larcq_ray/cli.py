"""`larcq-ray`: a thin command line over the library. Each stage is also a Ray job entrypoint
(`python -m jobs.<stage> --config ...`), which calls the same functions.

Errors the user can fix print as one message and exit 2; nothing prints a traceback unless
--debug is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from larcq_ray.core.errors import LarcqError, user_message  # noqa: F401 - user_message is part of the CLI's API

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
    parser.add_argument("--verbose", action="store_true",
                        help="show the logs of Ray, Ray Serve (access logs included) and transformers in full, "
                             "Ray workers' included")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("index", "decode, chunk and embed a corpus into a Parquet index"),
        ("search", "embed the queries and score every indexed audio (shortlist.parquet)"),
        ("evaluate", "R@k, mAP@10 and ranks per scoring mode (metrics.json, report.md)"),
        ("run", "index -> search -> caption -> rerank -> evaluate from one config (its `stages`)"),
        ("caption", "caption every window of the shortlisted audios with an audio-language model (captions.parquet)"),
        ("rerank", "re-rank the shortlist from its captions through the /rerank service (reranked.parquet)"),
        ("serve", "run the /rerank Ray Serve application until stopped (--search: /search beside it)"),
        ("serve-search", "run the /search Ray Serve application over run_dir/index until stopped (search.serve)"),
        ("build-ann", "build (or rebuild) the FAISS index over run_dir/index's chunk embeddings for "
                      "search.method: ann (search.ann)"),
        ("synthesize", "build a LARCQ benchmark (long audios + long queries) from a captioned clip dataset"),
        ("refine", "rewrite the benchmark's raw queries with an LLM (queries_condensed.csv / queries_rephrased.csv)"),
        ("train-clap", "contrastive CLAP training (full or --lora) on Ray Train (model_best/, train_summary.json)"),
        ("train-captioner", "train a prefix-lm or drcap captioner on Ray Train (captioner_best/, "
                            "train_captioner_summary.json)"),
        ("eval-alm", "judge caption.backend on a seed-004 test list (ASR or captioning): submission.csv, "
                     "predictions.parquet, eval.json with WER/CER or caption metrics and TTFT/TPOT/peak memory"),
        ("benchmark", "the full benchmark run: synthesize -> refine (if refine.mode) -> index -> search -> caption "
                      "-> rerank -> evaluate"),
    ]:
        p = sub.add_parser(name, help=help_)
        _add_common(p)
        if name == "refine":
            p.add_argument("--mode", choices=["condense", "rephrase"], help="overrides refine.mode")
        if name == "serve":
            p.add_argument("--search", action="store_true",
                           help="also run the /search app (search.serve settings) on serve.host:port, under "
                                "search.serve.route_prefix (sets serve.search)")
        if name == "train-clap":
            p.add_argument("--lora", action="store_true", help="train LoRA adapters only (sets train.lora.enabled)")
        if name == "eval-alm":
            p.add_argument("--test-list", help='the JSON test list: {"annotation": [{testset_id, path, task, test?}]}')
            p.add_argument("--task", choices=["asr", "aac"], help="asr, or aac (the list's audiocaption_v2 entries)")
            p.add_argument("--out", help="folder for submission.csv, predictions.parquet and eval.json")
        if name == "search":
            p.add_argument("--query", action="append", default=[], metavar="TEXT",
                           help="search your own query (repeatable); replaces the config's queries. Answers go "
                                "to results.parquet and results.md in run_dir; nothing is evaluated")
            p.add_argument("--queries-csv", help="a CSV of queries: a `query` column, optional query_id, split_i "
                                                 "and audio_id (ground truth) columns (sets data.queries_csv)")
        if name == "caption":
            p.add_argument("--audio-ids", help="caption the ids listed in this file (.txt one per line, .csv or "
                                               ".parquet with an audio_id column), or `index` for every indexed "
                                               "audio, instead of the shortlist")
    val = sub.add_parser("validate-submission", help="check a submission.csv against its test list: every "
                         "testset_id once, no unknown id, no empty text, the right header (exit 1 on problems)")
    val.add_argument("submission", help="the submission.csv")
    val.add_argument("test_list", help="the JSON test list it answers")
    val.add_argument("--task", choices=["asr", "aac"], help="the task (default: inferred from the submission's ids)")
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
    if getattr(args, "search", False):
        overrides.append("serve.search=true")
    for key, attr in (("test_list", "test_list"), ("task", "task"), ("out_dir", "out")):
        if args.command == "eval-alm" and getattr(args, attr, None):
            overrides.append(f"eval_alm.{key}={json.dumps(getattr(args, attr))}")  # quoted: stays a string
    if getattr(args, "query", None):
        overrides.append(f"data.queries={json.dumps(list(args.query))}")  # a JSON list is a YAML list
    if getattr(args, "queries_csv", None):
        overrides.append(f"data.queries_csv={json.dumps(args.queries_csv)}")
    if getattr(args, "audio_ids", None):
        overrides.append(f"caption.audio_ids={json.dumps(args.audio_ids)}")  # quoted: stays a string
    return load_config(args.config, overrides)


def cmd_demo(args) -> None:
    # The one door from the product into the offline kit (sound world, tiny models, demo CLAP).
    from larcq_ray.offline.demo import run_demo

    run_demo(Path(args.out), n_audios=args.audios, seed=args.seed, address=args.address)


def cmd_validate_submission(args) -> int:
    """One line per problem on stdout; 1 when there is any, 0 when the submission is valid."""
    from larcq_ray.evaluate.alm_submission import validate_submission

    problems, task = validate_submission(args.submission, args.test_list, args.task)
    for p in problems:
        print(f"{args.submission}: {p}")
    if problems:
        print(f"{args.submission}: {len(problems)} problem(s) (task {task}, test list {args.test_list})")
        return 1
    print(f"{args.submission}: valid for task {task} (test list {args.test_list})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from larcq_ray.core.ray_session import set_verbose, verbose

    if args.verbose:  # (or LARCQ_VERBOSE=1 in the environment)
        # Before any Ray starts: a local Ray's workers inherit it, ensure_ray hands it to a cluster's.
        set_verbose(True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("larcq_ray").setLevel(logging.INFO)
    if not verbose():
        for noisy in ("transformers", "ray", "filelock", "urllib3", "httpx", "httpcore", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            cmd_demo(args)
        elif args.command == "validate-submission":
            return cmd_validate_submission(args)
        else:
            from larcq_ray.pipeline import run_command

            run_command(args.command, _config(args))
        return 0
    except KeyboardInterrupt:
        from larcq_ray.pipeline import RESUMABLE_COMMANDS

        hint = "; finished work is kept, re-run to resume" if args.command in RESUMABLE_COMMANDS | {"demo"} else ""
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
