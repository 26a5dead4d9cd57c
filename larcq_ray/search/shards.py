"""Index shards for parallel exact search: planning, and the scorer a Ray task or actor runs per shard.

A shard is a group of chunk parts (index/store.py) holding about `search.shard_chunks` chunks; an ok
file belongs to the shard of its first chunk part, so a shard reads only its own parts (a long file
whose chunks span several parts reads those too). Every audio keeps its global index: its position
among the index's ok files sorted by audio_id, which is the order single-process search ranks ties
by. A shard's audios are loaded by the worker that scores them (IndexStore.load_embeddings of its
files), never by the driver, and a shard answers with audio indices and scores only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from larcq_ray.core.errors import LarcqError
from larcq_ray.index.store import AudioEmbeddings, IndexStore
from larcq_ray.search.scoring import CandidateScorer, QueryEmbeddings, count_above, score


@dataclass
class Shard:
    number: int
    files: pa.Table  # rows of IndexStore.ok_files(), sorted by audio_id
    gidx: np.ndarray  # (A,) int64 global index of each file, ascending
    n_chunks: int  # chunk rows the file table announces (whole-file rows included)


def plan_shards(files: pa.Table, shard_chunks: int) -> list[Shard]:
    """Group the ok files (sorted by audio_id, as ok_files() returns them) into shards of about
    shard_chunks chunks by their first chunk part. Parts go in order of their first file, so the plan
    is the same on every call for the same index."""
    if shard_chunks < 1:
        raise LarcqError(f"search.shard_chunks must be >= 1, got {shard_chunks}")
    n = files.num_rows
    if n == 0:
        return []
    lengths = pc.fill_null(pc.list_value_length(files.column("chunk_parts")), 0).to_numpy(zero_copy_only=False)
    if (lengths < 1).any():
        raise LarcqError("an ok file of the index names no chunk part: the index is damaged; re-run `larcq-ray index`")
    first = np.asarray(pc.list_element(files.column("chunk_parts"), 0).to_pylist(), dtype=object)
    chunks = files.column("n_chunks").to_numpy(zero_copy_only=False).astype(np.int64)
    parts, part_of = np.unique(first, return_inverse=True)  # parts sorted by name
    # order parts by their first file (files are sorted by id)
    first_file = np.full(len(parts), n, dtype=np.int64)
    np.minimum.at(first_file, part_of, np.arange(n))
    part_order = np.argsort(first_file, kind="stable")
    part_chunks = np.bincount(part_of, weights=np.maximum(chunks, 1), minlength=len(parts)).astype(np.int64)
    shard_of_part = np.empty(len(parts), dtype=np.int64)
    s, acc = 0, 0
    for p in part_order.tolist():  # a loop over parts, not files
        if acc and acc + part_chunks[p] > shard_chunks:
            s, acc = s + 1, 0
        shard_of_part[p] = s
        acc += int(part_chunks[p])
    shard_of_file = shard_of_part[part_of]
    out = []
    for k in range(s + 1):
        rows = np.flatnonzero(shard_of_file == k)
        if len(rows):
            out.append(Shard(len(out), files.take(pa.array(rows)), rows.astype(np.int64),
                             int(np.maximum(chunks[rows], 1).sum())))
    return out


@dataclass
class ShardResult:
    """What a shard sends back: indices and scores, never embeddings."""

    top_gidx: dict[str, np.ndarray]  # mode -> (Q, k) int64 global audio indices
    top_score: dict[str, np.ndarray]  # mode -> (Q, k) float32
    above: dict[str, np.ndarray] | None  # mode -> (Q,) audios here that beat the ground truth
    n_chunks: int
    has_whole: bool


def _device(device: str) -> str:
    from larcq_ray.core.devices import resolve_device

    return resolve_device(device, "search device")


class ShardScorer:
    """One shard's audios in memory (loaded here, from the store) and the scorer over them.

    Runs in a Ray task or actor (shard_task / ShardActor), or in-process for a one-shard service.
    """

    def __init__(self, index_uri: str, files: pa.Table, gidx: np.ndarray, device: str = "auto",
                 audios: AudioEmbeddings | None = None):
        # a float16 index stays float16 in memory: a shard's memory is half its float32 size
        self.audios = audios if audios is not None else IndexStore(index_uri).load_embeddings(files, keep_half=True)
        # Arrow's allocator keeps what loading freed (a few times the shard) unless asked to give it back
        pa.default_memory_pool().release_unused()
        want = files.column("audio_id").to_pylist()
        if self.audios.audio_ids != want:
            missing = sorted(set(want) - set(self.audios.audio_ids))
            raise LarcqError(f"the index in {index_uri} lacks the chunks of {len(missing)} ok file(s) (e.g. "
                             f"{missing[:3]}) or changed during search; re-run `larcq-ray index`")
        self.gidx = np.asarray(gidx, dtype=np.int64)
        self.device = _device(device)
        self._candidates: CandidateScorer | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.audios.chunk_emb)

    def info(self) -> dict:
        return {"n_audios": len(self.audios.audio_ids), "n_chunks": self.n_chunks,
                "has_whole": self.audios.whole_emb is not None, "dim": int(self.audios.chunk_emb.shape[1])}

    def _thresholds(self, gidx: np.ndarray, gt_gidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where each ground truth sorts among `gidx`, its index there or -1 when absent)."""
        pos = np.searchsorted(gidx, gt_gidx)
        here = (gt_gidx >= 0) & (pos < len(gidx)) & (gidx[np.minimum(pos, len(gidx) - 1)] == gt_gidx)
        return pos.astype(np.int64), np.where(here, pos, -1).astype(np.int64)

    def search(self, queries: QueryEmbeddings, modes: list[str], top_k: int,
               gt_score: dict[str, np.ndarray] | None = None, gt_gidx: np.ndarray | None = None,
               query_block: int = 256, chunk_block: int = 65536) -> ShardResult:
        """Top-K of this shard per query and mode; with gt_score, also how many audios here beat it."""
        import torch

        with torch.inference_mode():
            if gt_score is None:
                res = score(queries, self.audios, modes, top_k=top_k, query_block=query_block,
                            chunk_block=chunk_block, device=self.device)
                above = None
            else:
                pos, excl = self._thresholds(self.gidx, np.asarray(gt_gidx, dtype=np.int64))
                above, res = count_above(queries, self.audios, modes, gt_score, pos, excl, top_k=top_k,
                                         query_block=query_block, chunk_block=chunk_block, device=self.device)
        return ShardResult({m: self.gidx[r.topk_index] for m, r in res.items()},
                           {m: r.topk_score for m, r in res.items()}, above, self.n_chunks,
                           self.audios.whole_emb is not None)

    def search_candidates(self, queries: QueryEmbeddings, modes: list[str], top_k: int,
                          candidates: list[np.ndarray], gt_score: dict[str, np.ndarray] | None = None,
                          gt_gidx: np.ndarray | None = None, chunk_block: int = 65536) -> ShardResult:
        """Like search(), but query q is scored exactly against its candidates (global indices) that
        this shard holds, and nothing else. Queries without candidates here get empty lists (k = 0
        columns padded with index -1 and score -inf). chunk_block: unused (a query's candidates are one block)."""
        if self._candidates is None:  # checked once, then every call only gathers its candidates
            self._candidates = CandidateScorer(self.audios, self.device)
        local = []
        for c in candidates:
            cand = np.asarray(c, dtype=np.int64)
            pos = np.searchsorted(self.gidx, cand)
            ok = (pos < len(self.gidx)) & (self.gidx[np.minimum(pos, len(self.gidx) - 1)] == cand)
            local.append(np.unique(pos[ok]))
        gt = {}
        if gt_score is not None:
            pos, excl = self._thresholds(self.gidx, np.asarray(gt_gidx, dtype=np.int64))
            gt = dict(gt_score=gt_score, gt_pos=pos, exclude=excl)
        top_l, top_s, above = self._candidates.score(queries, local, modes, int(top_k), **gt)
        top_g = {m: np.where(v >= 0, self.gidx[np.maximum(v, 0)], -1) for m, v in top_l.items()}
        return ShardResult(top_g, top_s, above, self.n_chunks, self.audios.whole_emb is not None)


def gt_scores(index_uri: str, files: pa.Table, gidx: np.ndarray, queries: QueryEmbeddings, gt_gidx: np.ndarray,
              modes: list[str], chunk_block: int = 65536, device: str = "auto") -> dict[str, np.ndarray]:
    """Phase 1 of a sharded ground-truth rank: each query's score of its ground truth (nan where it
    has none), from the ground-truth audios alone (`files`: their rows; gidx: their global indices)."""
    import torch

    n_q = len(queries.query_ids)
    has = gt_gidx >= 0
    if not has.any():
        return {m: np.full(n_q, np.nan, dtype=np.float32) for m in modes}
    audios = IndexStore(index_uri).load_embeddings(files)
    local = np.searchsorted(gidx, gt_gidx)
    gt_local = np.where(has, local, -1).astype(np.int64)
    with torch.inference_mode():
        res = score(queries, audios, modes, top_k=1, gt_index=gt_local, chunk_block=chunk_block,
                    device=_device(device))
    return {m: r.gt_score for m, r in res.items()}
