import numpy as np
import pytest
import soundfile as sf

from conftest import tone, write_bad_audio
from larcq_ray.core.audio import decode_audio, probe_audio, stream_audio


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    expect = write_bad_audio(d)
    expect["silent.wav"] = ""  # silence is valid audio: indexed, with a warning
    return d, expect


def test_each_kind_of_bad_audio_gets_its_reason(bad_dir):
    d, expect = bad_dir
    for name, kind in expect.items():
        out = decode_audio(d / name, 48000)
        if kind:
            assert out.status == "failed", name
            assert out.error.startswith(kind + ":"), (name, out.error)
            assert out.samples is None
        else:
            assert out.status == "ok", (name, out.error)
            assert out.samples.dtype == np.float32 and out.samples.ndim == 1
            assert np.isfinite(out.samples).all()


def test_silent_audio_is_indexed_with_a_warning(bad_dir, tmp_path):
    d, _ = bad_dir
    out = decode_audio(d / "silent.wav", 48000)
    assert out.status == "ok" and out.error == "" and len(out.samples) == 48000
    assert out.warnings == ["silent: peak -inf dBFS is below -80 dBFS, indexed anyway"]
    sf.write(tmp_path / "quiet.wav", tone(1.0, 48000, amp=1e-5), 48000, subtype="FLOAT")  # -100 dBFS
    quiet = decode_audio(tmp_path / "quiet.wav", 48000)
    assert quiet.status == "ok" and quiet.warnings[0].startswith("silent: peak -100.0 dBFS")
    assert decode_audio(d / "good.wav", 48000).warnings == []


def test_block_by_block_checks_and_samples_equal_the_whole_file_ones(bad_dir):
    d, expect = bad_dir
    for name in expect:
        whole = decode_audio(d / name, 48000)
        probe = probe_audio(d / name, 48000, block_frames=1000)  # several blocks per file
        got = (probe.status, probe.error, probe.warnings, probe.duration_s, probe.sample_rate, probe.channels)
        assert got == (whole.status, whole.error, whole.warnings, whole.duration_s, whole.sample_rate,
                       whole.channels), name
        assert probe.samples is None
        if whole.status == "ok":
            assert probe.n_samples == whole.n_samples == len(whole.samples), name
            streamed = np.concatenate(list(stream_audio(d / name, 48000, block_frames=1000)))
            np.testing.assert_array_equal(streamed, whole.samples, err_msg=name)


def test_nan_in_a_late_block_fails_the_file(tmp_path):
    x = tone(3.0, 48000)
    x[140000] = np.inf
    sf.write(tmp_path / "late.wav", x, 48000, subtype="FLOAT")
    out = probe_audio(tmp_path / "late.wav", 48000, block_frames=4096)
    assert out.status == "failed" and out.error == "invalid samples: 1 NaN/Inf values"


def test_warnings_say_what_was_done(bad_dir):
    d, _ = bad_dir
    assert "downmixed 2 channels" in decode_audio(d / "stereo.flac", 48000).warnings[0]
    assert "low sample rate 7350" in decode_audio(d / "odd_rate.wav", 48000).warnings[0]
    tr = decode_audio(d / "truncated.wav", 48000)
    assert tr.warnings and tr.warnings[0].startswith("truncated: header declares 96000 frames")


def test_resampling_keeps_duration_and_content(tmp_path):
    sf.write(tmp_path / "a.wav", tone(2.0, 16000, freq=1000), 16000)
    out = decode_audio(tmp_path / "a.wav", 48000)
    assert out.sample_rate == 16000 and abs(out.duration_s - 2.0) < 1e-6
    assert len(out.samples) == 96000
    spec = np.abs(np.fft.rfft(out.samples))
    assert abs(np.argmax(spec) * 48000 / len(out.samples) - 1000) < 2  # the tone survives at 1 kHz


def test_missing_file(tmp_path):
    out = decode_audio(tmp_path / "nope.wav", 48000)
    assert out.status == "failed" and out.error.startswith("missing:")


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"),
                                         ("MP3", "MPEG_LAYER_III")])
def test_every_corpus_format_decodes(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, tone(2.0, 44100, freq=440), 44100, format=fmt, subtype=subtype)
    out = decode_audio(path, 48000)
    assert out.status == "ok", out.error
    assert abs(out.duration_s - 2.0) < 0.06  # mp3 encoders pad a few ms
    spec = np.abs(np.fft.rfft(out.samples))
    assert abs(np.argmax(spec) * 48000 / len(out.samples) - 440) < 3
