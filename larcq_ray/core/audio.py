"""Decode one audio file to mono float32 at the model's rate, or say exactly why not.

libsndfile (soundfile) decodes; soxr resamples. Every outcome is a `DecodedAudio`
with a status, so a batch job can record bad files instead of crashing on them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

# Rates under this lose most of what CLAP's mel filters (up to 14 kHz at 48 kHz) look at.
LOW_RATE_HZ = 16000


@dataclass
class DecodedAudio:
    status: str  # "ok" or "failed"
    samples: np.ndarray | None = None  # mono float32 at target_rate when ok
    duration_s: float = 0.0  # of the source file (as decoded)
    sample_rate: int = 0  # of the source file
    channels: int = 0  # of the source file
    error: str = ""  # why it failed: "<kind>: <detail>"
    warnings: list[str] = field(default_factory=list)


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


def decode_audio(path: str | Path, target_rate: int, silence_threshold_db: float = -80.0) -> DecodedAudio:
    path = Path(path)
    if not path.is_file():
        return DecodedAudio("failed", error="missing: file not found")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        if path.stat().st_size == 0:
            return DecodedAudio("failed", error="empty: file has 0 bytes")
        return DecodedAudio("failed", error=f"unreadable: not an audio format libsndfile decodes ({_short(e)})")

    out = DecodedAudio("failed", sample_rate=int(info.samplerate), channels=int(info.channels))
    if info.frames == 0:
        out.error = "empty: no audio frames"
        return out
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        out.error = f"truncated or corrupt: decoding stopped ({_short(e)})"
        return out
    if data.shape[0] == 0:
        out.error = "empty: no audio frames"
        return out
    out.duration_s = data.shape[0] / sr

    declared = _wav_declared_frames(path)
    if declared is not None and declared > data.shape[0]:
        out.warnings.append(
            f"truncated: header declares {declared} frames, file holds {data.shape[0]}; indexed what is there"
        )

    bad = ~np.isfinite(data)
    if bad.any():
        out.error = f"invalid samples: {int(bad.sum())} NaN/Inf values"
        return out
    if data.shape[1] > 1:
        out.warnings.append(f"downmixed {data.shape[1]} channels to mono")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]

    peak = float(np.max(np.abs(mono)))
    if peak <= 10 ** (silence_threshold_db / 20):
        level = "-inf" if peak == 0 else f"{20 * np.log10(peak):.1f}"
        out.error = f"silent: peak {level} dBFS is below {silence_threshold_db:g} dBFS"
        return out

    if sr < LOW_RATE_HZ:
        out.warnings.append(f"low sample rate {sr} Hz: nothing above {sr // 2} Hz to index")
    if sr != target_rate:
        mono = soxr.resample(mono, sr, target_rate, quality="HQ").astype(np.float32, copy=False)
    out.samples = np.ascontiguousarray(mono, dtype=np.float32)
    out.status = "ok"
    return out


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]
