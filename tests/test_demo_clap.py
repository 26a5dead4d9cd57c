"""The demo CLAP: MiniLM grafted into the CLAP text tower, frozen training, multi-positive loss,
export of the trained weights and their reassembly, and the committed model's retrieval quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from larcq_ray.core.errors import LarcqError

SMALL_AUDIO = dict(dim=32, audio_depths=[1, 1], audio_heads=[1, 2], patch_embeds_hidden_size=8,
                   audio_patch_size=8, audio_window_size=4)


def _minilm() -> Path:
    from larcq_ray.offline.demo_clap import minilm_path

    return minilm_path()


@pytest.fixture(scope="module")
def grafted(tmp_path_factory) -> Path:
    from larcq_ray.models.fresh_clap import build_fresh_clap

    return build_fresh_clap(tmp_path_factory.mktemp("grafted"), [], text_from=_minilm(), seed=0, **SMALL_AUDIO)


def test_grafted_text_tower_returns_minilm_hidden_states(grafted):
    import torch
    from transformers import AutoModel

    from larcq_ray.models.clap import ClapTextEncoder, load_clap_model, load_tokenizer

    model = load_clap_model(str(grafted), device="cpu", local_files_only=True)
    tok = load_tokenizer(str(grafted), local_files_only=True)
    bert = AutoModel.from_pretrained(str(_minilm()), local_files_only=True).eval()
    texts = ["a loud bell rings", "someone knocks slowly on a wooden door, quietly, again and again"]
    enc = tok(texts, padding=True, return_tensors="pt")  # padded: positions of both rows must line up
    with torch.no_grad():
        ours = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        ref = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].bool()
    assert float((ours - ref)[mask].abs().max()) < 1e-4
    # The project's own text encoder loads the folder (WordPiece tokenizer, 77-token limit).
    out = ClapTextEncoder(str(grafted), device="cpu", local_files_only=True)(texts)
    assert out.embeddings.shape == (2, 32) and out.truncated.tolist() == [False, False]


def test_graft_refuses_a_non_bert_encoder(tiny_clap_unfused, tmp_path):
    from larcq_ray.models.fresh_clap import build_fresh_clap

    with pytest.raises(LarcqError, match="only BERT-family"):
        build_fresh_clap(tmp_path / "m", [], text_from=tiny_clap_unfused, **SMALL_AUDIO)
    with pytest.raises(LarcqError, match="no config.json"):
        build_fresh_clap(tmp_path / "m", [], text_from=tmp_path / "nothing_here", **SMALL_AUDIO)


def test_freeze_parameters_and_unknown_prefix(grafted):
    from larcq_ray.train.loop import build_model, freeze_parameters

    model = build_model(str(grafted), None, local_files_only=True)
    n = freeze_parameters(model, ["text_model.embeddings", "text_model.encoder"])
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert n == len(frozen) > 0
    assert all(k.startswith(("text_model.embeddings", "text_model.encoder")) for k in frozen)
    assert model.text_model.pooler.dense.weight.requires_grad and model.audio_projection.linear1.weight.requires_grad
    with pytest.raises(LarcqError, match="match no parameter"):
        freeze_parameters(model, ["text_tower."])


def test_param_groups_by_longest_prefix(grafted):
    from larcq_ray.train.loop import build_model, freeze_parameters, param_groups

    model = build_model(str(grafted), None, local_files_only=True)
    freeze_parameters(model, ["text_model.embeddings"] + [f"text_model.encoder.layer.{i}." for i in range(5)])
    groups = param_groups(model, 1e-3, {"text_model.encoder": 5e-5, "text_model.encoder.layer.5.output": 1e-5})
    assert [g["lr"] for g in groups] == [1e-3, 5e-5, 1e-5]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("text_model.encoder.layer.5.") for p in groups[1]["params"])
    assert all(".layer.5.output" in names[id(p)] for p in groups[2]["params"]) and groups[2]["params"]
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == n_trainable
    with pytest.raises(LarcqError, match="param_lr"):
        param_groups(model, 1e-3, {"text_model.encoder.layer.0.": 1e-5})  # frozen: nothing to train


def test_multi_positive_loss():
    import torch
    import torch.nn.functional as F

    from larcq_ray.train.loss import multi_positive_infonce, shared_caption_positives, symmetric_infonce

    pos = shared_caption_positives(["a", "b", "a"], [["a", "x"], ["b"], ["y", "a"]])
    assert pos.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    torch.manual_seed(0)
    lt = torch.randn(3, 3)
    la = torch.randn(3, 3)
    # only the diagonal: plain symmetric InfoNCE
    assert torch.allclose(multi_positive_infonce(lt, la, torch.eye(3, dtype=torch.bool)), symmetric_infonce(lt, la))
    # caption 0 also describes audio 2: half its target mass moves there
    t2a = torch.tensor([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    want = (-(t2a * F.log_softmax(lt, 1)).sum(1).mean() - (t2a * F.log_softmax(la, 1)).sum(1).mean()) / 2
    assert torch.allclose(multi_positive_infonce(lt, la, pos), want)
    # an audio that its shared caption ranks first is no longer a penalized negative
    lt2 = torch.tensor([[0.0, -5, 5], [-5, 5, -5], [5, -5, 0.0]])
    assert multi_positive_infonce(lt2, lt2.t(), pos) < symmetric_infonce(lt2, lt2.t())


def test_export_and_assemble_round_trip(grafted, tmp_path):
    from safetensors.torch import load_file, save_file

    from larcq_ray.models.clap import ClapTextEncoder
    from larcq_ray.offline.demo_clap import PROBE_TEXTS, WEIGHTS_FILE, assemble_demo_clap, export_demo_clap

    weights = export_demo_clap(grafted, {"command": "test"}, out_dir=tmp_path / "weights")
    stored = load_file(str(weights / WEIGHTS_FILE))
    assert not any(k.startswith("text_model.encoder.") for k in stored)  # MiniLM is not copied
    assert (weights / WEIGHTS_FILE).stat().st_size < 2e6
    model = assemble_demo_clap(tmp_path / "assembled", weights_dir=weights)
    a = ClapTextEncoder(str(model), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings
    b = ClapTextEncoder(str(grafted), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings
    assert np.allclose(a, b, atol=1e-5)
    assert json.loads((model / "larcq_model_card.json").read_text())["trained"] is True

    # weights that do not reproduce the probe embeddings are refused
    w = stored["text_projection.linear1.weight"]
    stored["text_projection.linear1.weight"] = w.flip(0).contiguous()  # (a scale would survive normalization)
    save_file(stored, str(weights / WEIGHTS_FILE))
    with pytest.raises(LarcqError, match="does not reproduce"):
        assemble_demo_clap(tmp_path / "assembled2", weights_dir=weights)


def test_export_keeps_trained_text_layers(grafted, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from larcq_ray.models.clap import ClapTextEncoder
    from larcq_ray.offline.demo_clap import DELTA_PREFIX, PROBE_TEXTS, WEIGHTS_FILE, assemble_demo_clap, export_demo_clap

    moved = tmp_path / "moved"
    shutil.copytree(grafted, moved)
    state = load_file(str(moved / "model.safetensors"))
    name = "text_model.encoder.layer.5.attention.self.query.weight"
    state[name] = state[name] + 0.05  # as if the last MiniLM layer had been fine-tuned
    save_file(state, str(moved / "model.safetensors"), metadata={"format": "pt"})
    weights = export_demo_clap(moved, {}, out_dir=tmp_path / "w")
    stored = load_file(str(weights / WEIGHTS_FILE))
    assert str(stored[DELTA_PREFIX + name].dtype) == "torch.float16"  # stored as a difference from MiniLM
    assert not [k for k in stored if "layer.4." in k or k == name]
    model = assemble_demo_clap(tmp_path / "assembled", weights_dir=weights)
    a = ClapTextEncoder(str(model), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings
    b = ClapTextEncoder(str(moved), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings
    assert np.allclose(a, b, atol=1e-4)  # float16 differences: rounding only
    assert not np.allclose(a, ClapTextEncoder(str(grafted), device="cpu", local_files_only=True)(PROBE_TEXTS).embeddings,
                           atol=1e-4)  # ... and the trained layer did change the model


def test_committed_demo_clap_retrieves_unseen_clips_from_heldout_phrasings(tmp_path):
    """The committed model, on fresh renders (a seed not used in training) of every kind, loud,
    queried with held-out phrasings: kind R@1 far above the 1/33 chance."""
    from larcq_ray.offline import sound_world as sw
    from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder, ClapTextEncoder
    from larcq_ray.offline.demo_clap import assemble_demo_clap

    model = str(assemble_demo_clap(tmp_path / "demo_clap"))
    rng = np.random.default_rng(987654)
    specs = [sw.EventSpec(k.name, {"loudness": "loud"}) for k in sw.KINDS]
    fz = AudioFeaturizer(model, local_files_only=True)
    feats = np.stack([fz(sw.render(s, rng, 4.0, 48000)).input_features for s in specs])
    audio = ClapAudioEncoder(model, device="cpu", local_files_only=True)(feats, np.zeros(len(specs), dtype=bool))
    texts = [sw.captions(s, "heldout")[0] for s in specs]
    text = ClapTextEncoder(model, device="cpu", local_files_only=True)(texts).embeddings
    top1 = (text @ audio.T).argmax(1)
    r1 = float(np.mean(top1 == np.arange(len(specs))))
    assert r1 >= 0.5, f"kind R@1 {r1:.2f} on held-out phrasings (chance {1 / len(specs):.2f})"
