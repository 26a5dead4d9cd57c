"""Decode one audio file to mono float32 at the model's rate, or say exactly why not.

libsndfile (soundfile) decodes; soxr resamples. Every outcome is a `DecodedAudio`
with a status, so a batch job can record bad files instead of crashing on them.

Two ways to read a file, with the same checks and the same samples:
- `decode_audio`: the whole file in memory at once (short files);
- `probe_audio` then `stream_audio`: the checks block by block without keeping samples, then the
  samples block by block (soxr.ResampleStream gives exactly soxr.resample's output), so an
  hours-long recording never sits in memory whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

# Rates under this lose most of what CLAP's mel filters (up to 14 kHz at 48 kHz) look at.
LOW_RATE_HZ = 16000
# Frames per block when reading block by block (~5.5 s at 48 kHz; 2 MB per channel as float32).
BLOCK_FRAMES = 1 << 18
_READ_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError)


@dataclass
class DecodedAudio:
    status: str  # "ok" or "failed"
    samples: np.ndarray | None = None  # mono float32 at target_rate when ok
    duration_s: float = 0.0  # of the source file (as decoded)
    sample_rate: int = 0  # of the source file
    channels: int = 0  # of the source file
    error: str = ""  # why it failed: "<kind>: <detail>"
    warnings: list[str] = field(default_factory=list)
    n_samples: int = 0  # length at target_rate when ok (probe_audio: what stream_audio will yield)


def _wav_declared_frames(path: Path) -> int | None:
    """Frames the RIFF header's data chunk declares; None if not a plain PCM/float WAV.

    libsndfile silently shortens a truncated WAV to what the file holds, so we read
    the header ourselves to tell a short file from a cut one.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                hdr = f.read(8)
                if len(hdr) < 8:
                    return None
                cid, size = hdr[:4], struct.unpack("<I", hdr[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) < 14:
                        return None
                    block_align = struct.unpack("<H", fmt[12:14])[0]
                    if size % 2:
                        f.read(1)
                elif cid == b"data":
                    if not block_align or size == 0xFFFFFFFF:  # streamed WAVs leave the size unset
                        return None
                    return size // block_align
                else:
                    f.seek(size + (size % 2), 1)
    except OSError:
        return None


def resampled_length(frames: int, rate: int, target_rate: int) -> int:
    """How many samples soxr (resample or a flushed ResampleStream) makes of `frames` at `rate`."""
    return frames if rate == target_rate else int(frames * target_rate / rate + 0.5)


def _open(path: Path) -> tuple[DecodedAudio, object | None]:
    """(an outcome to fill in, sf.info) or (the failed outcome, None)."""
    if not path.is_file():
        return DecodedAudio("failed", error="missing: file not found"), None
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        if path.stat().st_size == 0:
            return DecodedAudio("failed", error="empty: file has 0 bytes"), None
        return DecodedAudio("failed", error=f"unreadable: not an audio format libsndfile decodes ({_short(e)})"), None
    out = DecodedAudio("failed", sample_rate=int(info.samplerate), channels=int(info.channels))
    if info.frames == 0:
        out.error = "empty: no audio frames"
        return out, None
    return out, info


def _finish(out: DecodedAudio, path: Path, frames: int, n_bad: int, channels: int, peak: float,
            silence_threshold_db: float, target_rate: int) -> bool:
    """The checks on a decoded file (whole or block by block): sets error / warnings; True if ok."""
    sr = out.sample_rate
    if frames == 0:
        out.error = "empty: no audio frames"
        return False
    out.duration_s = frames / sr
    declared = _wav_declared_frames(path)
    if declared is not None and declared > frames:
        out.warnings.append(f"truncated: header declares {declared} frames, file holds {frames}, indexed what is there")
    if n_bad:
        out.error = f"invalid samples: {n_bad} NaN/Inf values"
        return False
    if channels > 1:
        out.warnings.append(f"downmixed {channels} channels to mono")
    if peak <= 10 ** (silence_threshold_db / 20):
        # Silence is valid audio ("an empty room" is a fair query): indexed, with a warning.
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.1f}"
        out.warnings.append(f"silent: peak {level} dBFS is below {silence_threshold_db:g} dBFS, indexed anyway")
    if sr < LOW_RATE_HZ:
        out.warnings.append(f"low sample rate {sr} Hz: nothing above {sr // 2} Hz to index")
    out.n_samples = resampled_length(frames, sr, target_rate)
    out.status = "ok"
    return True


def _mono(data: np.ndarray) -> np.ndarray:
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def decode_audio(path: str | Path, target_rate: int, silence_threshold_db: float = -80.0) -> DecodedAudio:
    """The whole file in memory: mono float32 samples at target_rate, or why not."""
    path = Path(path)
    out, info = _open(path)
    if info is None:
        return out
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except _READ_ERRORS as e:
        out.error = f"truncated or corrupt: decoding stopped ({_short(e)})"
        return out
    bad = int((~np.isfinite(data)).sum())
    mono = _mono(data)
    peak = float(np.max(np.abs(mono))) if len(mono) and not bad else 0.0
    if not _finish(out, path, data.shape[0], bad, data.shape[1], peak, silence_threshold_db, target_rate):
        return out
    if sr != target_rate:
        mono = soxr.resample(mono, sr, target_rate, quality="HQ").astype(np.float32, copy=False)
    out.samples = np.ascontiguousarray(mono, dtype=np.float32)
    out.n_samples = len(out.samples)
    return out


def probe_audio(path: str | Path, target_rate: int, silence_threshold_db: float = -80.0,
                block_frames: int = BLOCK_FRAMES) -> DecodedAudio:
    """decode_audio's checks and outcome, read block by block and keeping no samples (`samples` is
    None; `n_samples` is how many stream_audio yields). NaN/Inf counts and the peak are per block."""
    path = Path(path)
    out, info = _open(path)
    if info is None:
        return out
    frames, bad, peak = 0, 0, 0.0
    try:
        with sf.SoundFile(str(path)) as f:
            for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                frames += block.shape[0]
                nb = int((~np.isfinite(block)).sum())
                bad += nb
                if not bad and block.shape[0]:
                    peak = max(peak, float(np.max(np.abs(_mono(block)))))
    except _READ_ERRORS as e:
        out.error = f"truncated or corrupt: decoding stopped ({_short(e)})"
        return out
    _finish(out, path, frames, bad, out.channels, peak, silence_threshold_db, target_rate)
    return out


def stream_audio(path: str | Path, target_rate: int, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Mono float32 blocks at target_rate; concatenated, exactly decode_audio's samples. Check the
    file with probe_audio first: this raises on what probe_audio reports as a failure."""
    with sf.SoundFile(str(path)) as f:
        sr = int(f.samplerate)
        rs = None if sr == target_rate else soxr.ResampleStream(sr, target_rate, 1, dtype="float32", quality="HQ")
        for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
            mono = np.ascontiguousarray(_mono(block), dtype=np.float32)
            if rs is not None:
                mono = rs.resample_chunk(mono, last=False)
            if len(mono):
                yield mono
        if rs is not None:
            tail = rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if len(tail):
                yield np.asarray(tail, dtype=np.float32)


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]
