"""eval-alm: judge a captioner / audio-language model on a seed-004 test list, for one task.

    test list -> entries of the task (the other task's skipped and counted; bad entries -> error rows)
              -> Ray Data: AlmDecodeStage tasks | AlmInferStage actor pool  -> one text per item
              -> submission.csv, predictions.parquet, quality (WER/CER or caption metrics)
              -> AlmCostStage (one actor, batch 1): TTFT, TPOT, peak memory   -> eval.json

Quality is computed on what submission.csv holds: an item that failed counts with an empty text,
as a leaderboard would score it (eval.json says how many). Nothing resumes: a run rewrites DIR.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Optional

from larcq_ray import artifacts
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.file_job import reason_kind
from larcq_ray.evaluate.alm_config import EvalAlmConfig
from larcq_ray.evaluate.alm_submission import write_submission
from larcq_ray.evaluate.alm_testlist import TaskSelection, read_test_list, select

log = logging.getLogger(__name__)
_ERRORS_PRINTED = 20


def _backend_cfg(backend, ec: EvalAlmConfig, task: str):
    """The caption backend config for this task: hf-audio-lm is asked the task prompt; prefix-lm /
    drcap keep their trained prompt unless override_trained_prompt (returned as the override)."""
    prompt = ec.prompt_for(task)
    if backend.kind == "hf-audio-lm":
        return backend.model_copy(update={"prompt": prompt}), None
    return backend, (prompt if ec.override_trained_prompt else None)


def _infer(sel: TaskSelection, backend, override: Optional[str], spec, ec: EvalAlmConfig,
           address: Optional[str]) -> dict[str, dict]:
    """key (the entry's index) -> {prediction, status, error} for every entry to run."""
    import ray

    from larcq_ray.core.ray_session import ensure_ray
    from larcq_ray.core.stage import map_stage
    from larcq_ray.evaluate.alm_stages import AlmDecodeStage, AlmInferStage

    todo = sel.to_run
    if not todo:
        return {}
    ensure_ray(address)
    per_task = 4
    ds = ray.data.from_items([{"key": str(e.index), "path": e.path} for e in todo],
                             override_num_blocks=max(1, -(-len(todo) // per_task)))
    ds = map_stage(ds, AlmDecodeStage(spec.sample_rate, spec.window_s, ec.long_audio), per_task)
    gpus = "auto" if ec.num_gpus_per_actor is None else ec.num_gpus_per_actor
    ds = map_stage(ds, AlmInferStage(backend=backend.model_dump(), prompt_override=override,
                                     long_audio=ec.long_audio, actors=ec.num_actors, cpus=1.0, gpus=gpus),
                   ec.batch_size)
    out: dict[str, dict] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["key"])):
            out[str(batch["key"][i])] = {"prediction": str(batch["prediction"][i]), "status": str(batch["status"][i]),
                                         "error": str(batch["error"][i])}
    lost = [e.row_id for e in todo if str(e.index) not in out]
    if lost:  # never silently accept a lost row
        raise LarcqError(f"eval-alm: {len(lost)} item(s) came back from Ray without a result: {lost[:5]}")
    return out


def _cost(paths: list[str], backend, override: Optional[str], ec: EvalAlmConfig) -> dict:
    import ray

    from larcq_ray.core.stage import map_stage
    from larcq_ray.evaluate.alm_stages import AlmCostStage

    c = ec.cost
    stage = AlmCostStage(backend=backend.model_dump(), prompt_override=override, cost_prompt=c.prompt,
                         warmup_runs=c.warmup_runs, timed_runs=c.timed_runs,
                         gpus="auto" if ec.num_gpus_per_actor is None else ec.num_gpus_per_actor)
    ds = map_stage(ray.data.from_items([{"path": p} for p in paths], override_num_blocks=1), stage, len(paths))
    rows = [r for b in ds.iter_batches(batch_format="numpy", batch_size=None)
            for r in zip(b["cost"], b["error"])]
    for cost, _ in rows:
        if cost:
            figures = json.loads(str(cost))
            if len(figures.get("prompt", "")) > 200:
                figures["prompt"] = figures["prompt"][:200] + "..."
            return figures
    return {"error": str(rows[0][1]) if rows else "cost: the cost stage returned nothing"}


def _quality(task: str, texts: dict[str, str], refs: dict[str, str]) -> dict:
    ids = [k for k in texts if refs.get(k) is not None and refs[k].strip()]
    if not ids:
        return {"n_items": 0, "note": "no item has a reference (a blind test list): no quality figures"}
    if task == "asr":
        from larcq_ray.evaluate.asr_metrics import asr_metrics

        return asr_metrics([texts[k] for k in ids], [refs[k] for k in ids])
    from larcq_ray.evaluate.caption_metrics import caption_metrics

    return caption_metrics({k: texts[k] for k in ids}, {k: [refs[k]] for k in ids})


def run_eval_alm(cfg, *, address: Optional[str] = None) -> dict:
    """Evaluate `cfg.caption.backend` as `cfg.eval_alm` says; write DIR; return eval.json's content."""
    from larcq_ray.caption.backends import describe

    ec = cfg.eval_alm
    missing = [f"--{n.replace('_', '-')}" for n, v in (("test_list", ec.test_list), ("task", ec.task),
                                                         ("out", ec.out_dir)) if not v]
    if missing:
        raise LarcqError(f"eval-alm needs {', '.join(missing)} (or eval_alm.test_list / task / out_dir in the config)")
    out_dir = Path(ec.out_dir)
    entries = read_test_list(ec.test_list, ec.audio_root)
    sel = select(entries, ec.task)
    backend, override = _backend_cfg(cfg.caption.backend, ec, ec.task)
    spec = describe(backend)  # fail fast on a missing model, before Ray starts
    prompt = override or spec.prompt
    results = _infer(sel, backend, override, spec, ec, address or cfg.ray.address)

    rows, first_seen = [], set()
    for e in sel.entries:
        r = results.get(str(e.index), {"prediction": "", "status": "failed", "error": e.error})
        rows.append({"id": e.row_id, "path": e.path, "task": e.task, "prediction": r["prediction"],
                     "reference": e.reference, "status": r["status"], "error": r["error"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.ALM_PREDICTIONS.write(out_dir, rows)
    sub_rows = []
    for e, r in zip(sel.entries, rows):  # each testset_id once (its first entry); entries without one left out
        if e.testset_id is not None and e.testset_id not in first_seen:
            first_seen.add(e.testset_id)
            sub_rows.append((e.testset_id, r["prediction"]))
    write_submission(out_dir / artifacts.ALM_SUBMISSION, sub_rows)

    texts = {tid: " ".join(t.split()).lower() for tid, t in sub_rows}  # what the submission holds
    refs = {e.testset_id: e.reference for e in sel.entries if e.testset_id in texts and not e.error}
    quality = _quality(ec.task, texts, refs)
    failed = [r for r in rows if r["status"] != "ok"]
    n_ok = len(rows) - len(failed)
    quality["n_failed_scored_as_empty"] = sum(1 for r in failed if r["id"] in refs and refs[r["id"]])

    cost: dict = {"skipped": "eval_alm.cost.enabled is false"} if not ec.cost.enabled else {}
    if ec.cost.enabled:
        ok_paths = [r["path"] for r in rows if r["status"] == "ok"][:ec.cost.items]
        cost = _cost(ok_paths, backend, override, ec) if ok_paths else {"skipped": "no item was captioned"}

    result = {
        "task": ec.task, "seed_task": sel.seed_task, "test_list": str(ec.test_list),
        "backend": {"kind": backend.kind, "model": spec.name, "prompt": prompt, "window_s": spec.window_s,
                    "sample_rate": spec.sample_rate, "long_audio": ec.long_audio,
                    "max_new_tokens": backend.max_new_tokens, "num_beams": backend.num_beams},
        "counts": {"entries": len(entries), "evaluated": len(rows), "ok": n_ok, "errors": len(failed),
                   "skipped_other_task": sel.skipped_other_task,
                   "with_reference": sum(1 for v in refs.values() if v and v.strip()),
                   "error_kinds": dict(Counter(reason_kind(r["error"]) for r in failed).most_common())},
        "errors": [{"id": r["id"], "error": r["error"]} for r in failed],
        "quality": quality, "cost": cost,
        "outputs": {k: str(out_dir / v) for k, v in (("submission", artifacts.ALM_SUBMISSION),
                                                      ("predictions", artifacts.ALM_PREDICTIONS.relpath),
                                                      ("eval", artifacts.ALM_EVAL.relpath))},
    }
    artifacts.ALM_EVAL.write(out_dir, result)
    return result


def summary_lines(result: dict) -> list[str]:
    c, q, cost = result["counts"], result["quality"], result["cost"]
    lines = [f"eval-alm {result['task']} ({result['backend']['kind']} {result['backend']['model']}): "
             f"{c['evaluated']} evaluated, {c['ok']} ok, {c['errors']} errors; "
             f"{c['skipped_other_task']} other-task entries skipped"]
    for e in result["errors"][:_ERRORS_PRINTED]:
        lines.append(f"  error: {e['id']}: {e['error']}")
    if len(result["errors"]) > _ERRORS_PRINTED:
        lines.append(f"  ... and {len(result['errors']) - _ERRORS_PRINTED} more errors (predictions.parquet)")
    if result["task"] == "asr" and q.get("wer") is not None:
        lines.append(f"WER {q['wer']:.4f}, CER {q['cer']:.4f} over {q['n_items']} items with a reference")
    elif q.get("scores"):
        figures = ", ".join(f"{k} {v:.4f}" for k, v in q["scores"].items())
        lines.append(f"{figures} over {q['n_items']} items with a reference")
        if q.get("not_run"):
            lines.append(f"  not run: {', '.join(sorted(q['not_run']))} (reasons in eval.json)")
    else:
        lines.append(q.get("note", "no quality figures"))
    if "ttft_ms_mean" in cost:
        lines.append(f"cost ({cost['device']}, {cost['dtype']}, batch 1, {cost['timed_runs']} timed runs): "
                     f"TTFT {cost['ttft_ms_mean']:.1f} ms, TPOT {cost['tpot_ms_mean']:.1f} ms, "
                     f"peak memory {cost['peak_memory_mb']:.0f} MiB ({cost['peak_memory_kind']})")
    else:
        lines.append(f"cost: {cost.get('skipped') or cost.get('error')}")
    lines.append(f"wrote {result['outputs']['submission']}, predictions.parquet and eval.json")
    return lines


def run(cfg) -> dict:
    """`larcq-ray eval-alm`."""
    result = run_eval_alm(cfg)
    for line in summary_lines(result):
        log.info(line)
    return result
