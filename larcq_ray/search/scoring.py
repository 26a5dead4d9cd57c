"""Text-to-audio retrieval scores with chunk votes, vectorized and blocked.

A query has a whole-text embedding and chunk embeddings (its events); an audio has chunk
embeddings and optionally a whole-file one. A mode says how a (query, audio) pair is scored:

- `none`: s(query, audio whole)
- `audio-max` / `audio-sum`: max / sum over audio chunks c of s(query, c)
- `query-max` / `query-sum`: max / sum over query chunks j of s(j, audio whole)
- `audio-X+query-Y`: G[j, c] = s(j, c); reduce over c with X, then over j with Y.

Sums are plain sums (the research code's vote). Similarity is the dot product of L2-normalized
float32 embeddings. Ranking: score descending, ties by audio index ascending.

How it runs: queries in blocks, audios in blocks of about `chunk_block` chunks. Audios are
sorted by chunk count so a block is a dense (n_audios, k_max) grid (short audios padded with
one of their own chunks, which leaves a max unchanged); one matmul per block gives every
chunk-level score, and sums use summed embeddings (sum_c s(q, c) = s(q, sum_c c)). A running
top-K per query and mode is kept as int64 keys that order by (score desc, index asc), so
torch.topk is exact under ties. For gt_rank, queries are sorted by the audio block holding
their ground truth and those blocks are scored first; a row's rank counts the keys above its
ground truth's key, and blocks scored before that key is known are kept until it is. So gt_rank
and gt_score come from exactly the scores that produced the top-K.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from larcq_ray.core.errors import LarcqError
from larcq_ray.index.store import AudioEmbeddings  # noqa: F401 - part of the scoring API
from larcq_ray.search.config import MODES

if TYPE_CHECKING:  # torch is imported lazily
    import torch


# mode -> (audio side, query side); a side is "whole" (one embedding), "max" or "sum" (over chunks)
_SIDES: dict[str, tuple[str, str]] = {
    "none": ("whole", "whole"),
    "audio-max": ("max", "whole"),
    "audio-sum": ("sum", "whole"),
    "query-max": ("whole", "max"),
    "query-sum": ("whole", "sum"),
    **{f"audio-{a}+query-{q}": (a, q) for a in ("max", "sum") for q in ("max", "sum")},
}
# audio side -> what the query rows are multiplied with: whole embeddings, chunk sums, or the chunk grid
_AUDIO_COLS = {"whole": "W", "sum": "S", "max": "G"}
# Padded audio blocks are cached across query blocks when they fit in this many bytes.
_CACHE_BYTES = 512 * 2**20
_WIDEN_ROWS = 1 << 18  # float16 chunk rows widened to float32 at once when summing
# Padding a block to its longest audio may waste at most this fraction of its grid.
_MAX_PAD_WASTE = 0.25
# On CPU the grid is computed in column tiles of about this many chunks: a tile's chunk matrix and
# its grid stay in cache for the max that follows (measured 5-20% faster than one wide matmul).
_CPU_TILE_COLS = 2048
# Keys kept for query rows whose ground-truth block is scored later: at most this many bytes.
_BUFFER_BYTES = 512 * 2**20
_LO = 2**32


@dataclass
class QueryEmbeddings:
    query_ids: list[str]  # Q queries
    whole_emb: np.ndarray  # (Q, D) whole-query embedding
    chunk_emb: np.ndarray  # (QC, D) query-chunk embeddings, grouped per query
    chunk_offsets: np.ndarray  # (Q+1,) int64, every query has >= 1 chunk


@dataclass
class ModeScores:
    mode: str
    topk_index: np.ndarray  # (Q, K) int64 indices into audio_ids, K = min(top_k, A)
    topk_score: np.ndarray  # (Q, K) float32
    gt_rank: np.ndarray | None  # (Q,) int64, 1-based rank of the ground-truth audio; 0 where gt_index is -1
    gt_score: np.ndarray | None  # (Q,) float32 score of the ground truth (nan where gt_index is -1)


# ---------------------------------------------------------------- validation


def _check_modes(modes: Sequence[str], has_whole: bool) -> list[str]:
    if isinstance(modes, str):  # a bare string would iterate as characters
        modes = [modes]
    out = list(dict.fromkeys(modes))
    if not out:
        raise LarcqError(f"no scoring mode given; valid modes: {', '.join(MODES)}")
    bad = [m for m in out if m not in _SIDES]
    if bad:
        raise LarcqError(f"unknown scoring mode(s) {', '.join(map(repr, bad))}; valid modes: {', '.join(MODES)}")
    need_whole = [m for m in out if _SIDES[m][0] == "whole"]
    if need_whole and not has_whole:
        raise LarcqError(
            f"mode(s) {', '.join(need_whole)} need whole-file audio embeddings, but the index has none "
            "(index with whole-file embeddings enabled, or use only audio-* modes)"
        )
    return out


def _matrix(x: np.ndarray, name: str, rows: int | None = None, dim: int | None = None,
            keep_half: bool = False) -> np.ndarray:
    """x as a contiguous float32 matrix (float16 kept as is with keep_half: audio embeddings of a
    float16 index, widened block by block where they are used)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise LarcqError(f"{name} must be a 2-D array, got shape {x.shape}")
    if rows is not None and x.shape[0] != rows:
        raise LarcqError(f"{name} has {x.shape[0]} rows, expected {rows}")
    if dim is not None and x.shape[1] != dim:
        raise LarcqError(
            f"embedding dimension mismatch: {name} has dimension {x.shape[1]}, expected {dim} "
            "(queries and audios must be embedded by the same model)"
        )
    return np.ascontiguousarray(x, dtype=np.float16 if keep_half and x.dtype == np.float16 else np.float32)


def _offsets(off: np.ndarray, n_items: int, n_rows: int, name: str, what: str) -> np.ndarray:
    off = np.asarray(off)
    if off.ndim != 1 or len(off) != n_items + 1 or not np.issubdtype(off.dtype, np.integer):
        raise LarcqError(f"{name} must be {n_items + 1} integers (one per {what} plus one), got shape {off.shape}")
    off = off.astype(np.int64)
    if off[0] != 0 or off[-1] != n_rows:
        raise LarcqError(f"{name} must start at 0 and end at the number of chunk rows ({n_rows}), "
                         f"got {off[0]}..{off[-1]}")
    if n_items and np.diff(off).min() < 1:
        raise LarcqError(f"{name}: every {what} needs at least one chunk")
    return off


def _finite(x: np.ndarray, name: str) -> None:
    # One float64 sum instead of an isfinite mask: NaN and inf propagate, and nothing big is allocated.
    if not np.isfinite(x.sum(dtype=np.float64)):
        raise LarcqError(f"{name} contain NaN or infinite values")


# ---------------------------------------------------------------- audio blocks


@dataclass
class _Block:
    start: int  # range [start, stop) in the count-sorted audio order
    stop: int
    kmax: int  # chunks per audio after padding


def _plan_blocks(sorted_counts: np.ndarray, chunk_block: int) -> list[_Block]:
    """Cut the count-sorted audios into blocks of <= chunk_block padded chunks with little padding.

    Loops over distinct chunk counts and blocks, never over single audios.
    """
    values, starts = np.unique(sorted_counts, return_index=True)
    ends = np.append(starts[1:], len(sorted_counts))
    blocks: list[_Block] = []
    cur_start, cur_n, cur_real = 0, 0, 0

    def close(stop: int, kmax: int) -> None:
        blocks.append(_Block(cur_start, stop, kmax))

    prev_k = 0
    for k, s, e in zip(values.tolist(), starts.tolist(), ends.tolist()):
        cap = max(1, chunk_block // k)
        # Padding the open block up to k chunks per audio must stay within the size and waste limits.
        if cur_n and (cur_n >= cap or cur_n * k - cur_real > _MAX_PAD_WASTE * cur_n * k):
            close(s, prev_k)
            cur_start, cur_n, cur_real = s, 0, 0
        pos = s
        take = min(e - pos, cap - cur_n)
        cur_n, cur_real, pos = cur_n + take, cur_real + take * k, pos + take
        while pos < e:  # the open block is full
            close(pos, k)
            cur_start = pos
            take = min(e - pos, cap)
            cur_n, cur_real, pos = take, take * k, pos + take
        prev_k = k
    if cur_n:
        close(len(sorted_counts), prev_k)
    return blocks


class _AudioSide:
    """Audio tensors on the device, the block plan and the per-block padded chunk matrices."""

    def __init__(self, chunk_emb: np.ndarray, offsets: np.ndarray, whole: np.ndarray | None, need: set[str],
                 chunk_block: int, dev: torch.device):
        import torch

        counts = np.diff(offsets)
        self.order = np.argsort(counts, kind="stable")
        self.counts, self.offsets = counts, offsets
        self.blocks = _plan_blocks(counts[self.order], chunk_block)
        self.dev = dev
        self.block_of = np.empty(len(counts), dtype=np.int64)  # audio -> block, position in block
        self.pos_in_block = np.empty(len(counts), dtype=np.int64)
        for b, blk in enumerate(self.blocks):
            self.block_of[self.order[blk.start:blk.stop]] = b
        self.pos_in_block[self.order] = np.arange(len(counts)) - np.repeat(
            [blk.start for blk in self.blocks], [blk.stop - blk.start for blk in self.blocks])
        self.low = torch.from_numpy(_LO - 1 - self.order).to(dev)  # the index half of the ranking keys
        self.tile_cols = _CPU_TILE_COLS if dev.type == "cpu" else chunk_block
        chunks = _tensor(chunk_emb, dev)  # float16 stays float16 here: grid_cols widens each block
        self.chunks = chunks if "G" in need else None
        # Whole and summed embeddings in block order, so a block's rows are a slice.
        order_t = torch.from_numpy(self.order).to(dev)
        self.small: list[torch.Tensor] = []
        if "W" in need:
            self.small.append(_tensor(whole, dev).index_select(0, order_t).float())
        if "S" in need:
            self.small.append(_chunk_sums(chunks, counts).index_select(0, order_t))
        padded = sum((b.stop - b.start) * b.kmax for b in self.blocks) * chunk_emb.shape[1] * 4
        self.cache: dict[int, torch.Tensor] | None = {} if padded <= _CACHE_BYTES else None

    def tile_audios(self, b: int) -> int:
        return max(1, self.tile_cols // self.blocks[b].kmax)

    def grid_cols(self, b: int) -> torch.Tensor:
        """(kmax * n, D) chunk rows of block b, by column tile of tile_audios(b) audios; inside a
        tile of m audios chunk-major (row k*m + a), so the max over chunks reduces contiguous
        slices. Audio a's missing chunks repeat its last one, which leaves the max unchanged."""
        if self.cache is not None and b in self.cache:
            return self.cache[b]
        import torch

        blk = self.blocks[b]
        n, kmax, per = blk.stop - blk.start, blk.kmax, self.tile_audios(b)
        aud = self.order[blk.start:blk.stop]
        src = self.offsets[aud][None, :] + np.minimum(np.arange(kmax)[:, None], self.counts[aud][None, :] - 1)
        p = np.arange(n)
        a0 = p - p % per
        m = np.minimum(per, n - a0)
        dest = a0[None, :] * kmax + np.arange(kmax)[:, None] * m[None, :] + (p - a0)[None, :]
        rows = np.empty(n * kmax, dtype=np.int64)
        rows[dest.reshape(-1)] = src.reshape(-1)
        cols = self.chunks.index_select(0, torch.from_numpy(rows).to(self.dev)).float()  # no copy if float32
        if self.cache is not None:
            self.cache[b] = cols
        return cols

    def small_cols(self, b: int) -> torch.Tensor:
        """(n_small * n, D): the block's whole embeddings then its chunk sums (those needed)."""
        import torch

        blk = self.blocks[b]
        parts = [x[blk.start:blk.stop] for x in self.small]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunk_sums(chunks: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """(A, D) float32 sum of each audio's chunk rows (audio a: counts[a] consecutive rows). index_add_,
    not np.add.reduceat (~20x slower on 1M chunks); float16 rows are widened a slice at a time."""
    import torch

    seg = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(chunks.device)
    sums = torch.zeros((len(counts), chunks.shape[1]), dtype=torch.float32, device=chunks.device)
    for a in range(0, len(chunks), _WIDEN_ROWS):  # .float() of a float32 slice is the slice itself
        sums.index_add_(0, seg[a:a + _WIDEN_ROWS], chunks[a:a + _WIDEN_ROWS].float())
    return sums


def _tensor(x: np.ndarray, dev: torch.device) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # read-only arrays (e.g. from Arrow) are fine: nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x).to(dev)


# ---------------------------------------------------------------- query blocks


def _query_blocks(gt_block: np.ndarray | None, n_queries: int, query_block: int, block_audios: list[int],
                  n_modes: int) -> list[np.ndarray]:
    """Query index arrays. With ground truth, queries are sorted by the audio block that holds it and
    that block is scored first; a query block may span several such blocks while the keys it must
    keep for rows whose ground truth comes later (all its blocks but the last) fit in _BUFFER_BYTES."""
    if gt_block is None:
        return [np.arange(s, min(s + query_block, n_queries)) for s in range(0, n_queries, query_block)]
    order = np.argsort(gt_block, kind="stable")
    cap = _BUFFER_BYTES // (query_block * n_modes * 8)  # audios whose keys may be kept
    out: list[np.ndarray] = []
    cur: list[np.ndarray] = []
    cur_rows = cur_audios = 0
    # One run per audio block (and one for queries without ground truth): a loop over blocks.
    for run in np.split(order, np.flatnonzero(np.diff(gt_block[order])) + 1):
        b = int(gt_block[run[0]])
        n_b = block_audios[b] if b >= 0 else 0
        while len(run):
            if cur and (cur_rows == query_block or cur_audios > cap):
                out.append(np.concatenate(cur))
                cur, cur_rows, cur_audios = [], 0, 0
            take = run[:query_block - cur_rows]
            run = run[len(take):]
            cur.append(take)
            cur_rows, cur_audios = cur_rows + len(take), cur_audios + n_b
    if cur:
        out.append(np.concatenate(cur))
    return out


class _QueryBlock:
    """Rows a query block contributes to the matmuls, and how to reduce chunk rows per query."""

    def __init__(self, rows: np.ndarray, q_whole: torch.Tensor, q_chunks: torch.Tensor, q_off: np.ndarray,
                 grid_rows: list[str], small_rows: list[str]):
        import torch

        dev = q_whole.device
        self.n = len(rows)
        cnt = q_off[rows + 1] - q_off[rows]
        local_start = np.cumsum(cnt) - cnt
        self.n_chunks = int(cnt.sum())
        take = {"w": q_whole.index_select(0, torch.from_numpy(rows).to(dev))}
        if "c" in grid_rows or "c" in small_rows:
            chunk_rows = np.repeat(q_off[rows] - local_start, cnt) + np.arange(self.n_chunks)
            take["c"] = q_chunks.index_select(0, torch.from_numpy(chunk_rows).to(dev))
        self.grid = torch.cat([take[r] for r in grid_rows]) if grid_rows else None
        self.small = torch.cat([take[r] for r in small_rows]) if small_rows else None
        self.jmax = int(cnt.max())
        self.uniform = bool((cnt == self.jmax).all())
        if not self.uniform:
            # (n, jmax) gather of each query's chunk rows; pads repeat its last chunk (harmless for max)
            pad = local_start[:, None] + np.minimum(np.arange(self.jmax)[None, :], cnt[:, None] - 1)
            self.pad_idx = torch.from_numpy(pad.reshape(-1)).to(dev)
            self.pad_mask = torch.from_numpy((np.arange(self.jmax)[None, :] < cnt[:, None])[:, :, None]).to(dev)

    def reduce(self, x: torch.Tensor, how: str) -> torch.Tensor:
        """(n_chunks, m) per-chunk scores -> (n, m) max or sum over each query's chunks."""
        if self.uniform:
            y = x.unflatten(0, (self.n, self.jmax))
            return y.amax(1) if how == "max" else y.sum(1)
        y = x.index_select(0, self.pad_idx).unflatten(0, (self.n, self.jmax))
        return y.amax(1) if how == "max" else y.masked_fill(~self.pad_mask, 0.0).sum(1)


# ---------------------------------------------------------------- keys


def _keys(s: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (score desc, index asc): the score's order-preserving int32 bits
    in the high half, low = 2^32 - 1 - index in the low half. In-place ops: this runs on every score."""
    import torch

    bits = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, which compare equal as floats
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits so ints order like floats
    return ordered.to(torch.int64).mul_(_LO).add_(low)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    lo = keys & (_LO - 1)
    hi = torch.div(keys - lo, _LO, rounding_mode="floor")
    bits = (hi ^ ((hi >> 63) & 0x7FFFFFFF)).to(torch.int32)  # the inverse of _keys' flip
    return _LO - 1 - lo, bits.view(torch.float32)


def _checked_inputs(queries: QueryEmbeddings, audios: AudioEmbeddings, modes: list[str]):
    """Validated arrays: (audio chunks, audio offsets, audio whole or None, query whole, query chunks, query offsets)."""
    n_aud, n_q = len(audios.audio_ids), len(queries.query_ids)
    if n_aud == 0:
        raise LarcqError("there are no audios to search")
    a_chunks = _matrix(audios.chunk_emb, "audio chunk embeddings", keep_half=True)
    dim = a_chunks.shape[1]
    a_off = _offsets(audios.chunk_offsets, n_aud, len(a_chunks), "audio chunk_offsets", "audio")
    q_whole = _matrix(queries.whole_emb, "query embeddings", rows=n_q, dim=dim)
    q_chunks = _matrix(queries.chunk_emb, "query chunk embeddings", dim=dim)
    q_off = _offsets(queries.chunk_offsets, n_q, len(q_chunks), "query chunk_offsets", "query")
    _finite(q_whole, "query embeddings")
    _finite(q_chunks, "query chunk embeddings")
    _finite(a_chunks, "audio chunk embeddings")
    a_whole = None
    if any(_SIDES[m][0] == "whole" for m in modes):
        a_whole = _matrix(audios.whole_emb, "audio whole-file embeddings", rows=n_aud, dim=dim, keep_half=True)
        _finite(a_whole, "audio whole-file embeddings")
    return a_chunks, a_off, a_whole, q_whole, q_chunks, q_off


def _device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LarcqError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LarcqError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def _plan(modes: list[str]):
    """Which (query rows, audio columns) products the modes need: rows "w" (whole query) or "c"
    (query chunks); columns "W" (audio whole), "S" (chunk sum) or "G" (chunk grid)."""
    pieces = {m: ("w" if _SIDES[m][1] == "whole" else "c", _AUDIO_COLS[_SIDES[m][0]]) for m in modes}
    need = set(pieces.values())
    grid_rows = [r for r in ("w", "c") if (r, "G") in need]
    small_rows = [r for r in ("w", "c") if (r, "W") in need or (r, "S") in need]
    small_cols = [c for c in ("W", "S") if any(p[1] == c for p in need)]
    return pieces, need, grid_rows, small_rows, small_cols


# ---------------------------------------------------------------- scoring


def score(
    queries: QueryEmbeddings,
    audios: AudioEmbeddings,
    modes: Sequence[str] = MODES,
    top_k: int = 100,
    gt_index: np.ndarray | None = None,
    query_block: int = 256,
    chunk_block: int = 65536,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, ModeScores]:
    """Top-K audios per query for each mode, and the ground truth's rank and score when gt_index is given.

    gt_index: (Q,) index into audios.audio_ids of each query's ground truth, -1 where it has none.
    """
    import torch

    modes = _check_modes(modes, audios.whole_emb is not None)
    for name, v in (("top_k", top_k), ("query_block", query_block), ("chunk_block", chunk_block)):
        if int(v) < 1:
            raise LarcqError(f"{name} must be >= 1, got {v}")
    n_aud = len(audios.audio_ids)
    n_q = len(queries.query_ids)
    a_chunks, a_off, a_whole, q_whole, q_chunks, q_off = _checked_inputs(queries, audios, modes)
    if gt_index is not None:
        gt_index = np.asarray(gt_index)
        if gt_index.shape != (n_q,) or not np.issubdtype(gt_index.dtype, np.integer):
            raise LarcqError(f"gt_index must be {n_q} integers (one per query), got shape {gt_index.shape}")
        gt_index = gt_index.astype(np.int64)
        if n_q and (gt_index.min() < -1 or gt_index.max() >= n_aud):
            raise LarcqError(f"gt_index values must be -1 or an audio index in [0, {n_aud})")
    dev = _device(device)
    pieces, need, grid_rows, small_rows, small_cols = _plan(modes)

    k = min(int(top_k), n_aud)
    out_idx = {m: np.zeros((n_q, k), dtype=np.int64) for m in modes}
    out_score = {m: np.zeros((n_q, k), dtype=np.float32) for m in modes}
    out_rank = {m: np.zeros(n_q, dtype=np.int64) for m in modes} if gt_index is not None else None
    out_gts = {m: np.full(n_q, np.nan, dtype=np.float32) for m in modes} if gt_index is not None else None

    with torch.inference_mode():
        side = _AudioSide(a_chunks, a_off, a_whole, {c for _, c in need}, int(chunk_block), dev)
        qw_t, qc_t = _tensor(q_whole, dev), _tensor(q_chunks, dev)
        gt_block = None
        if gt_index is not None:
            gt_block = np.where(gt_index >= 0, side.block_of[np.maximum(gt_index, 0)], -1)
        done = 0
        block_audios = [blk.stop - blk.start for blk in side.blocks]
        for rows in _query_blocks(gt_block, n_q, int(query_block), block_audios, len(modes)):
            qb = _QueryBlock(rows, qw_t, qc_t, q_off, grid_rows, small_rows)
            gts = None if gt_index is None else gt_index[rows]
            top, rank, gt_key = _score_query_block(qb, side, gts, pieces, grid_rows, small_rows, small_cols, k)
            for m in modes:
                ti, ts = _decode(top[m])
                out_idx[m][rows] = ti.cpu().numpy()
                out_score[m][rows] = ts.cpu().numpy()
                if gts is not None:
                    has = gts >= 0
                    out_rank[m][rows] = np.where(has, rank[m].cpu().numpy(), 0)
                    out_gts[m][rows] = np.where(has, _decode(gt_key[m][:, 0])[1].cpu().numpy(), np.nan)
            done += len(rows)
            if progress is not None:
                progress(done)

    return {
        m: ModeScores(m, out_idx[m], out_score[m],
                      None if out_rank is None else out_rank[m], None if out_gts is None else out_gts[m])
        for m in modes
    }


def _block_scores(qb: _QueryBlock, side: _AudioSide, b: int, pieces: dict[str, tuple[str, str]],
                  grid_rows: list[str], small_rows: list[str], small_cols: list[str]) -> dict[str, torch.Tensor]:
    """(query block, audio block) -> {mode: (n_queries, n_audios) scores}, from at most two matmuls."""
    import torch

    blk = side.blocks[b]
    n = blk.stop - blk.start
    got: dict[tuple[str, str], torch.Tensor] = {}
    row_len = {"w": qb.n, "c": qb.n_chunks}
    if grid_rows:
        # Every query row against every chunk of the block, max over each audio's chunks, by tile
        # (a loop over at most chunk_block / tile_cols tiles, not over audios).
        e, kmax, per = side.grid_cols(b), blk.kmax, side.tile_audios(b)
        g = torch.empty((qb.grid.shape[0], n), dtype=qb.grid.dtype, device=qb.grid.device)
        for a0 in range(0, n, per):
            a1 = min(n, a0 + per)
            g[:, a0:a1] = (qb.grid @ e[a0 * kmax:a1 * kmax].T).unflatten(1, (kmax, a1 - a0)).amax(1)
        for r, part in zip(grid_rows, g.split([row_len[r] for r in grid_rows])):
            got[(r, "G")] = part
    if small_rows:
        p = qb.small @ side.small_cols(b).T
        for r, rpart in zip(small_rows, p.split([row_len[r] for r in small_rows])):
            for c, part in zip(small_cols, rpart.split(n, dim=1)):
                got[(r, c)] = part
    out = {}
    reduced: dict[tuple[str, str, str], torch.Tensor] = {}
    for m, (r, c) in pieces.items():
        if r == "w":
            out[m] = got[(r, c)]
        else:
            how = _SIDES[m][1]
            if (r, c, how) not in reduced:
                reduced[(r, c, how)] = qb.reduce(got[(r, c)], how)
            out[m] = reduced[(r, c, how)]
    return out


def _score_query_block(qb: _QueryBlock, side: _AudioSide, gts: np.ndarray | None, pieces: dict[str, tuple[str, str]],
                       grid_rows: list[str], small_rows: list[str], small_cols: list[str], k: int,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One query block against every audio block: {mode: sorted top-k keys}, {mode: gt rank}, {mode: gt key}.

    The blocks holding ground truths go first. A row's rank counts keys above its ground truth's key;
    blocks scored before that key is known are kept and counted once it is.
    """
    import torch

    dev = side.dev
    n_blocks = len(side.blocks)
    if gts is not None and not (gts >= 0).any():
        gts = None  # nothing to rank in this block
    gt_blk = np.full(qb.n, -1) if gts is None else np.where(gts >= 0, side.block_of[np.maximum(gts, 0)], -1)
    first = sorted(set(gt_blk[gt_blk >= 0].tolist()))
    order = first + sorted(set(range(n_blocks)) - set(first))
    known = torch.from_numpy(gt_blk < 0).to(dev)  # rows without a ground truth wait for nothing
    top: dict[str, torch.Tensor] = {}
    rank = {m: torch.ones(qb.n, dtype=torch.int64, device=dev) for m in pieces}
    gt_key = {m: torch.zeros((qb.n, 1), dtype=torch.int64, device=dev) for m in pieces}
    kept: list[dict[str, torch.Tensor]] = []
    for i, b in enumerate(order):
        blk = side.blocks[b]
        low = side.low[blk.start:blk.stop]
        keys = {m: _keys(s, low) for m, s in _block_scores(qb, side, b, pieces, grid_rows, small_rows,
                                                           small_cols).items()}
        if gts is not None and b in first:
            sel = np.flatnonzero(gt_blk == b)
            new = torch.from_numpy(sel).to(dev)
            pos = torch.from_numpy(side.pos_in_block[gts[sel]]).to(dev)[:, None]
            for m in pieces:
                gk = keys[m].index_select(0, new).gather(1, pos)
                gt_key[m][new] = gk
                for old in kept:
                    rank[m][new] += (old[m].index_select(0, new) > gk).sum(1)
            known[new] = True
        all_known = bool(known.all())
        rows_known = None if all_known else known.nonzero()[:, 0]
        for m in pieces:
            if gts is not None:
                if all_known:
                    rank[m] += (keys[m] > gt_key[m]).sum(1)
                elif len(rows_known):
                    rank[m][rows_known] += (keys[m][rows_known] > gt_key[m][rows_known]).sum(1)
            both = torch.cat([top[m], keys[m]], 1) if i else keys[m]
            top[m] = both.topk(min(k, both.shape[1]), dim=1, sorted=i == len(order) - 1).values
        if all_known:
            kept.clear()
        else:
            kept.append(keys)
    return top, rank, gt_key


# ---------------------------------------------------------------- counting (sharded ground-truth rank)


def count_above(
    queries: QueryEmbeddings,
    audios: AudioEmbeddings,
    modes: Sequence[str],
    gt_score: dict[str, np.ndarray],
    gt_pos: np.ndarray,
    exclude: np.ndarray | None = None,
    top_k: int = 0,
    query_block: int = 256,
    chunk_block: int = 65536,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], dict[str, ModeScores] | None]:
    """Per query and mode, how many of `audios` beat a ground truth scored elsewhere; one pass that
    also gives score()'s top-K when top_k > 0 (same blocks, same keys: the same top-K).

    gt_score[mode]: (Q,) the ground truth's score (nan: the query has none; nothing is counted).
    gt_pos: (Q,) where the ground truth sorts among `audios` (their ids are sorted): audio i beats it
    when its score is higher, or equal and i < gt_pos (today's tie rule: by audio id).
    exclude: (Q,) an audio index never counted (the ground truth itself, when it is among `audios`:
    its score here may differ from gt_score in the last bit), -1 for none.
    Returns ({mode: (Q,) int64 counts}, {mode: ModeScores without gt fields} or None).
    """
    import torch

    modes = _check_modes(modes, audios.whole_emb is not None)
    n_aud, n_q = len(audios.audio_ids), len(queries.query_ids)
    a_chunks, a_off, a_whole, q_whole, q_chunks, q_off = _checked_inputs(queries, audios, modes)
    gt_pos = np.asarray(gt_pos, dtype=np.int64).reshape(n_q)
    exclude = np.full(n_q, -1, dtype=np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(n_q)
    dev = _device(device)
    pieces, need, grid_rows, small_rows, small_cols = _plan(modes)
    k = min(int(top_k), n_aud)
    counts = {m: np.zeros(n_q, dtype=np.int64) for m in modes}
    out_idx = {m: np.zeros((n_q, k), dtype=np.int64) for m in modes}
    out_score = {m: np.zeros((n_q, k), dtype=np.float32) for m in modes}
    never = torch.iinfo(torch.int64).max  # no score beats a missing ground truth

    with torch.inference_mode():
        side = _AudioSide(a_chunks, a_off, a_whole, {c for _, c in need}, int(chunk_block), dev)
        qw_t, qc_t = _tensor(q_whole, dev), _tensor(q_chunks, dev)
        for start in range(0, n_q, int(query_block)):
            rows = np.arange(start, min(start + int(query_block), n_q))
            qb = _QueryBlock(rows, qw_t, qc_t, q_off, grid_rows, small_rows)
            low_thr = torch.from_numpy(_LO - 1 - gt_pos[rows]).to(dev)
            thr, cnt = {}, {}
            for m in modes:
                g = np.asarray(gt_score[m], dtype=np.float32).reshape(n_q)[rows]
                t = _keys(torch.from_numpy(np.nan_to_num(g, nan=0.0)).to(dev), low_thr)
                thr[m] = torch.where(torch.from_numpy(np.isnan(g)).to(dev), never, t)[:, None]
                cnt[m] = torch.zeros(len(rows), dtype=torch.int64, device=dev)
            ex = exclude[rows]
            ex_blk = np.where(ex >= 0, side.block_of[np.maximum(ex, 0)], -1)
            top: dict[str, torch.Tensor] = {}
            for i in range(len(side.blocks)):
                blk = side.blocks[i]
                low = side.low[blk.start:blk.stop]
                scores = _block_scores(qb, side, i, pieces, grid_rows, small_rows, small_cols)
                sel = np.flatnonzero(ex_blk == i)
                for m, s in scores.items():
                    keys = _keys(s, low)
                    above = keys > thr[m]
                    if len(sel):  # never count the excluded audio
                        at = torch.from_numpy(side.pos_in_block[ex[sel]]).to(dev)
                        above[torch.from_numpy(sel).to(dev), at] = False
                    cnt[m] += above.sum(1)
                    if k:
                        both = torch.cat([top[m], keys], 1) if i else keys
                        top[m] = both.topk(min(k, both.shape[1]), dim=1, sorted=i == len(side.blocks) - 1).values
            for m in modes:
                counts[m][rows] = cnt[m].cpu().numpy()
                if k:
                    ti, ts = _decode(top[m])
                    out_idx[m][rows] = ti.cpu().numpy()
                    out_score[m][rows] = ts.cpu().numpy()
    tops = {m: ModeScores(m, out_idx[m], out_score[m], None, None) for m in modes} if k else None
    return counts, tops


# ---------------------------------------------------------------- candidates (ANN re-scoring)


class CandidateScorer:
    """Exact scores of a few audios per query (ANN candidates) among audios held in memory (a shard).

    The audios are checked once, here; each query then costs one gather of its candidates' chunk
    rows, one small matmul and per-audio reductions. score() on each query's subset gave the same
    numbers but spent two thirds of its time re-checking, re-planning and re-padding every call
    (benchmarks/bench_scale.py). Same arithmetic as score(): chunk rows widened to float32, audio
    sums from float32 chunk sums, ties by audio index."""

    def __init__(self, audios: AudioEmbeddings, device: str = "cpu"):
        n = len(audios.audio_ids)
        if n == 0:
            raise LarcqError("there are no audios to search")
        self.dev = _device(device)
        chunks = _matrix(audios.chunk_emb, "audio chunk embeddings", keep_half=True)
        self.off = _offsets(audios.chunk_offsets, n, len(chunks), "audio chunk_offsets", "audio")
        _finite(chunks, "audio chunk embeddings")
        self.counts = np.diff(self.off)
        self.dim = chunks.shape[1]
        self.chunks = _tensor(chunks, self.dev)
        self.whole = None
        if audios.whole_emb is not None:
            whole = _matrix(audios.whole_emb, "audio whole-file embeddings", rows=n, dim=self.dim, keep_half=True)
            _finite(whole, "audio whole-file embeddings")
            self.whole = _tensor(whole, self.dev)
        self._sums: torch.Tensor | None = None

    def _sums_t(self) -> torch.Tensor:
        """Chunk sums, made on first use: only sum modes need them."""
        if self._sums is None:
            self._sums = _chunk_sums(self.chunks, self.counts)
        return self._sums

    def score(self, queries: QueryEmbeddings, local: Sequence[np.ndarray], modes: Sequence[str], top_k: int,
              gt_score: dict[str, np.ndarray] | None = None, gt_pos: np.ndarray | None = None,
              exclude: np.ndarray | None = None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Query q against the audios local[q] (sorted, unique indices) only.

        Returns ({mode: (Q, k) audio indices, -1 padded}, {mode: (Q, k) scores, -inf padded},
        {mode: (Q,) candidates that beat the ground truth} or None). The ground-truth arguments are
        count_above's: gt_score[mode] (Q,) (nan: none), gt_pos (Q,) where it sorts among these
        audios, exclude (Q,) an index never counted (-1: none)."""
        import torch

        modes = _check_modes(modes, self.whole is not None)
        n_q = len(queries.query_ids)
        if len(local) != n_q:
            raise LarcqError(f"{len(local)} candidate lists for {n_q} queries")
        q_whole = _matrix(queries.whole_emb, "query embeddings", rows=n_q, dim=self.dim)
        q_chunks = _matrix(queries.chunk_emb, "query chunk embeddings", dim=self.dim)
        q_off = _offsets(queries.chunk_offsets, n_q, len(q_chunks), "query chunk_offsets", "query")
        _finite(q_whole, "query embeddings")
        _finite(q_chunks, "query chunk embeddings")
        pieces, need, _, _, _ = _plan(modes)
        k = int(top_k)
        top_i = {m: np.full((n_q, k), -1, dtype=np.int64) for m in modes}
        top_s = {m: np.full((n_q, k), -np.inf, dtype=np.float32) for m in modes}
        above = {m: np.zeros(n_q, dtype=np.int64) for m in modes} if gt_score is not None else None
        with torch.inference_mode():
            qw_t, qc_t = _tensor(q_whole, self.dev), _tensor(q_chunks, self.dev)
            for q in range(n_q):  # a loop over queries; each is a handful of array operations
                loc = np.asarray(local[q], dtype=np.int64)
                if len(loc) == 0:
                    continue
                rows = {"w": qw_t[q:q + 1], "c": qc_t[int(q_off[q]):int(q_off[q + 1])]}
                got = self._pieces(loc, rows, need)
                for m, (r, c) in pieces.items():
                    s = got[(r, c)]
                    s = s[0] if r == "w" else (s.amax(0) if _SIDES[m][1] == "max" else s.sum(0))
                    s = s.cpu().numpy()
                    order = np.lexsort((loc, -s))[:k]  # score desc, audio index asc
                    top_i[m][q, :len(order)] = loc[order]
                    top_s[m][q, :len(order)] = s[order]
                    if above is not None:
                        g = np.float32(gt_score[m][q])
                        if not np.isnan(g):
                            beat = ((s > g) | ((s == g) & (loc < gt_pos[q]))) & (loc != exclude[q])
                            above[m][q] = int(beat.sum())
        return top_i, top_s, above

    def _pieces(self, loc: np.ndarray, rows: dict[str, torch.Tensor], need: set[tuple[str, str]]
                ) -> dict[tuple[str, str], torch.Tensor]:
        """{(query rows, audio columns): (rows, len(loc)) scores} for the audios loc."""
        import torch

        out: dict[tuple[str, str], torch.Tensor] = {}
        loc_t = torch.from_numpy(loc).to(self.dev)
        grid_rows = [r for r in ("w", "c") if (r, "G") in need]
        if grid_rows:
            cnt = self.counts[loc]
            starts = np.cumsum(cnt) - cnt
            idx = np.repeat(self.off[loc] - starts, cnt) + np.arange(int(cnt.sum()))
            e = self.chunks.index_select(0, torch.from_numpy(idx).to(self.dev)).float()
            r = torch.cat([rows[x] for x in grid_rows])
            g = r @ e.T  # (rows, chunks of loc)
            # max over each audio's chunks: a (n, kmax) gather of its columns, short audios repeating their last
            kmax = int(cnt.max())
            pad = starts[:, None] + np.minimum(np.arange(kmax)[None, :], cnt[:, None] - 1)
            g = g.index_select(1, torch.from_numpy(pad.reshape(-1)).to(self.dev)).unflatten(1, (len(loc), kmax)).amax(2)
            for x, part in zip(grid_rows, g.split([len(rows[y]) for y in grid_rows])):
                out[(x, "G")] = part
        for col in ("W", "S"):
            want = [r for r in ("w", "c") if (r, col) in need]
            if want:
                src = self._sums_t() if col == "S" else self.whole
                e = src.index_select(0, loc_t).float()
                for x in want:
                    out[(x, col)] = rows[x] @ e.T
        return out
