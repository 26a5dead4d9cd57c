"""The index job's two Ray Data stages.

1. `DecodeChunkStage` (CPU tasks): decode + resample to the model's rate, cut chunks, compute
   CLAP mel features. One row per chunk (+ one whole-file row), or one `failed` row per file.
2. `ClapEmbedStage` (actor pool, one model per actor, a GPU each where the cluster has GPUs):
   features -> L2-normalized embeddings.

Where the mel features are computed is `index.features` (`feature_settings`): in the decode tasks
with transformers' extractor (cpu-numpy) or the batched clap_features code (cpu-torch), or in the
actor on its device from the 48 kHz float32 samples the decode task ships (device). Each row says
how its `features` bytes read (`feat_format`), so the actor takes any mix.

Every row carries audio_id, n_rows (rows of its file), status and error, so the driver can
regroup files and no row is lost.

Long files (over `stream_over_s`) are streamed: checked block by block (core.audio.probe_audio),
then decoded, resampled, cut and featurized window by window (stream_audio), their rows emitted in
groups of `rows_per_batch` (process_batch then returns a generator of batches, which Ray Data
streams on), so a worker's memory does not grow with a file's length. The driver regroups a file's
rows across batches by `n_rows`, which is known before the first row is emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import numpy as np

from larcq_ray.core.stage import Batch, Resources


def _failed_row(audio_id: str, decoded=None, error: str = "") -> dict:
    return {
        "audio_id": audio_id,
        "kind": "failed",
        "chunk_index": -2,
        "start_s": 0.0,
        "end_s": 0.0,
        "features": b"",
        "feat_shape": np.zeros(3, dtype=np.int64),
        "feat_format": "",
        "is_longer": False,
        "duration_s": float(getattr(decoded, "duration_s", 0.0)),
        "sample_rate": int(getattr(decoded, "sample_rate", 0)),
        "channels": int(getattr(decoded, "channels", 0)),
        "n_rows": 1,
        "n_chunks": 0,
        "status": "failed",
        "error": error or getattr(decoded, "error", ""),
        "warning": "; ".join(getattr(decoded, "warnings", [])),
    }


# Files longer than this are streamed. Below it the whole-file path is kept as it was (its output is
# the reference the streamed path is tested against); its memory is ~2.5 GB per 10 min of audio,
# mostly the whole-file CLAP features (float64 waveform, complex STFT of every frame).
STREAM_OVER_S = 120.0
ROWS_PER_BATCH = 32  # rows (~256 KB of features each) per batch emitted while streaming a file

# How a row's `features` bytes are to be read (its `feat_format`): a log-mel (C, frames, mels) in
# float32 or float16, or a float32 waveform at the model's rate whose features the actor computes.
MEL_F32, MEL_F16, WAVE_F32 = "mel-f32", "mel-f16", "wave-f32"
FEATURE_MODES = ("cpu-numpy", "cpu-torch", "device")


def _actors_on_gpu(actor_gpus, device: str) -> bool:
    if device == "cpu":
        return False
    if actor_gpus is None or actor_gpus == "auto":  # index.num_gpus_per_actor None: 1 where the cluster has GPUs
        from larcq_ray.core.stage import cluster_gpus

        return cluster_gpus() > 0
    return float(actor_gpus) > 0


def resolve_features(setting: str, actor_gpus, device: str = "auto") -> str:
    """index.features "auto" -> "device" where the embedding actors get a GPU, else "cpu-torch".

    Measured (benchmarks/bench_features.py): batched torch features cost a fraction of transformers'
    numpy extractor per chunk on a CPU core; on a GPU node, "device" leaves the decode tasks only
    decoding and resampling, at the price of shipping samples (1.9 MB a 10-s chunk, not 128 KB)."""
    if setting != "auto":
        return setting
    return "device" if _actors_on_gpu(actor_gpus, device) else "cpu-torch"


def feature_settings(setting: str, actor_gpus, device: str = "auto") -> dict:
    """DecodeChunkStage's `features` and `mel_dtype` for an index config. cpu-torch ships float16
    mel (half the bytes; embeddings within cosine 0.999999) where the actors are on a GPU, whose
    model runs in bf16/fp16 anyway, and float32 (the reference's exact values) to CPU actors."""
    return {"features": resolve_features(setting, actor_gpus, device),
            "mel_dtype": "float16" if _actors_on_gpu(actor_gpus, device) else "float32"}


def columns(rows: list[dict]) -> Batch:
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if isinstance(vals[0], np.ndarray):
            out[k] = np.stack(vals)
        else:
            out[k] = np.asarray(vals, dtype=object if isinstance(vals[0], (str, bytes)) else None)
    return out


@dataclass
class DecodeChunkStage:
    model: str
    fusion_seed: int
    local_files_only: bool
    chunking: dict
    whole_file: bool
    silence_threshold_db: float
    memory_mb: int
    name: str = "decode"
    stream_over_s: float = STREAM_OVER_S  # files longer than this (source duration) are streamed
    rows_per_batch: int = ROWS_PER_BATCH
    features: str = "cpu-numpy"  # a resolved index.features: cpu-numpy | cpu-torch | device
    mel_dtype: str = "float16"  # cpu-torch: the dtype its mel travels in
    _fz: Any = field(default=None, init=False, repr=False, compare=False)
    _tf: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        # Memory is declared so the scheduler packs decode tasks by memory too (a 120 s file at
        # 48 kHz plus its features is ~0.5 GB; longer files are streamed in bounded memory). It also
        # keeps this stage's remote args distinct from the actor's, so Ray Data never fuses decoding
        # into the (GPU) model actor.
        return Resources(cpus=1, memory_mb=self.memory_mb)

    def setup(self) -> None:
        from larcq_ray.models.clap import cached_featurizer

        self._fz = cached_featurizer(self.model, self.fusion_seed, self.local_files_only)
        if self.features not in FEATURE_MODES:
            raise ValueError(f"index.features {self.features!r} is not one of {FEATURE_MODES}")
        if self.features != "cpu-numpy":
            from larcq_ray.models.clap_features import ClapFeatureSpec, TorchClapFeatures

            self._tf = TorchClapFeatures(ClapFeatureSpec.from_extractor(self._fz.extractor, self._fz.fusion), "cpu")

    def _payloads(self, clips: list) -> list[dict]:
        """Each clip's features columns, all clips of a file in one call (one batched STFT for cpu-torch)."""
        if self.features == "cpu-numpy":
            return [_mel_payload(self._fz(c), MEL_F32) for c in clips]
        if self.features == "cpu-torch":
            from larcq_ray.models.clap import AudioFeatures

            parts, longer = self._tf.compact(clips, self.fusion_seed)  # (1 or 4, frames, mels) each
            fmt = MEL_F16 if self.mel_dtype == "float16" else MEL_F32
            return [_mel_payload(AudioFeatures(f.numpy(), bool(lg)), fmt) for f, lg in zip(parts, longer)]
        from larcq_ray.models.clap_features import plan_clip

        out = []
        for c in clips:  # device: the samples the actor needs, padded or cropped here (cheap, and seeded alike)
            p = plan_clip(c, self._tf.spec, self.fusion_seed)
            w = np.asarray(c if p.wave is None else p.wave, dtype=np.float32)
            out.append({"features": w.tobytes(), "feat_shape": np.asarray([1, 1, len(w)], dtype=np.int64),
                        "is_longer": False, "feat_format": WAVE_F32})  # is_longer: the actor decides
        return out

    def _is_long(self, path: str) -> bool:
        import soundfile as sf

        try:
            info = sf.info(path)
        except Exception:  # noqa: BLE001 - the whole-file path says what is wrong with it
            return False
        # Streaming needs more than a few CLAP windows (the fusion crops); never the case for files this long.
        floor_s = 3 * self._fz.max_samples / self._fz.sample_rate
        return info.frames > 0 and info.frames / info.samplerate > max(self.stream_over_s, floor_s)

    def process_batch(self, batch: Batch) -> Union[Batch, Iterator[Batch]]:
        """One batch of rows; a generator of batches when a file of `batch` is long (streamed)."""
        items = [(str(a), str(p)) for a, p in zip(batch["audio_id"], batch["path"])]
        long = [self._is_long(p) for _, p in items]
        if not any(long):
            return columns([row for (a, p) in items for row in self._file_rows(a, p)])
        return self._stream_batches(items, long)

    def _stream_batches(self, items, long) -> Iterator[Batch]:
        pending: list[dict] = []
        for (audio_id, path), is_long in zip(items, long):
            for row in (self._long_file_rows if is_long else self._file_rows)(audio_id, path):
                pending.append(row)
                if len(pending) >= self.rows_per_batch:
                    yield columns(pending)
                    pending = []
        if pending:
            yield columns(pending)

    def _common(self, dec, n_rows: int, n_chunks: int) -> dict:
        return {
            "duration_s": dec.duration_s, "sample_rate": dec.sample_rate, "channels": dec.channels,
            "n_rows": n_rows, "n_chunks": n_chunks, "status": "ok", "error": "",
            "warning": "; ".join(dec.warnings),
        }

    def _pieces(self, n: int, sr: int) -> tuple[list[tuple[int, int]], bool]:
        from larcq_ray.index.chunking import chunk_spans

        ch = self.chunking
        if ch["mode"] == "none":
            return [], True  # the whole file is the one embedding
        return chunk_spans(n, sr, ch["mode"], ch["window_s"], ch["overlap_s"], ch["min_chunk_s"]), self.whole_file

    @staticmethod
    def _row(audio_id: str, idx: int, s: int, e: int, sr: int, payload: dict, common: dict) -> dict:
        return {
            "audio_id": audio_id, "kind": "whole" if idx < 0 else "chunk", "chunk_index": idx,
            "start_s": s / sr, "end_s": e / sr, **payload, **common,
        }

    def _file_rows(self, audio_id: str, path: str) -> list[dict]:
        """A file decoded whole: its rows (or its one failed row)."""
        from larcq_ray.core.audio import decode_audio

        fz = self._fz
        try:
            dec = decode_audio(path, fz.sample_rate, self.silence_threshold_db)
            if dec.status != "ok":
                return [_failed_row(audio_id, dec)]
            x, sr = dec.samples, fz.sample_rate
            spans, with_whole = self._pieces(len(x), sr)
            pieces = ([(-1, 0, len(x))] if with_whole else []) + [(i, s, e) for i, (s, e) in enumerate(spans)]
            common = self._common(dec, len(pieces), len(spans))
            payloads = self._payloads([x[s:e] for _, s, e in pieces])
            return [self._row(audio_id, idx, s, e, sr, pl, common) for (idx, s, e), pl in zip(pieces, payloads)]
        except Exception as e:  # a bug or odd file must cost one file, never the job
            return [_failed_row(audio_id, error=f"internal: {type(e).__name__}: {e}"[:300])]

    def _long_file_rows(self, audio_id: str, path: str) -> Iterator[dict]:
        """A long file window by window: checked first (so n_rows is known and a bad file is one
        failed row), then each chunk's row as soon as its samples have arrived, the whole-file row
        last. Memory: one block, one chunk window and the whole-file summary, whatever the length."""
        from larcq_ray.core.audio import probe_audio, stream_audio

        fz, sr = self._fz, self._fz.sample_rate
        try:
            dec = probe_audio(path, sr, self.silence_threshold_db)
        except Exception as e:  # noqa: BLE001
            yield _failed_row(audio_id, error=f"internal: {type(e).__name__}: {e}"[:300])
            return
        if dec.status != "ok":
            yield _failed_row(audio_id, dec)
            return
        n = dec.n_samples
        spans, with_whole = self._pieces(n, sr)
        n_rows = len(spans) + (1 if with_whole else 0)
        common = self._common(dec, n_rows, len(spans))
        done: set[int] = set()
        try:
            whole = StreamedWholeFeatures(fz, n) if with_whole else None
            buf, off, got, nxt = np.zeros(0, dtype=np.float32), 0, 0, 0  # buf holds samples [off, got)
            for block in stream_audio(path, sr):
                if whole is not None:
                    whole.feed(block)
                buf = np.concatenate([buf, block]) if len(buf) else block
                got += len(block)
                while nxt < len(spans) and spans[nxt][1] <= got:
                    s, e = spans[nxt]
                    yield self._row(audio_id, nxt, s, e, sr, self._payloads([buf[s - off:e - off]])[0], common)
                    done.add(nxt)
                    nxt += 1
                keep_from = spans[nxt][0] if nxt < len(spans) else got
                if keep_from > off:
                    buf, off = buf[keep_from - off:], keep_from
            if got != n:
                raise RuntimeError(f"decoded {got} samples, expected {n}")
            if whole is not None:
                yield self._row(audio_id, -1, 0, n, sr, _mel_payload(whole.result(), MEL_F32), common)
                done.add(-1)
        except Exception as e:  # rows already sent stay; the missing ones come back failed, so the file fails
            err = f"internal: {type(e).__name__}: {e}"[:300]
            missing = [i for i in ([-1] if with_whole else []) + list(range(len(spans))) if i not in done]
            for _ in missing:
                yield {**_failed_row(audio_id, dec, error=err), "n_rows": n_rows}

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        return columns([_failed_row(str(a), error=reason) for a in batch["audio_id"]])


def _mel_payload(f, fmt: str) -> dict:
    # Fusion input repeats one mel 4x unless the clip was really fused: ship it once.
    feats = f.input_features if f.is_longer else f.input_features[:1]
    feats = feats.astype(np.float16 if fmt == MEL_F16 else np.float32, copy=False)
    return {"features": feats.tobytes(), "feat_shape": np.asarray(feats.shape, dtype=np.int64),
            "is_longer": bool(f.is_longer), "feat_format": fmt}


class StreamedWholeFeatures:
    """A long waveform's whole-file CLAP features, fed block by block in bounded memory.

    The same features as `AudioFeaturizer(whole waveform)`, without holding the waveform or its
    spectrogram: for a fused CLAP, the log-mel frames are computed as the samples arrive (the same
    per-frame STFT as transformers' `spectrogram`, with its centre reflect padding done here) and
    only the frames the fusion input uses are kept: the three seeded 10 s crops and the <= 2 frames
    each row of the whole-file shrink interpolates (torch's bilinear, align_corners=False, index and
    weight arithmetic reproduced in float32). For an unfused CLAP (rand_trunc), only the seeded
    10 s crop is kept. Memory: ~5 x 1001 mel frames, whatever the length.
    """

    def __init__(self, fz, n: int):
        from larcq_ray.models.clap import _seeded_numpy

        ext = fz.extractor
        self.fz, self.n = fz, n
        self.max = int(fz.max_samples)
        if n <= self.max + ext.hop_length:
            raise ValueError(f"{n} samples is too short to stream the whole-file features")
        self.fusion = fz.truncation == "fusion"
        with _seeded_numpy(fz.fusion_seed):  # the same draws, in the same order, as the extractor's
            if self.fusion:
                self.hop, self.win = int(ext.hop_length), int(ext.fft_window_size)
                self.T = 1 + n // self.hop  # frames of the centre-padded spectrogram
                self.C = self.max // self.hop + 1
                ranges = np.array_split(np.arange(self.T - self.C + 1), 3)
                ranges = [r if len(r) else [0] for r in ranges]
                self.starts = [int(np.random.choice(r)) for r in ranges]
            else:
                self.crop_at = int(np.random.randint(0, n - self.max + 1))
        if self.fusion:
            self._plan_shrink()
            self.crops = np.zeros((3, self.C, ext.feature_size), dtype=np.float32)
            self.window = None
            self.pbuf = np.zeros(0, dtype=np.float32)  # centre-padded signal from frame `self.f` on
            self.f = 0
            self.head = np.zeros(0, dtype=np.float32)  # the first samples, until the left pad can be made
            self.tail = np.zeros(0, dtype=np.float32)  # the last win // 2 + 1 samples, for the right pad
        else:
            self.crop = np.zeros(self.max, dtype=np.float32)
        self.pos = 0  # samples fed

    def _plan_shrink(self) -> None:
        T, C = self.T, self.C
        f32 = np.float32
        scale = f32(T) / f32(C)
        src = scale * (np.arange(C, dtype=f32) + f32(0.5)) - f32(0.5)
        src = np.where(src < 0, f32(0), src).astype(f32)
        i0 = np.minimum(np.floor(src).astype(np.int64), T - 1)
        lam1 = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
        i1 = i0 + (i0 < T - 1)
        self.need = np.unique(np.concatenate([i0, i1]))
        self.kept = np.zeros((len(self.need), self.fz.extractor.feature_size), dtype=np.float32)
        self.i0, self.i1 = np.searchsorted(self.need, i0), np.searchsorted(self.need, i1)
        self.lam0, self.lam1 = (f32(1) - lam1).astype(f32), lam1

    def feed(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32)
        s = self.pos
        self.pos += len(block)
        if not self.fusion:
            lo, hi = max(s, self.crop_at), min(self.pos, self.crop_at + self.max)
            if lo < hi:
                self.crop[lo - self.crop_at:hi - self.crop_at] = block[lo - s:hi - s]
            return
        half = self.win // 2
        self.tail = np.concatenate([self.tail, block])[-(half + 1):]
        if self.head is not None:
            self.head = np.concatenate([self.head, block])
            if len(self.head) <= half:
                return
            block, self.head = np.concatenate([self.head[1:half + 1][::-1], self.head]), None  # np.pad reflect
        self.pbuf = np.concatenate([self.pbuf, block])
        self._frames()

    def _frames(self) -> None:
        from transformers.audio_utils import spectrogram, window_function

        m = min(1 + (len(self.pbuf) - self.win) // self.hop, self.T - self.f) if len(self.pbuf) >= self.win else 0
        if m <= 0:
            return
        if self.window is None:
            self.window = window_function(self.win, "hann")
        seg = self.pbuf[:(m - 1) * self.hop + self.win].astype(np.float64)
        mel = spectrogram(seg, self.window, frame_length=self.win, hop_length=self.hop, power=2.0, center=False,
                          mel_filters=self.fz.extractor.mel_filters, log_mel="dB").T  # (m, mels), as the extractor
        lo, hi = self.f, self.f + m
        for k, st in enumerate(self.starts):
            a, b = max(lo, st), min(hi, st + self.C)
            if a < b:
                self.crops[k, a - st:b - st] = mel[a - lo:b - lo]
        j0, j1 = np.searchsorted(self.need, [lo, hi])
        self.kept[j0:j1] = mel[self.need[j0:j1] - lo]
        self.f = hi
        self.pbuf = self.pbuf[m * self.hop:]

    def result(self):
        from larcq_ray.models.clap import AudioFeatures

        if self.pos != self.n:
            raise RuntimeError(f"fed {self.pos} samples, expected {self.n}")
        if not self.fusion:
            return self.fz(self.crop)  # a crop of exactly max samples: the extractor's rand_trunc features
        half = self.win // 2
        self.pbuf = np.concatenate([self.pbuf, self.tail[-2::-1][:half]])  # np.pad reflect at the end
        self._frames()
        if self.f != self.T:
            raise RuntimeError(f"computed {self.f} mel frames, expected {self.T}")
        shrink = self.lam0[:, None] * self.kept[self.i0] + self.lam1[:, None] * self.kept[self.i1]
        feats = np.stack([shrink.astype(np.float32), *self.crops]).astype(np.float32)
        return AudioFeatures(feats, not np.array_equal(feats[0], feats[1]))


@dataclass
class ClapEmbedStage:
    model: str
    device: str
    dtype: str
    local_files_only: bool
    adapter: Optional[str]
    actors: int
    cpus: float
    gpus: Union[float, str]
    torch_threads: Optional[int]
    name: str = "embed"
    fusion_seed: int = 0  # crops of "wave-f32" rows (index.features: device), as the decode tasks would draw them
    _encoder: Any = field(default=None, init=False, repr=False, compare=False)
    _tf: Any = field(default=None, init=False, repr=False, compare=False)

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus, actors=self.actors, torch_threads=self.torch_threads)

    def setup(self) -> None:
        from larcq_ray.models.clap import ClapAudioEncoder

        self._encoder = ClapAudioEncoder(self.model, self.device, self.dtype, self.local_files_only,
                                         adapter=self.adapter)
        self._channels = 4 if self._encoder.model.config.audio_config.enable_fusion else 1

    def _features(self, raw: bytes, shape, fmt: str = MEL_F32) -> np.ndarray:
        f = np.frombuffer(raw, dtype=np.float16 if fmt == MEL_F16 else np.float32).reshape(shape)
        return np.repeat(f, self._channels, axis=0) if f.shape[0] == 1 and self._channels > 1 else f

    def _torch_features(self):
        if self._tf is None:
            from larcq_ray.models.clap import cached_featurizer
            from larcq_ray.models.clap_features import ClapFeatureSpec, TorchClapFeatures

            ext = cached_featurizer(self.model, self.fusion_seed, self.local_files_only).extractor
            self._tf = TorchClapFeatures(ClapFeatureSpec.from_extractor(ext, self._channels == 4),
                                         self._encoder.device)
        return self._tf

    def _batch_features(self, batch: Batch, ok: np.ndarray):
        """The ok rows' model input: (n, C, frames, mels) on the encoder's device, and is_longer."""
        import torch

        fmts = batch.get("feat_format")
        fmts = [MEL_F32 if fmts is None else str(fmts[i]) for i in ok]
        longer = np.asarray(batch["is_longer"][ok], dtype=bool).copy()
        waves = [j for j, f in enumerate(fmts) if f == WAVE_F32]
        if not waves:  # mel rows only: as before
            return np.stack([self._features(batch["features"][i], batch["feat_shape"][i], f)
                             for i, f in zip(ok, fmts)]), longer
        tf = self._torch_features()
        clips = [np.frombuffer(batch["features"][ok[j]], dtype=np.float32) for j in waves]
        wf, wl = tf(clips, self.fusion_seed)
        feats = torch.empty((len(ok),) + tuple(wf.shape[1:]), dtype=torch.float32, device=wf.device)
        feats[waves] = wf
        longer[waves] = wl
        mels = [j for j in range(len(ok)) if j not in set(waves)]
        if mels:
            feats[mels] = torch.as_tensor(np.stack([self._features(batch["features"][ok[j]],
                                                                   batch["feat_shape"][ok[j]], fmts[j])
                                                    for j in mels]).astype(np.float32)).to(wf.device)
        return feats, longer

    def process_batch(self, batch: Batch) -> Batch:
        ok = np.flatnonzero(batch["status"] == "ok")
        emb_bytes = np.empty(len(batch["status"]), dtype=object)
        emb_bytes[:] = b""
        if len(ok):
            feats, longer = self._batch_features(batch, ok)
            emb = self._encoder(feats, longer)
            for j, i in enumerate(ok):
                emb_bytes[i] = emb[j].astype(np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k not in ("features", "feat_shape", "feat_format")}
        out["embedding"] = emb_bytes
        return out

    def failed_batch(self, batch: Batch, reason: str) -> Batch:
        out = {k: v for k, v in batch.items() if k not in ("features", "feat_shape", "feat_format")}
        status = np.asarray(batch["status"], dtype=object).copy()
        error = np.asarray(batch["error"], dtype=object).copy()
        was_ok = status == "ok"  # rows that failed earlier keep their own reason
        status[was_ok], error[was_ok] = "failed", reason
        emb = np.empty(len(status), dtype=object)
        emb[:] = b""
        out.update(status=status, error=error, embedding=emb)
        return out
