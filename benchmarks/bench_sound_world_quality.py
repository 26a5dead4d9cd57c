"""Retrieval quality of a CLAP trained on sound_world (benchmarks/train_demo_clap.py), on unseen audio + phrasings.

    python benchmarks/bench_sound_world_quality.py [--model /tmp/larcq_demo_clap/run/model_best]
        [--out /tmp/larcq_sw_quality] [--seed 1000] [--per-combo 2] [--audios 50] [--window-s 10]
        [--skip-single] [--skip-long]

Without --model it measures the demo's committed CLAP (larcq_ray/offline/demo_clap_weights, assembled).

(a) Single-event text -> audio. Gallery: `--per-combo` fresh clips (seed `--seed`, 2-5 s, 48 kHz) of
    every kind x attribute combination of sound_world (33 kinds, 106 combinations). Queries: every
    HELD-OUT phrasing of every combination (never seen in training). Definition: a query's hit at k
    if one of its top-k audios has exactly the query's kind AND attribute values (several clips share
    a combination, and phrasings of one combination are identical text, so "the" clip of a query is
    not defined; its combination is). Chance R@1 = per_combo / gallery = 1/106. Also reported: kind-only
    R@1 (top audio of the right kind) and, among those, how often each attribute is right.
(b) Long audio, the LARCQ pipeline. `write_clip_dataset(split="heldout", seed=--seed + 1)` clips ->
    `larcq-ray synthesize` (`--audios` long audios of 3-5 clips, gap 0.5 s, max_clip_uses 1, the
    query caption drawn among the clip's held-out captions) -> index (fixed `--window-s` chunks +
    whole file) -> search (query chunks = the per-clip captions) -> evaluate; prints R@1/R@5/R@10 of
    the nine scoring modes. The method's claim checked: audio-max+query-sum R@1 >= none R@1 + 15 points.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

SR = 48000


def single_event(model: str, seed: int, per_combo: int, batch: int = 32) -> dict:
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder, ClapTextEncoder

    combos = sw.all_event_specs()
    rng = np.random.default_rng(seed)
    fz = AudioFeaturizer(model, local_files_only=True)
    aenc = ClapAudioEncoder(model, device="cpu", local_files_only=True)
    tenc = ClapTextEncoder(model, device="cpu", local_files_only=True)
    t0 = time.time()
    clip_combo, feats = [], []
    for ci, spec in enumerate(combos):
        for _ in range(per_combo):
            x = sw.render(spec, rng, float(rng.uniform(2.0, 5.0)), SR)
            feats.append(fz(x).input_features)
            clip_combo.append(ci)
    emb = []
    for s in range(0, len(feats), batch):
        f = np.stack(feats[s:s + batch])
        emb.append(aenc(f, np.zeros(len(f), dtype=bool)))
    audio = np.concatenate(emb)
    texts, q_combo = [], []
    for ci, spec in enumerate(combos):
        for t in sw.captions(spec, "heldout"):
            texts.append(t)
            q_combo.append(ci)
    te = tenc(texts)
    sims = te.embeddings @ audio.T  # (Q, A)
    order = np.argsort(-sims, axis=1, kind="stable")
    clip_combo = np.asarray(clip_combo)
    q_combo = np.asarray(q_combo)
    top_combo = clip_combo[order]  # (Q, A) combination of the k-th audio
    hit = top_combo == q_combo[:, None]
    res = {"n_queries": len(texts), "n_audios": len(audio), "n_combos": len(combos),
           "chance_R@1": per_combo / len(audio), "truncated_queries": int(te.truncated.sum())}
    for k in (1, 5, 10):
        res[f"R@{k}"] = float(hit[:, :k].any(1).mean())
    top1 = [combos[c] for c in top_combo[:, 0]]
    want = [combos[c] for c in q_combo]
    kind_ok = np.array([a.kind == b.kind for a, b in zip(top1, want)])
    res["kind_R@1"] = float(kind_ok.mean())
    for attr in ("loudness", "pitch", "speed"):
        rows = [(a.attributes[attr] == b.attributes[attr]) for a, b, ok in zip(top1, want, kind_ok)
                if ok and attr in b.attributes]
        res[f"{attr}_acc_given_kind"] = float(np.mean(rows)) if rows else None
        res[f"{attr}_n"] = len(rows)
    # per-kind R@1 (worst ones are where to look)
    per_kind = {}
    for k in sw.KIND_NAMES:
        m = np.array([w.kind == k for w in want])
        per_kind[k] = float(hit[m, 0].mean())
    res["worst_kinds_R@1"] = dict(sorted(per_kind.items(), key=lambda kv: kv[1])[:6])
    # Diagnostic: the same audios queried with the TRAIN phrasings (seen in training, audio unseen):
    # the gap to the held-out R@1 is what the wording costs, the rest is the audio side.
    tr_texts, tr_combo = [], []
    for ci, spec in enumerate(combos):
        for t in sw.captions(spec, "train"):
            tr_texts.append(t)
            tr_combo.append(ci)
    tr_sims = tenc(tr_texts).embeddings @ audio.T
    tr_top = clip_combo[np.argsort(-tr_sims, axis=1, kind="stable")[:, :5]]
    res["train_phrasings_R@1"] = float((tr_top[:, 0] == np.asarray(tr_combo)).mean())
    res["train_phrasings_R@5"] = float((tr_top == np.asarray(tr_combo)[:, None]).any(1).mean())
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def long_audio(model: str, out: Path, seed: int, n_audios: int, window_s: float) -> dict:
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.pipeline import run_command
    from larcq_ray.config import PipelineConfig

    t0 = time.time()
    clips = out / "heldout_clips"
    n_clips = n_audios * 5 + 20  # max_clip_uses 1: enough clips for 5 per audio
    if not (clips / "captions.csv").is_file():
        sw.write_clip_dataset(clips, n_clips, seed=seed, sample_rate=SR, duration_s=(2.0, 5.0), split="heldout")
    bench = out / "benchmark"
    tag = f"w{window_s:g}"
    cfg = PipelineConfig.model_validate({
        "run_dir": str(out / f"run_{tag}"),
        "stages": (["synthesize"] if not (bench / "queries.csv").is_file() else []) + ["index", "search", "evaluate"],
        "synthesize": {"captions_csv": str(clips / "captions.csv"), "audio_dir": str(clips / "audio"),
                       "out_dir": str(bench), "n_audios": n_audios, "clips_per_audio": [3, 5], "seed": seed,
                       "gap_s": 0.5, "max_clip_uses": 1, "query_caption": "random"},
        "data": {"benchmark": str(bench)},
        "model": {"name_or_path": model, "device": "cpu", "local_files_only": True},
        "index": {"chunking": {"mode": "fixed", "window_s": window_s, "overlap_s": 0.0, "min_chunk_s": 1.0},
                  "whole_file": True, "batch_size": 8, "num_actors": 1, "files_per_decode_task": 4,
                  "commit_every_files": 16},
        "search": {"query_chunking": "columns", "top_k": 10},
        "ray": {"num_cpus": 4},
    })
    run_command("run", cfg)
    metrics = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    return {"metrics": metrics, "run_dir": cfg.run_dir, "benchmark": str(bench), "wall_s": round(time.time() - t0, 1)}


def _mode_table(metrics: dict) -> dict[str, dict]:
    """{mode: {R@1, R@5, R@10} in percent} from metrics.json ({mode: retrieval_metrics})."""
    out = {}
    for m, v in metrics.items():
        if isinstance(v, dict) and any(str(k).startswith("R@") for k in v):
            out[m] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a CLAP folder (default: the demo's committed model, assembled under --out)")
    p.add_argument("--out", default="/tmp/larcq_sw_quality")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--per-combo", type=int, default=2)
    p.add_argument("--audios", type=int, default=50)
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--skip-long", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = str(Path(args.model).resolve())
    else:
        from larcq_ray.offline.demo_clap import assemble_demo_clap

        model = str(assemble_demo_clap(out / "demo_clap"))
    report = {"model": model, "args": vars(args)}

    if not args.skip_single:
        r = single_event(model, args.seed, args.per_combo)
        report["single_event"] = r
        print("\n=== (a) single event, held-out phrasings, fresh clips ===")
        print(f"{r['n_queries']} queries x {r['n_audios']} audios ({r['n_combos']} kind+attribute combinations, "
              f"chance R@1 {100 * r['chance_R@1']:.1f} %); hit = a top-k audio with the query's kind AND attributes")
        print(f"R@1 {100 * r['R@1']:.1f} %   R@5 {100 * r['R@5']:.1f} %   R@10 {100 * r['R@10']:.1f} %   "
              f"(target R@1 >= 80 %: {'met' if r['R@1'] >= 0.8 else 'NOT met'})")
        print(f"kind-only R@1 {100 * r['kind_R@1']:.1f} %; attribute right when the kind is: " + ", ".join(
            f"{a} {100 * r[a + '_acc_given_kind']:.1f} % (n={r[a + '_n']})" for a in ("loudness", "pitch", "speed")
            if r[a + "_acc_given_kind"] is not None))
        print(f"diagnostic, same audios, TRAIN phrasings: R@1 {100 * r['train_phrasings_R@1']:.1f} %  "
              f"R@5 {100 * r['train_phrasings_R@5']:.1f} %")
        print("worst kinds (R@1):", ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["worst_kinds_R@1"].items()))

    if not args.skip_long:
        r = long_audio(model, out, args.seed + 1, args.audios, args.window_s)
        report["long_audio"] = r
        table = _mode_table(r["metrics"])
        print(f"\n=== (b) long audio: {args.audios} audios of 3-5 held-out clips, gap 0.5 s, "
              f"chunks {args.window_s:g} s (run {r['run_dir']}) ===")
        print(f"{'mode':<24} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
        for m, v in table.items():
            print(f"{m:<24} " + " ".join(f"{float(v.get(k, float('nan'))):6.1f}" for k in ("R@1", "R@5", "R@10")))
        if "none" in table and "audio-max+query-sum" in table:
            d = float(table["audio-max+query-sum"]["R@1"]) - float(table["none"]["R@1"])  # metrics.json: percent
            print(f"audio-max+query-sum - none, R@1: {d:+.1f} points (claim >= +15: {'met' if d >= 15 else 'NOT met'})")
        else:
            print("metrics.json layout not recognised; raw:", json.dumps(r["metrics"])[:2000])
    (out / f"quality_report_w{args.window_s:g}.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nreport: {out / f'quality_report_w{args.window_s:g}.json'}")


if __name__ == "__main__":
    main()
