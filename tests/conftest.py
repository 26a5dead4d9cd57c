"""Shared fixtures: one local Ray session and one tiny offline CLAP per test run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CAPTIONS = [
    "a dog barks loudly", "rain falls on a tin roof", "a car passes by on a wet street",
    "a high tone rings", "a low hum drones", "birds chirp in the morning", "a door creaks open",
    "white noise hisses", "a bell rings twice", "footsteps on gravel",
]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from larcq_ray.core.ray_session import _quiet_ray_data

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    _quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap"), CAPTIONS * 20, fusion=True, seed=0)


@pytest.fixture(scope="session")
def tiny_clap_unfused(tmp_path_factory) -> Path:
    from larcq_ray.offline.tiny_clap import build_tiny_clap

    return build_tiny_clap(tmp_path_factory.mktemp("tiny_clap_unfused"), CAPTIONS * 20, fusion=False, seed=1)


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_bad_audio(folder: Path) -> dict[str, str]:
    """One file per kind of bad input; returns audio_id -> expected error kind ("" = indexed)."""
    folder.mkdir(parents=True, exist_ok=True)
    expect = {}
    sf.write(folder / "good.wav", tone(3.0, 48000), 48000)
    expect["good.wav"] = ""
    (folder / "empty.wav").write_bytes(b"")
    expect["empty.wav"] = "empty"
    (folder / "not_audio.wav").write_text("this is a text file, not audio\n" * 10)
    expect["not_audio.wav"] = "unreadable"
    sf.write(folder / "zero_frames.wav", np.zeros(0, dtype=np.float32), 48000)
    expect["zero_frames.wav"] = "empty"
    sf.write(folder / "silent.wav", np.zeros(48000, dtype=np.float32), 48000)
    expect["silent.wav"] = "silent"
    nan = tone(1.0, 48000)
    nan[100:110] = np.nan
    sf.write(folder / "nan.wav", nan, 48000, subtype="FLOAT")
    expect["nan.wav"] = "invalid samples"
    sf.write(folder / "stereo.flac", tone(2.0, 44100, channels=2), 44100)
    expect["stereo.flac"] = ""  # indexed, with a downmix warning
    sf.write(folder / "odd_rate.wav", tone(2.0, 7350, freq=300), 7350)
    expect["odd_rate.wav"] = ""  # indexed, resampled, with a low-rate warning
    full = folder / "_full.flac"
    sf.write(full, tone(4.0, 48000), 48000)
    data = full.read_bytes()
    (folder / "truncated.flac").write_bytes(data[: len(data) // 2])
    full.unlink()
    expect["truncated.flac"] = "truncated or corrupt"
    sf.write(folder / "_full.wav", tone(2.0, 48000), 48000, subtype="PCM_16")
    data = (folder / "_full.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])
    (folder / "_full.wav").unlink()
    expect["truncated.wav"] = ""  # the readable half is indexed, with a truncation warning
    return expect
