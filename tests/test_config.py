from pathlib import Path

import pytest

from larcq_ray.config import load_config
from larcq_ray.core.errors import LarcqError


def test_file_values_and_overrides_change_only_their_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nindex:\n  batch_size: 4\n")
    cfg = load_config(p, ["index.chunking.window_s=5", "search.modes=[none, audio-max]", "index.batch_size=8"])
    # Everything the file and the overrides leave alone keeps its default; an override beats the
    # file; values are parsed as YAML (a number, a list).
    expected = load_config(None).model_dump()
    expected["run_dir"] = "r"
    expected["index"]["batch_size"] = 8
    expected["index"]["chunking"]["window_s"] = 5.0
    expected["search"]["modes"] = ["none", "audio-max"]
    assert cfg.model_dump() == expected
    assert load_config(p).index.batch_size == 4


@pytest.mark.parametrize("override,match", [
    ("index.batch_size", "KEY=VALUE"),
    ("run_dir.x=1", "run_dir is not a section"),
    ("index.chunk_size=3", r"index.chunk_size: unknown key"),
])
def test_bad_override_is_one_clear_error(tmp_path, override, match):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\n")
    with pytest.raises(LarcqError, match=match):
        load_config(p, [override])


def test_a_dumped_config_loads_back_the_same(tmp_path):
    from larcq_ray.config import dump_config

    cfg = load_config(None, ["run_dir=s3://bucket/run", "search.modes=[audio-max]", "serve.num_gpus=auto"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("text,match", [
    ("index:\n  batchsize: 4\n", r"index.batchsize: unknown key"),
    ("index:\n  chunking:\n    mode: sliding\n", r"index.chunking.mode"),
    ("index:\n  chunking:\n    window_s: 5\n    overlap_s: 5\n", "overlap_s"),
    ("search:\n  modes: [audio-max, audio-mean]\n", "audio-mean"),
    ("index:\n  batch_size: 0\n", r"index.batch_size"),
    ("- a\n- b\n", "mapping"),
    ("index: [\n", "not valid YAML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(LarcqError, match=match):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(LarcqError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_config_validates_and_round_trips(path, tmp_path):
    from larcq_ray.config import dump_config

    cfg = load_config(path)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_configs_ships_example_configs():
    assert sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), "configs/ should ship example configs"
