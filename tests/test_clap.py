"""The CLAP path on tiny real transformers models built offline."""

import json
import shutil

import numpy as np
import pytest

from larcq_ray.models.clap import AudioFeaturizer, ClapAudioEncoder, ClapTextEncoder, load_tokenizer
from larcq_ray.core.errors import LarcqError
from larcq_ray.models.model_card import read_model_card


def noise(seconds, seed=0, sr=48000):
    return (np.random.default_rng(seed).standard_normal(int(seconds * sr)) * 0.1).astype(np.float32)


def test_tokenizer_is_real_bpe(tiny_clap):
    tok = load_tokenizer(str(tiny_clap))
    assert len(tok) > 200
    ids = tok("a dog barks loudly")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids and 3 <= len(ids) - 2 <= 8  # merged into real subwords


def test_empty_tokenizer_is_refused(tiny_clap, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clap, broken)
    for f in ["vocab.json", "merges.txt", "tokenizer.json"]:
        (broken / f).unlink(missing_ok=True)
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "RobertaTokenizer"
    (broken / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LarcqError, match="only .* entries|cannot load CLAP tokenizer"):
        load_tokenizer(str(broken))


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(LarcqError, match="not a local folder"):
        AudioFeaturizer(str(tmp_path / "no_such_model"))
    with pytest.raises(LarcqError, match="cannot load CLAP"):
        ClapAudioEncoder("nobody/no-such-clap-model", device="cpu", local_files_only=True)


def test_fusion_is_deterministic_and_batch_invariant(tiny_clap):
    fz = AudioFeaturizer(str(tiny_clap), fusion_seed=0)
    long = noise(25.0)
    a, b = fz(long), fz(long)
    assert a.is_longer and np.array_equal(a.input_features, b.input_features)
    short = fz(noise(4.0, seed=1))
    # The extractor alone marks a lone short clip as "longer" (fusion branch); we do not.
    assert short.is_longer is False
    enc = ClapAudioEncoder(str(tiny_clap), device="cpu")
    together = enc(np.stack([a.input_features, short.input_features]), np.array([True, False]))
    alone = enc(a.input_features[None], np.array([True]))
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    other_seed = AudioFeaturizer(str(tiny_clap), fusion_seed=7)(long)
    assert not np.array_equal(other_seed.input_features, a.input_features)  # the seed is what fixes the crops


def test_unfused_model_uses_plain_crops(tiny_clap_unfused):
    fz = AudioFeaturizer(str(tiny_clap_unfused))
    assert fz.truncation == "rand_trunc"
    f1, f2 = fz(noise(25.0)), fz(noise(25.0))
    assert f1.input_features.shape[0] == 1 and np.array_equal(f1.input_features, f2.input_features)
    emb = ClapAudioEncoder(str(tiny_clap_unfused), device="cpu")(f1.input_features[None], np.array([False]))
    assert emb.shape == (1, 64)


def test_text_truncation_is_flagged_not_dropped(tiny_clap):
    enc = ClapTextEncoder(str(tiny_clap), device="cpu")
    out = enc(["a dog barks", "a dog barks loudly " * 60])
    assert out.embeddings.shape == (2, 64)
    assert out.truncated.tolist() == [False, True]
    assert enc.max_tokens == 77


def test_model_card_marks_untrained(tiny_clap):
    assert read_model_card(str(tiny_clap))["trained"] is False
