"""Caption metrics (the COCO / DCASE captioning set) on generated captions, offline.

`caption_metrics(predictions, references)` scores one predicted caption per item against that
item's reference captions with the kept library pycocoevalcap (the COCO caption evaluation code that
DCASE's AAC baselines, SLAM-AAC and DRCap report with):

- BLEU-1..4, ROUGE-L and CIDEr-D: pure Python, always run;
- METEOR 1.5: a Java program shipped with pycocoevalcap; runs where a `java` runs (OpenJDK 17 works);
- SPICE: a Java program that needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads
  at first use. larcq_ray never downloads them: SPICE (and SPIDEr = mean of CIDEr-D and SPICE) run
  only where the models are already in pycocoevalcap's spice/lib folder.

Captions are tokenized as the COCO code does (Stanford PTBTokenizer, lower-cased, punctuation
removed) where Java runs, else by a plain Python tokenizer (lower-case, punctuation removed), and the
result says which. Scores are pycocoevalcap's own scale (0-1; CIDEr-D 0-10). What could not run is
reported with the reason, never raised: a training run must not end over a metric.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Hashable, Iterable, Optional

log = logging.getLogger(__name__)

METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice")
# What pycocoevalcap's PTBTokenizer wrapper drops after tokenizing.
_PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "-lrb-", "-rrb-", "-lcb-", "-rcb-",
                 ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_JAVA_TIMEOUT_S = 600


def _package_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return f"pycocoevalcap {version('pycocoevalcap')}"
    except Exception:  # noqa: BLE001 - informational only
        return "pycocoevalcap"


_java_ok: dict[str, Optional[str]] = {}
_java_lock = threading.Lock()


def java_problem(java: str = "java") -> Optional[str]:
    """None when `java -version` runs, else why not (cached per executable)."""
    with _java_lock:
        if java not in _java_ok:
            exe = shutil.which(java)
            if exe is None:
                _java_ok[java] = f"no {java!r} executable on PATH (METEOR and SPICE are Java programs)"
            else:
                try:
                    r = subprocess.run([exe, "-version"], capture_output=True, timeout=60)
                    _java_ok[java] = None if r.returncode == 0 else f"`{java} -version` exited {r.returncode}"
                except (OSError, subprocess.TimeoutExpired) as e:
                    _java_ok[java] = f"`{java} -version` failed: {type(e).__name__}: {e}"
        return _java_ok[java]


# ---------------------------------------------------------------- tokenization

def simple_tokenize(text: str) -> str:
    """Lower-case, punctuation out, single spaces: the fallback when Java cannot run."""
    text = re.sub(r"[^\w\s']", " ", text.lower().replace("\n", " "))
    return " ".join(w for w in text.replace("'", " '").split() if w not in _PUNCTUATIONS)


def _ptb_tokenize(texts: list[str], pkg: Path, java: str) -> list[str]:
    """Stanford PTBTokenizer (pycocoevalcap's jar) over stdin: one line per text, lower-cased,
    punctuation removed as pycocoevalcap does (without its temporary file in the package folder)."""
    jar_dir = pkg / "tokenizer"
    lines = [t.replace("\n", " ").replace("\r", " ") for t in texts]
    r = subprocess.run([java, "-cp", "stanford-corenlp-3.4.1.jar", "edu.stanford.nlp.process.PTBTokenizer",
                        "-preserveLines", "-lowerCase"], input="\n".join(lines) + "\n", cwd=jar_dir,
                       capture_output=True, text=True, timeout=_JAVA_TIMEOUT_S)
    if r.returncode != 0:
        raise RuntimeError(f"PTBTokenizer exited {r.returncode}: {r.stderr.strip()[-200:]}")
    out = r.stdout.split("\n")
    if len(out) < len(lines) or any(x.strip() for x in out[len(lines):]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} captions")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCTUATIONS) for line in out[:len(lines)]]


def tokenize_all(texts: list[str], java: str = "java") -> tuple[list[str], str]:
    """(tokenized texts, which tokenizer did it)."""
    pkg = _package_dir()
    problem = java_problem(java) if pkg is not None else "pycocoevalcap is not installed"
    if problem is None and not (pkg / "tokenizer" / "stanford-corenlp-3.4.1.jar").is_file():
        problem = "pycocoevalcap's stanford-corenlp-3.4.1.jar is missing"
    if problem is None:
        try:
            return _ptb_tokenize(texts, pkg, java), "ptb"
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            problem = f"{type(e).__name__}: {str(e)[:200]}"
    return [simple_tokenize(t) for t in texts], f"simple (PTBTokenizer not used: {problem})"


# ---------------------------------------------------------------- METEOR and SPICE

def _meteor(gts: dict, res: dict, pkg: Path, java: str) -> float:
    """METEOR 1.5 as pycocoevalcap's wrapper runs it, in a process we close ourselves."""
    cmd = [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
    p = subprocess.Popen(cmd, cwd=pkg / "meteor", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        eval_line = "EVAL"
        for k in gts:
            hyp = res[k][0].replace("|||", "").replace("  ", " ")
            p.stdin.write(("SCORE ||| " + " ||| ".join(r.replace("|||", "") for r in gts[k]) + " ||| " + hyp + "\n")
                          .encode())
            p.stdin.flush()
            eval_line += " ||| " + p.stdout.readline().decode().strip()
        p.stdin.write((eval_line + "\n").encode())
        p.stdin.flush()
        for _ in gts:  # per-item scores, then the corpus score
            p.stdout.readline()
        line = p.stdout.readline().decode().strip()
        return float(line)
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        p.kill()
        p.wait()


def spice_problem(java: str = "java") -> Optional[str]:
    pkg = _package_dir()
    if pkg is None:
        return "pycocoevalcap is not installed"
    lib = pkg / "spice" / "lib"
    need = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    if not all(p.is_file() for p in need):
        return (f"needs the Stanford CoreNLP 3.6.0 models in {lib} (pycocoevalcap downloads them from "
                "nlp.stanford.edu at first use: run `python -m pycocoevalcap.spice.get_stanford_models` "
                "once where there is network; larcq_ray never downloads them)")
    return java_problem(java)


def _spice(gts: dict, res: dict) -> float:
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(gts, res)
    return float(score)


# ---------------------------------------------------------------- the entry point

def caption_metrics(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
                    metrics: Optional[Iterable[str]] = None, *, java: str = "java") -> dict:
    """Score `predictions` (id -> caption) against `references` (id -> its captions).

    Items are the ids with a prediction and at least one non-empty reference. Returns
    {"scores": {"BLEU_1".."BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr"} (those that ran),
    "ran": [...], "not_run": {metric: why}, "n_items", "n_without_reference", "tokenizer", "library"}.
    """
    wanted = list(dict.fromkeys(metrics if metrics is not None else METRICS))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; known: {list(METRICS)}")
    ids = [k for k in predictions if [r for r in references.get(k, []) if str(r).strip()]]
    out: dict = {"scores": {}, "ran": [], "not_run": {}, "n_items": len(ids),
                 "n_without_reference": len(predictions) - len(ids), "tokenizer": None, "library": None}
    pkg = _package_dir()
    if pkg is None:
        out["not_run"] = {m: "pycocoevalcap is not installed (pip install pycocoevalcap)" for m in wanted}
        return out
    out["library"] = _library_version()
    if not ids:
        out["not_run"] = {m: "no item has both a prediction and a reference" for m in wanted}
        return out

    # One tokenizer call for every text: predictions, then each item's references.
    keys = [str(k) for k in ids]
    texts = [str(predictions[k] or "") for k in ids]
    refs_per = [[str(r) for r in references[k] if str(r).strip()] for k in ids]
    tokens, out["tokenizer"] = tokenize_all(texts + [r for rs in refs_per for r in rs], java)
    res = {k: [tokens[i]] for i, k in enumerate(keys)}
    gts, pos = {}, len(keys)
    for k, rs in zip(keys, refs_per):
        gts[k] = tokens[pos:pos + len(rs)]
        pos += len(rs)

    def run(name: str, fn) -> None:
        try:
            fn()
            out["ran"].append(name)
        except Exception as e:  # noqa: BLE001 - a metric that breaks is reported, not raised
            out["not_run"][name] = f"{type(e).__name__}: {str(e).strip()[:200]}"

    def bleu():
        from pycocoevalcap.bleu.bleu import Bleu

        score, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out["scores"].update({f"BLEU_{i + 1}": float(s) for i, s in enumerate(score)})

    def rouge():
        from pycocoevalcap.rouge.rouge import Rouge

        out["scores"]["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])

    def cider():
        # pycocoevalcap's Cider is CIDEr-D: Gaussian length penalty (sigma 6), clipped counts, x10
        from pycocoevalcap.cider.cider import Cider

        out["scores"]["CIDEr_D"] = float(Cider().compute_score(gts, res)[0])

    for name in wanted:
        if name == "bleu":
            run(name, bleu)
        elif name == "rouge_l":
            run(name, rouge)
        elif name == "cider_d":
            run(name, cider)
        elif name == "meteor":
            problem = java_problem(java)
            if problem:
                out["not_run"][name] = problem
            else:
                run(name, lambda: out["scores"].__setitem__("METEOR", _meteor(gts, res, pkg, java)))
        elif name == "spice":
            problem = spice_problem(java)
            if problem:
                out["not_run"][name] = problem
            else:
                run(name, lambda: out["scores"].__setitem__("SPICE", _spice(gts, res)))
    if "CIDEr_D" in out["scores"] and "SPICE" in out["scores"]:
        out["scores"]["SPIDEr"] = (out["scores"]["CIDEr_D"] + out["scores"]["SPICE"]) / 2
    elif "spice" in wanted:
        out["not_run"]["spider"] = "SPIDEr is the mean of CIDEr-D and SPICE: both must run"
    return out
