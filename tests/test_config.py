import pytest

from larcq_ray.config import load_config
from larcq_ray.errors import LarcqError


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nindex:\n  batch_size: 4\n")
    cfg = load_config(p, ["index.chunking.window_s=5", "search.modes=[none, audio-max]"])
    assert cfg.index.batch_size == 4 and cfg.index.chunking.window_s == 5.0
    assert cfg.search.modes == ["none", "audio-max"]
    assert cfg.model.name_or_path == "laion/clap-htsat-fused"


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


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ should ship example configs"
    for c in configs:
        load_config(c)
