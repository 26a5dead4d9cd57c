"""`run_refine`: rewrite every query of a LARCQ benchmark with an LLM, on Ray Data.

    queries.csv -> rows (row_index, raw query, splits, filled prompt)
      -> Ray Data map_batches(RefineStage) on an actor pool: generate, clean, check
         (vllm engine: the ray.data.llm processor generates, then RefineStage cleans + checks)
      -> queries_condensed.csv / queries_rephrased.csv  (same columns, cells and row order as the
         input; `query` = the cleaned rewrite, or the raw query when the row is flagged or failed)
      -> queries_condensed.report.csv                  (one line per row: what happened and why)

Never loses a row: a generation error keeps the raw query, with the error as the reason. Resume:
the report is appended to as batches come back; a rerun skips rows already in it with the same
run key (mode + every setting that changes a result, `RefineConfig.run_key`) and the same raw
query, and redoes errored rows.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from larcq_ray.core.errors import LarcqError, user_message
from larcq_ray.core.inputs import read_queries
from larcq_ray.core.stage import Resources, map_stage
from larcq_ray.refine.config import RefineConfig
from larcq_ray.refine.prompts import OUTPUT_STEM, build_prompt, check_mode

log = logging.getLogger(__name__)

REPORT_COLUMNS = ["row_index", "audio_id", "raw_query", "rewrite", "min_split_similarity", "flagged",
                  "reason", "run_key"]
ERROR_PREFIX = "generation error: "


@dataclass
class RefineStage:
    """Ray Data actor stage: loads the engine (unless `generate=False`) and the check model once."""

    cfg: dict  # RefineConfig fields
    generate: bool = True
    gpus: float = 0.0
    name: str = "refine"
    _engine: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        c = RefineConfig(**self.cfg)
        return Resources(cpus=c.num_cpus_per_actor, gpus=self.gpus, actors=c.num_actors)

    def setup(self) -> None:
        from larcq_ray.refine.checks import RewriteChecker
        from larcq_ray.refine.engines import build_engine

        self._cfg = RefineConfig(**self.cfg)
        self._engine = build_engine(self._cfg) if self.generate else None
        self.checker = RewriteChecker(self._cfg.check_model, self._cfg.device, self._cfg.threshold,
                                      self._cfg.max_length_ratio)

    def _generate(self, prompts: list[str]) -> tuple[list[str], list[str]]:
        """(outputs, errors) per prompt; a failing batch is retried row by row to isolate the bad row."""
        assert self._engine is not None
        try:
            outs = list(self._engine.generate(list(prompts)))
            if len(outs) != len(prompts):
                raise RuntimeError(f"engine returned {len(outs)} outputs for {len(prompts)} prompts")
            return [str(o) if o is not None else "" for o in outs], [""] * len(prompts)
        except Exception as exc:  # noqa: BLE001 - any engine failure becomes a per-row reason
            if len(prompts) == 1:
                return [""], [f"{type(exc).__name__}: {exc}"]
            outs, errs = [], []
            for p in prompts:
                o, e = self._generate([p])
                outs += o
                errs += e
            return outs, errs

    def process_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from larcq_ray.refine.cleaning import clean_output

        raw = [str(x) for x in batch["raw_query"]]
        splits = [json.loads(str(x)) for x in batch["splits_json"]]
        if self._engine is not None:
            outputs, errors = self._generate([str(p) for p in batch["prompt"]])
        else:  # outputs of the ray.data.llm processor
            outputs = [str(x) if x is not None else "" for x in batch["generated_text"]]
            err_col = batch.get("__inference_error__")
            errors = [str(e) if e is not None and str(e) else "" for e in err_col] if err_col is not None \
                else [""] * len(raw)
        rewrites = [clean_output(o) if not e else "" for o, e in zip(outputs, errors)]
        checked = self.checker.check(rewrites, raw, splits)
        sims, flagged, reasons = [], [], []
        for err, res in zip(errors, checked):
            if err:
                sims.append(float("nan"))
                flagged.append(True)
                reasons.append(ERROR_PREFIX + " ".join(err.split())[:500])
            else:
                sims.append(res.min_split_similarity)
                flagged.append(res.flagged)
                reasons.append(res.reason)
        return {
            "row_index": np.asarray(batch["row_index"], dtype=np.int64),
            "rewrite": np.asarray(rewrites, dtype=object),
            "min_split_similarity": np.asarray(sims, dtype=np.float64),
            "flagged": np.asarray(flagged, dtype=bool),
            "reason": np.asarray(reasons, dtype=object),
        }

    def failed_batch(self, batch: dict[str, np.ndarray], reason: str) -> dict[str, np.ndarray]:
        n = len(batch["row_index"])  # the raw query is kept for these rows, and a re-run retries them
        return {
            "row_index": np.asarray(batch["row_index"], dtype=np.int64),
            "rewrite": np.full(n, "", dtype=object),
            "min_split_similarity": np.full(n, np.nan),
            "flagged": np.ones(n, dtype=bool),
            "reason": np.full(n, ERROR_PREFIX + " ".join(reason.split())[:500], dtype=object),
        }


# --- files --------------------------------------------------------------------------------------

def output_paths(benchmark_dir: Path, mode: str, out_path: Path | None = None) -> tuple[Path, Path]:
    """(queries csv, report csv): next to queries.csv unless `out_path` names the csv."""
    out = Path(out_path) if out_path else Path(benchmark_dir) / f"{OUTPUT_STEM[mode]}.csv"
    return out, out.with_name(out.stem + ".report.csv")


def _raw_rows(path: Path) -> list[list[str]]:
    # Read exactly as read_queries does, so row i here is Query i there.
    return list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))


def _read_report(path: Path) -> dict[int, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable refine report %s: %s", path, exc)
        return {}
    out = {}
    for r in rows:
        try:
            out[int(r["row_index"])] = r
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _report_line(row_index: int, q: Any, rewrite: str, sim: float, flagged: bool, reason: str,
                 key: str) -> dict[str, str]:
    return {"row_index": str(row_index), "audio_id": q.audio_id, "raw_query": q.text, "rewrite": rewrite,
            "min_split_similarity": "" if sim is None or math.isnan(sim) else f"{sim:.4f}",
            "flagged": "true" if flagged else "false", "reason": reason, "run_key": key}


def _write_csv(path: Path, header: list[str] | None, rows: list[list[str]] | list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if header is not None and rows and isinstance(rows[0], dict):
            w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)  # type: ignore[arg-type]
        else:
            w2 = csv.writer(f, lineterminator="\n")
            if header is not None:
                w2.writerow(header)
            w2.writerows(rows)  # type: ignore[arg-type]
    os.replace(tmp, path)  # a crash mid-write never leaves a half file


# --- driver -------------------------------------------------------------------------------------

def run_refine(benchmark_dir: Path, mode: str, cfg: RefineConfig, out_path: Path | None = None,
               address: str | None = None) -> dict:
    """Rewrite every query of `benchmark_dir/queries.csv` (mode "condense" or "rephrase").

    Returns {n_rows, n_rewritten, n_flagged, n_errors, n_resumed, out_path, report_path, mode,
    run_key}. n_rewritten + n_flagged + n_errors == n_rows (n_flagged excludes errors).
    """
    import ray

    from larcq_ray.core.ray_session import ensure_ray

    mode = check_mode(mode)
    if not isinstance(cfg, RefineConfig):
        raise LarcqError(f"run_refine needs a RefineConfig, got {type(cfg).__name__}")
    benchmark_dir = Path(benchmark_dir)
    queries_path = benchmark_dir / "queries.csv"
    if not queries_path.is_file():
        raise LarcqError(f"refine: no queries.csv in {benchmark_dir} (expected a LARCQ benchmark folder)")
    queries = read_queries(queries_path)  # validates; one Query per data row, in order
    raw_rows = _raw_rows(queries_path)
    header, data_rows = raw_rows[0], raw_rows[1:]
    if len(data_rows) != len(queries):  # read_queries never drops rows; guard the alignment anyway
        raise LarcqError(f"{queries_path}: {len(data_rows)} rows but {len(queries)} queries parsed")
    q_col = [h.strip() for h in header].index("query")
    out_csv, report_csv = output_paths(benchmark_dir, mode, out_path)
    if out_csv.resolve() == queries_path.resolve():
        raise LarcqError("refine: the output would overwrite queries.csv; choose another out_path")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    key = cfg.run_key(mode)
    template = cfg.prompt(mode)
    if isinstance(cfg.engine_factory, str):
        from larcq_ray.refine.engines import _resolve_factory

        _resolve_factory(cfg.engine_factory)  # fail fast on the driver (workers import it again)
    if cfg.engine == "vllm" and cfg.engine_factory is None:
        from larcq_ray.refine.engines import require_vllm

        require_vllm()  # before Ray starts: a clear error, not a failed actor

    # Resume: rows already done under this run key, on the same raw query, and not errored.
    previous = _read_report(report_csv)
    done: dict[int, dict[str, str]] = {}
    for i, q in enumerate(queries):
        r = previous.get(i)
        if r and r.get("run_key") == key and r.get("raw_query") == q.text \
                and not str(r.get("reason", "")).startswith(ERROR_PREFIX):
            done[i] = r
    todo = [i for i in range(len(queries)) if i not in done]
    results: dict[int, dict[str, str]] = dict(done)

    if todo:
        # Start the report afresh with the rows kept; append new rows as batches come back.
        _write_csv(report_csv, REPORT_COLUMNS, [done[i] for i in sorted(done)])
        ensure_ray(address)
        items = [{"row_index": i, "raw_query": queries[i].text,
                  "splits_json": json.dumps(list(queries[i].splits)),
                  "prompt": build_prompt(template, queries[i].text)} for i in todo]
        n_blocks = max(1, min(len(items), -(-len(items) // cfg.batch_size)))
        ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        use_vllm = cfg.engine == "vllm" and cfg.engine_factory is None
        if use_vllm:
            from larcq_ray.refine.engines import build_vllm_processor

            ds = build_vllm_processor(cfg)(ds)
        stage = RefineStage(cfg=cfg.model_dump(), generate=not use_vllm,
                            gpus=0.0 if use_vllm else cfg.num_gpus_per_actor)
        ds = map_stage(ds, stage, cfg.batch_size)
        try:
            with open(report_csv, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS, lineterminator="\n")
                for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                    for j in range(len(batch["row_index"])):
                        i = int(batch["row_index"][j])
                        line = _report_line(i, queries[i], str(batch["rewrite"][j]),
                                            float(batch["min_split_similarity"][j]),
                                            bool(batch["flagged"][j]), str(batch["reason"][j]), key)
                        results[i] = line
                        w.writerow(line)
                    f.flush()
        except Exception as exc:
            cause = _larcq_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        missing = [i for i in todo if i not in results]
        if missing:  # would mean rows were lost in flight; never write a partial benchmark
            raise LarcqError(f"refine: {len(missing)} row(s) came back missing, e.g. {missing[:5]}")

    # Final files, in input row order.
    ordered = [results[i] for i in range(len(queries))]
    _write_csv(report_csv, REPORT_COLUMNS, ordered)
    out_rows = []
    n_rewritten = n_flagged = n_errors = 0
    for raw_row, line in zip(data_rows, ordered):
        row = list(raw_row)
        if line["reason"].startswith(ERROR_PREFIX):
            n_errors += 1
        elif line["flagged"] == "true" or not line["rewrite"]:
            n_flagged += 1
        else:
            n_rewritten += 1
            row[q_col] = line["rewrite"]  # only the query cell changes
        out_rows.append(row)
    _write_csv(out_csv, header, out_rows)
    return {"mode": mode, "n_rows": len(queries), "n_rewritten": n_rewritten, "n_flagged": n_flagged,
            "n_errors": n_errors, "n_resumed": len(done), "out_path": str(out_csv),
            "report_path": str(report_csv), "run_key": key}


def _larcq_cause(exc: BaseException) -> LarcqError | None:
    """The LarcqError behind a Ray task/actor failure (e.g. a model that cannot be loaded), if any."""
    msg = user_message(exc)
    return None if msg is None else LarcqError(msg)


def run(cfg) -> str:
    """`larcq-ray refine`: returns the refined queries CSV (the stages after it search with it)."""
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
