"""The committed demo captioner (prefix-lm on the demo CLAP's audio tower, trained on the sound world's
training phrasings by benchmarks/train_sound_world_captioner.py) names the events of clips it
never saw: rendered with seed 999, which training never used."""

from __future__ import annotations

import json

import pytest

from larcq_ray.offline import demo_captioner as dc

# Measured at export (provenance.json): kind 0.85+ on 2 clips per combination; the test captions 1.
MIN_KIND_ACCURACY = 0.75
MIN_KIND_ATTR_ACCURACY = 0.65


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    from larcq_ray.offline.demo_clap import assemble_demo_clap

    root = tmp_path_factory.mktemp("demo_captioner")
    clap = assemble_demo_clap(root / "model")
    return dc.assemble_demo_captioner(root / "captioner", clap)


def test_naming_rule():
    index = dc.phrasing_index()
    low = next(c for c, specs in index.items() if {k for k, _ in specs} == {"low_tone"})
    assert dc.named(low, index)[0] == "low_tone"
    assert dc.named("  " + low.replace(" ", "  ") + " ", index)[0] == "low_tone"  # spacing does not matter
    assert dc.named(low + " and a dog barks", index) is None  # not a training phrasing
    assert dc.named("", index) is None


def test_the_committed_folder_is_small_and_says_how_it_was_made():
    size = sum(p.stat().st_size for p in dc.WEIGHTS_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    prov = json.loads((dc.WEIGHTS_DIR / "provenance.json").read_text())
    assert prov["command"].startswith("python benchmarks/train_sound_world_captioner.py")
    assert prov["eval"]["kind_accuracy"] >= 0.8  # the figure the README quotes


def test_kind_accuracy_on_unseen_clips(captioner):
    m = dc.kind_accuracy(captioner, seed=999, per_combo=1)
    print(json.dumps({k: v for k, v in m.items() if k != "per_kind"}, indent=1))
    assert m["n_clips"] == len(dc.sound_world.all_event_specs())
    assert m["kind_accuracy"] >= MIN_KIND_ACCURACY, m
    assert m["kind_attr_accuracy"] >= MIN_KIND_ATTR_ACCURACY, m
