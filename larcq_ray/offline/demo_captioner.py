"""The demo captioner: a prefix-lm captioner (the demo CLAP's audio tower, frozen -> linear connector
-> a small Qwen2 decoder) trained on the sound world's TRAINING phrasings, committed under
demo_captioner_weights/ and reproduced by `benchmarks/train_sound_world_captioner.py` (which runs
`larcq-ray train-captioner`).

The committed folder holds the connector, the decoder and its tokenizer (what training changed); its
encoder is the demo CLAP, which `assemble_demo_captioner` points it at.

How well it names events (`kind_accuracy`): clips of every (kind, attributes) combination rendered
with a seed training never used are captioned. A caption names a kind when it is exactly one of the
sound world's training phrasings (every synonym combination) and every event spec with that phrasing
has that one kind; it names the kind and attributes when, in addition, the clip's own spec is among
them. Anything else (a phrasing that is no training phrasing, or one shared by several kinds) counts
as wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from larcq_ray.offline import sound_world

WEIGHTS_DIR = Path(__file__).with_name("demo_captioner_weights")
ENCODER_PLACEHOLDER = "../model"  # the committed captioner.json: the demo CLAP beside the captioner folder
CLIP_SECONDS = (2.0, 5.0)
SAMPLE_RATE = 48000


def _spec_key(spec) -> tuple:
    return spec.kind, tuple(sorted(spec.attributes.items()))


def phrasing_index() -> dict[str, set[tuple]]:
    """Every training phrasing -> the (kind, attributes) specs it describes."""
    index: dict[str, set[tuple]] = {}
    for spec in sound_world.all_event_specs():
        for c in sound_world.captions(spec, "train", synonyms="all"):
            index.setdefault(c, set()).add(_spec_key(spec))
    return index


def training_phrasings() -> list[str]:
    return list(phrasing_index())


def named(caption: str, index: dict[str, set[tuple]]) -> Optional[tuple[str, set[tuple]]]:
    """(the one kind the caption names, the specs it fits), or None when it names no single kind."""
    hit = index.get(" ".join(caption.strip().split()))
    if not hit or len({k for k, _ in hit}) != 1:
        return None
    return next(iter(hit))[0], hit


def assemble_demo_captioner(out_dir: str | Path, clap_dir: str | Path, weights_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Copy the committed captioner to `out_dir`, its encoder set to the assembled demo CLAP `clap_dir`."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(weights_dir, out)
    cfg_path = out / "captioner.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["encoder"]["name_or_path"] = str(Path(clap_dir).resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def eval_clips(seed: int, per_combo: int) -> tuple[list, list[np.ndarray]]:
    """`per_combo` clips of every (kind, attributes) combination, rendered with `seed`."""
    rng = np.random.default_rng(seed)
    specs = [s for s in sound_world.all_event_specs() for _ in range(per_combo)]
    waves = [sound_world.render(s, rng, float(rng.uniform(*CLIP_SECONDS)), SAMPLE_RATE) for s in specs]
    return specs, waves


def kind_accuracy(captioner_dir: str | Path, seed: int = 999, per_combo: int = 2, batch_size: int = 32,
                  num_beams: int = 1, max_new_tokens: int = 32) -> dict:
    """Caption clips rendered with `seed` and score them by the rule in this module's docstring."""
    import soxr

    from larcq_ray.caption.prefix_lm import PrefixLm

    lm = PrefixLm.load(captioner_dir, local_files_only=True)
    specs, waves = eval_clips(seed, per_combo)
    if lm.sample_rate != SAMPLE_RATE:
        waves = [soxr.resample(w, SAMPLE_RATE, lm.sample_rate).astype(np.float32) for w in waves]
    captions: list[str] = []
    for i in range(0, len(waves), batch_size):
        captions += lm.generate(lm.featurize(waves[i:i + batch_size]), num_beams=num_beams,
                                max_new_tokens=max_new_tokens)
    index = phrasing_index()
    n_named = n_kind = n_full = 0
    per_kind: dict[str, list[int]] = {}
    for spec, cap in zip(specs, captions):
        got = named(cap, index)
        ok = got is not None and got[0] == spec.kind
        n_named += got is not None
        n_kind += ok
        n_full += bool(ok and _spec_key(spec) in got[1])
        per_kind.setdefault(spec.kind, [0, 0])
        per_kind[spec.kind][0] += ok
        per_kind[spec.kind][1] += 1
    n = len(specs)
    return {"n_clips": n, "seed": seed, "names_one_kind": n_named / n, "kind_accuracy": n_kind / n,
            "kind_attr_accuracy": n_full / n, "per_kind": {k: a / b for k, (a, b) in sorted(per_kind.items())},
            "rule": "a caption names a kind when it is one of the sound world's training phrasings (all synonym "
                    "combinations) and every spec with that phrasing has that one kind",
            "examples": [{"kind": s.kind, "caption": c} for s, c in list(zip(specs, captions))[::max(1, n // 8)]]}
