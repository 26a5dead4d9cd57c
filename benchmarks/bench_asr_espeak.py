"""Real speech offline for the ASR path of `larcq-ray eval-alm`: a tiny prefix-lm ASR model trained in
minutes on a closed-vocabulary espeak-ng speech set, judged on held-out voices.

    python benchmarks/bench_asr_espeak.py [--out /tmp/larcq_asr_espeak] [--train-clips 2000]
        [--test-clips 300] [--epochs 12] [--seed 0] [--encoder-train | --encoder-frozen] [--no-baseline]

1. makes sure espeak-ng is there (installs it with apt-get when run as root; otherwise says how and
   exits 2);
2. synthesizes sentences of 2-4 words from a 26-word vocabulary (digits, colours, commands) with
   espeak-ng, trims the silence, resamples to 16 kHz (soxr) and writes WAVs (soundfile):
   - a train split in the Clotho layout (captions.csv: file_name, caption_1 = the transcript) and a
     small validation split, both spoken by TRAIN_VOICES at TRAIN_SPEEDS / TRAIN_PITCHES;
   - a test split spoken by TEST_VOICES (voice variants never heard in training, one of them on an
     accent never heard in training) at TEST_SPEEDS / TEST_PITCHES (values never used in training),
     written as a seed-004 test list (test_list.json: {"annotation": [{"testset_id", "path",
     "task": "asr", "test": transcript}]});
3. builds a tiny Whisper encoder (random weights, 3 s input, 1 layer) and a tiny Qwen2 decoder (BPE on
   the training transcripts, 2 layers of 128, random weights), writes config.yaml and runs
   `larcq-ray train-captioner` (encoder trained with the decoder by default; --encoder-frozen keeps
   it random and frozen and caches its frames);
4. runs `larcq-ray eval-alm --task asr` on the test list with the trained captioner_best, and the same
   for a baseline that cannot transcribe: the same captioner trained for one step at a negligible
   learning rate (the untrained model), plus the empty prediction scored with the same WER code;
5. prints the commands and a table, and writes results.json to --out.

Offline, no pretrained model transcribes speech; this script is what makes the ASR path's WER a
measurement rather than plumbing. The figures depend on the machine only through time.

Measured (defaults, 2 CPU cores shared with another job; 2000 train clips = 0.54 h from 60 voices,
300 test clips from 10 held-out voices, 12 epochs = 744 steps of batch 32):
    encoder trained (default):  WER 19.6%, CER 15.1%; train-captioner 720 s
        (held-out variants of trained accents: WER 16.8%; the held-out accent en-gb-x-gbcwmd: 31.9%)
    encoder frozen (random):    WER 43.9%, CER 35.1%; train-captioner 467 s (frames cached)
    untrained captioner / empty prediction: WER 100%, CER 100%
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
COMMANDS = ["go", "stop", "left", "right", "up", "down", "yes", "no", "on", "off"]
VOCAB = DIGITS + COLOURS + COMMANDS

# espeak-ng voices are "<language>+<variant>". Test voices use variants never heard in training;
# en-gb-x-gbcwmd (West Midlands) is an accent never heard in training either.
TRAIN_BASES = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029"]
TRAIN_VARIANTS = ["m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt2", "Andy", "Annie", "max"]
TEST_VOICES = ["en+m6", "en-us+f4", "en-gb-x-rp+m7", "en-us+f5", "en-029+m5", "en-gb-x-gbcwmd+m1",
               "en-gb-x-gbcwmd+f2", "en-gb-scotland+klatt3", "en+Alex", "en-us+linda"]
TRAIN_SPEEDS = [135, 155, 175, 195]  # words per minute
TEST_SPEEDS = [145, 165, 185]
TRAIN_PITCHES = [25, 40, 55, 70]  # 0-99
TEST_PITCHES = [32, 48, 62]

SAMPLE_RATE = 16000
WINDOW_S = 3.0  # the tiny Whisper's input; longer clips are dropped
PROMPT = "Transcribe:"


def ensure_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe:
        return exe
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("espeak-ng not found: installing it with apt-get", flush=True)
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "espeak-ng"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("espeak-ng")
    if not exe:
        print("error: espeak-ng is not installed and cannot be installed here (not root or no apt-get); "
              "install it (Debian/Ubuntu: sudo apt-get install espeak-ng) and run again", file=sys.stderr)
        sys.exit(2)
    return exe


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 4)))


def synthesize(exe: str, text: str, voice: str, speed: int, pitch: int, path: Path):
    """espeak-ng -> trimmed, peak-normalized 16 kHz mono WAV at `path`; its duration in s (None: failed)."""
    import numpy as np
    import soundfile as sf
    import soxr

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        r = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp.name, text],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            return None
        x, sr = sf.read(tmp.name, dtype="float32", always_2d=True)
    x = x.mean(axis=1)
    if x.size == 0:
        return None
    x = soxr.resample(x, sr, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9))
    if loud.size == 0:
        return None
    pad = int(0.05 * SAMPLE_RATE)
    x = x[max(0, loud[0] - pad): loud[-1] + pad]
    x = (0.9 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)
    dur = len(x) / SAMPLE_RATE
    if dur > WINDOW_S - 0.05:
        return None
    sf.write(str(path), x, SAMPLE_RATE, subtype="PCM_16")
    return dur


def make_split(exe: str, folder: Path, n: int, seed: int, voices: list[str], speeds: list[int],
               pitches: list[int], prefix: str) -> list[dict]:
    """n clips (fewer where espeak fails or a clip is longer than the window) under folder/audio."""
    rng = random.Random(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(f"{prefix}_{i:05d}.wav", sentence(rng), rng.choice(voices), rng.choice(speeds), rng.choice(pitches))
            for i in range(n)]

    def one(job):
        name, text, voice, speed, pitch = job
        dur = synthesize(exe, text, voice, speed, pitch, folder / "audio" / name)
        return None if dur is None else {"file_name": name, "text": text, "voice": voice, "speed": speed,
                                         "pitch": pitch, "duration_s": round(dur, 3)}

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        rows = [r for r in pool.map(one, jobs) if r is not None]
    return rows


def write_clotho(folder: Path, rows: list[dict]) -> Path:
    path = folder / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1"])
        for r in rows:
            w.writerow([r["file_name"], r["text"]])
    return path


def write_test_list(folder: Path, rows: list[dict]) -> Path:
    ann = [{"testset_id": f"espeak_asr_{i:04d}", "path": f"audio/{r['file_name']}", "task": "asr",
            "test": r["text"]} for i, r in enumerate(rows)]
    path = folder / "test_list.json"
    path.write_text(json.dumps({"annotation": ann}, indent=1))
    return path


def train_config(out: Path, run_dir: Path, name: str, encoder: Path, decoder: Path, encoder_train: bool,
                 args, *, epochs: int, lr: float, max_steps=None) -> Path:
    import yaml

    tc = {"name": name, "kind": "prefix-lm",
          "model": {"encoder": {"name_or_path": str(encoder), "type": "whisper", "train": encoder_train},
                    "connector": {"type": "linear", "k": args.k, "hidden": 256},
                    "decoder": {"name_or_path": str(decoder), "train": "full"},
                    "prompt": PROMPT},
          "data": {"captions_csv": str(out / "train" / "captions.csv"), "audio_dir": str(out / "train" / "audio"),
                   "val_csv": str(out / "val" / "captions.csv"), "val_audio_dir": str(out / "val" / "audio"),
                   "seed": args.seed},
          "epochs": epochs, "batch_size": args.batch_size, "lr": lr, "weight_decay": 0.01,
          "lr_schedule": "cosine", "warmup_steps": 30, "checkpoint_every_steps": 10_000,
          "window_s": WINDOW_S, "val_caption_items": 16, "val_max_new_tokens": 12, "metrics": ["bleu"],
          "select_best": "val_loss", "num_workers": 1, "cpus_per_worker": 1, "torch_threads": args.threads,
          "local_files_only": True}
    if max_steps is not None:
        tc["max_steps"] = max_steps
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(run_dir), "train_captioner": tc, "ray": {"num_cpus": 2}},
                                   sort_keys=False))
    return path


def eval_alm(out: Path, captioner: Path, test_list: Path, dest: Path) -> tuple[list[str], dict]:
    import yaml

    cfg = {"caption": {"backend": {"kind": "prefix-lm", "model": str(captioner), "device": "cpu",
                                   "local_files_only": True, "window_s": WINDOW_S, "max_new_tokens": 12}},
           "eval_alm": {"batch_size": 16, "cost": {"warmup_runs": 2, "timed_runs": 5, "items": 2}},
           "ray": {"num_cpus": 2}}
    cfg_path = out / f"{dest.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [_cli(), "eval-alm", "--config", str(cfg_path), "--test-list", str(test_list), "--task", "asr",
           "--out", str(dest)]
    print("running:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return cmd, json.loads((dest / "eval.json").read_text())


def per_group_wer(pred_path: Path, test_rows: list[dict]) -> dict:
    """WER of the trained model per test voice group: the held-out accent vs held-out variants of
    accents heard in training (predictions.parquet rows are in test-list order)."""
    import pyarrow.parquet as pq

    from larcq_ray.evaluate.asr_metrics import asr_metrics

    preds = pq.read_table(pred_path).to_pylist()
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for p, r in zip(preds, test_rows):
        base = r["voice"].split("+")[0]
        g = "unseen accent " + base if base not in TRAIN_BASES else "unseen variant, seen accent"
        groups.setdefault(g, ([], []))
        groups[g][0].append(p["prediction"] or "")
        groups[g][1].append(r["text"])
    return {g: {k: m[k] for k in ("wer", "cer", "n_items")}
            for g, m in ((g, asr_metrics(h, r)) for g, (h, r) in sorted(groups.items()))}


def _cli() -> str:
    return str(Path(sys.executable).with_name("larcq-ray"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/larcq_asr_espeak")
    ap.add_argument("--train-clips", type=int, default=2000)
    ap.add_argument("--val-clips", type=int, default=100)
    ap.add_argument("--test-clips", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--k", type=int, default=4, help="encoder frames stacked per prefix token")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training worker")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--encoder-train", dest="encoder_train", action="store_true", default=True,
                   help="train the tiny Whisper encoder with the decoder (default)")
    g.add_argument("--encoder-frozen", dest="encoder_train", action="store_false",
                   help="keep the random encoder frozen (its frames are computed once)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the untrained-model baseline run")
    args = ap.parse_args()

    exe = ensure_espeak()
    from larcq_ray.evaluate.asr_metrics import asr_metrics
    from larcq_ray.offline.tiny_audio_encoders import build_tiny_whisper_encoder
    from larcq_ray.offline.tiny_lm import build_tiny_causal_lm

    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_voices = [f"{b}+{v}" for b in TRAIN_BASES for v in TRAIN_VARIANTS]
    assert not set(train_voices) & set(TEST_VOICES)

    t_syn = time.time()
    splits = {}
    for split, n, seed, voices, speeds, pitches in (
            ("train", args.train_clips, args.seed, train_voices, TRAIN_SPEEDS, TRAIN_PITCHES),
            ("val", args.val_clips, args.seed + 1, train_voices, TRAIN_SPEEDS, TRAIN_PITCHES),
            ("test", args.test_clips, args.seed + 2, TEST_VOICES, TEST_SPEEDS, TEST_PITCHES)):
        folder = out / split
        manifest = folder / "manifest.json"
        if manifest.is_file():
            rows = json.loads(manifest.read_text())
        else:
            if folder.exists():
                shutil.rmtree(folder)
            rows = make_split(exe, folder, n, seed, voices, speeds, pitches, split)
            manifest.write_text(json.dumps(rows))
        splits[split] = rows
        if split == "test":
            test_list = write_test_list(folder, rows)
        else:
            write_clotho(folder, rows)
    syn_s = time.time() - t_syn
    sizes = {k: {"clips": len(v), "hours": round(sum(r["duration_s"] for r in v) / 3600, 3),
                 "voices": len({r["voice"] for r in v})} for k, v in splits.items()}
    print("data:", json.dumps(sizes), f"(synthesis {syn_s:.0f} s)", flush=True)

    enc = out / "encoder_init"
    if not (enc / "config.json").is_file():
        build_tiny_whisper_encoder(enc, seed=args.seed, chunk_length_s=int(WINDOW_S), n_mels=64, d_model=128)
    dec = out / "decoder_init"
    if not (dec / "config.json").is_file():
        texts = [r["text"] for r in splits["train"]] + [PROMPT] * 20
        build_tiny_causal_lm(dec, texts, seed=args.seed, vocab_size=300, hidden_size=128, num_layers=2)

    # The trained model.
    run_dir = out / "run"
    cfg_path = train_config(out, run_dir, "asr_espeak", enc, dec, args.encoder_train, args,
                            epochs=args.epochs, lr=args.lr)
    cmd = [_cli(), "train-captioner", "--config", str(cfg_path)]
    print("running:", shlex.join(cmd), flush=True)
    t_train = time.time()
    subprocess.run(cmd, check=True)
    train_s = time.time() - t_train
    summary = json.loads((run_dir / "train_captioner_summary.json").read_text())
    eval_cmd, ev = eval_alm(out, run_dir / "captioner_best", test_list, out / "eval_trained")

    enc_word = "trained" if args.encoder_train else "frozen random"
    rows = [{"model": f"prefix-lm, {enc_word} tiny Whisper + tiny Qwen2", "wer": ev["quality"]["wer"],
             "cer": ev["quality"]["cer"], "n": ev["quality"]["n_items"], "errors": ev["counts"]["errors"]}]
    baseline = None
    if not args.no_baseline:
        # The same captioner after one step at a negligible learning rate: the untrained model.
        b_dir = out / "run_untrained"
        b_cfg = train_config(out, b_dir, "asr_espeak_untrained", enc, dec, args.encoder_train, args,
                             epochs=1, lr=1e-9, max_steps=1)
        subprocess.run([_cli(), "train-captioner", "--config", str(b_cfg)], check=True)
        _, baseline = eval_alm(out, b_dir / "captioner_best", test_list, out / "eval_untrained")
        rows.append({"model": "untrained (same captioner, 1 step at lr 1e-9)", "wer": baseline["quality"]["wer"],
                     "cer": baseline["quality"]["cer"], "n": baseline["quality"]["n_items"],
                     "errors": baseline["counts"]["errors"]})
    refs = [r["text"] for r in splits["test"]]
    empty = asr_metrics([""] * len(refs), refs)
    rows.append({"model": "empty prediction", "wer": empty["wer"], "cer": empty["cer"], "n": empty["n_items"],
                 "errors": 0})
    # A text-only guess: the most common training transcript's words for every item.
    common = max(set(VOCAB), key=lambda w: sum(r["text"].split().count(w) for r in splits["train"]))
    guess = asr_metrics([f"{common} {common} {common}"] * len(refs), refs)
    rows.append({"model": f"constant guess '{common} {common} {common}'", "wer": guess["wer"], "cer": guess["cer"],
                 "n": guess["n_items"], "errors": 0})

    pred_path = out / "eval_trained" / "predictions.parquet"
    examples, by_group = [], {}
    try:
        import pyarrow.parquet as pq

        t = pq.read_table(pred_path).to_pylist()
        examples = [{"reference": r["reference"], "prediction": r["prediction"]} for r in t[:8]]
        by_group = per_group_wer(pred_path, splits["test"])
    except Exception as e:  # noqa: BLE001 - examples and the breakdown are informational
        print(f"(could not read {pred_path}: {e})")

    result = {"command": "python benchmarks/bench_asr_espeak.py " + shlex.join(sys.argv[1:]),
              "train_command": shlex.join(cmd), "eval_command": shlex.join(eval_cmd),
              "vocabulary": VOCAB, "data": sizes, "synthesis_s": round(syn_s, 1),
              "train_voices": train_voices, "test_voices": TEST_VOICES,
              "train_speeds": TRAIN_SPEEDS, "test_speeds": TEST_SPEEDS,
              "train_pitches": TRAIN_PITCHES, "test_pitches": TEST_PITCHES,
              "encoder_train": args.encoder_train, "epochs": args.epochs, "lr": args.lr, "k": args.k,
              "steps": summary.get("steps"), "best": summary.get("best"), "train_s": round(train_s, 1),
              "table": rows, "trained_by_test_voice_group": by_group, "cost_trained": ev.get("cost"),
              "examples": examples,
              "wall_s": round(time.time() - t0, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2))

    print()
    print("command:", result["command"])
    print("train:  ", result["train_command"])
    print("eval:   ", result["eval_command"])
    print(f"data: train {sizes['train']['clips']} clips ({sizes['train']['voices']} voices), "
          f"val {sizes['val']['clips']}, test {sizes['test']['clips']} clips ({sizes['test']['voices']} held-out "
          f"voices, held-out speeds/pitches); encoder {'trained' if args.encoder_train else 'frozen'}; "
          f"{summary.get('steps')} steps in {train_s:.0f} s")
    print(f"{'model':<52} {'WER':>7} {'CER':>7} {'n':>5} {'errors':>6}")
    for r in rows:
        wer = "n/a" if r["wer"] is None else f"{100 * r['wer']:.1f}%"
        cer = "n/a" if r["cer"] is None else f"{100 * r['cer']:.1f}%"
        print(f"{r['model']:<52} {wer:>7} {cer:>7} {r['n']:>5} {r['errors']:>6}")
    for g, m in by_group.items():
        print(f"  trained, {g}: WER {100 * m['wer']:.1f}%, CER {100 * m['cer']:.1f}% over {m['n_items']} items")
    for e in examples[:5]:
        print(f"  ref: {e['reference']!r:<40} hyp: {e['prediction']!r}")
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
