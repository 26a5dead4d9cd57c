"""Search an index shard by shard on Ray: exact (every audio) or re-scoring ANN candidates.

The driver holds the queries, the ok files table (no embeddings) and the per-shard answers (top-K
audio indices and scores, counts). Query embeddings go to the object store once (ray.put) and every
shard worker gets the reference. Per-shard top-K lists merge by (score desc, audio index asc) — the
audio index is the position among the ok files sorted by audio_id, so ties go to the smaller id as in
single-process search.

Ground-truth rank over shards (evaluation): phase 1 scores each query's ground truth alone (a task
that loads only the ground-truth audios); phase 2 is the one pass over every shard, which keeps its
top-K and counts its audios that beat the ground truth (higher score, or equal and smaller id);
rank = 1 + the sum of those counts.

`ShardSet(persistent=False)` (the search job) runs one Ray task per shard that loads its shard, scores
it and returns; `persistent=True` (the /search service) keeps one actor per shard with its audios in
memory. A one-shard service may score in its own process (`in_process=True`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from larcq_ray.core.errors import LarcqError
from larcq_ray.index.store import AudioEmbeddings, IndexStore
from larcq_ray.search.scoring import ModeScores, QueryEmbeddings
from larcq_ray.search.shards import ShardResult, ShardScorer, gt_scores, plan_shards

log = logging.getLogger(__name__)


@dataclass
class ShardOptions:
    shard_chunks: int = 2_000_000
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: a share of the cluster's GPUs when it has any, else 0
    device: str = "auto"
    query_block: int = 256
    chunk_block: int = 65536

    @classmethod
    def from_config(cls, sc, device: str = "auto") -> "ShardOptions":
        return cls(sc.shard_chunks, sc.shard_num_cpus, sc.shard_num_gpus, device, sc.query_block, sc.chunk_block)


def _gpus(opt: ShardOptions, n_shards: int) -> float:
    if opt.num_gpus is not None:
        return float(opt.num_gpus)
    import ray

    total = float(ray.cluster_resources().get("GPU", 0.0))
    return min(1.0, total / max(1, n_shards)) if total else 0.0


def _threads(num_cpus: float) -> None:
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def _shard_task(index_uri, files, gidx, device, num_cpus, method, queries, args, kwargs) -> ShardResult:
    # queries: a top-level argument, so Ray hands the task the object behind the reference
    _threads(num_cpus)
    scorer = ShardScorer(index_uri, files, gidx, device)
    return getattr(scorer, method)(queries, *args, **kwargs)


def _gt_task(num_cpus, *args, **kwargs):
    _threads(num_cpus)
    return gt_scores(*args, **kwargs)


class _ShardActor:
    def __init__(self, index_uri, files, gidx, device, num_cpus):
        _threads(num_cpus)
        self.scorer = ShardScorer(index_uri, files, gidx, device)

    def info(self) -> dict:
        return self.scorer.info()

    def call(self, method, queries, args, kwargs) -> ShardResult:
        return getattr(self.scorer, method)(queries, *args, **kwargs)


def ray_get(refs):
    """ray.get that raises a task's LarcqError as itself (its message, not a remote traceback)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, LarcqError):
            raise LarcqError(str(cause)) from None
        raise


def _wait_all(refs, progress=None):
    """ray_get(refs), calling progress(n) as n more of them finish."""
    if progress is not None:
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            progress(len(done))
    return ray_get(refs)


def merge_top(results: list[ShardResult], modes: list[str], k: int
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per mode, the (Q, k) best of every shard's list by (score desc, audio index asc); padding
    entries (index -1, score -inf) sort last."""
    idx, sc = {}, {}
    for m in modes:
        g = np.concatenate([r.top_gidx[m] for r in results], axis=1)
        s = np.concatenate([r.top_score[m] for r in results], axis=1)
        g_key = np.where(g < 0, np.iinfo(np.int64).max, g)
        order = np.lexsort(np.stack([g_key, -s.astype(np.float64)]), axis=-1)[:, :k]
        idx[m] = np.take_along_axis(g, order, 1)
        sc[m] = np.take_along_axis(s, order, 1)
    return idx, sc


class ShardSet:
    """The shards of one index and how they are scored (tasks, actors or this process)."""

    def __init__(self, index_uri: str, opt: ShardOptions, persistent: bool = False, in_process: bool = False,
                 files: pa.Table | None = None):
        self.uri = str(index_uri)
        self.opt = opt
        self.store = IndexStore(self.uri)
        self.files = self.store.ok_files() if files is None else files
        if self.files.num_rows == 0:
            raise LarcqError(f"the index in {self.uri} holds no embeddings (every file failed?)")
        self.audio_ids = self.files.column("audio_id").to_pylist()
        self.shards = plan_shards(self.files, opt.shard_chunks)
        self.persistent = persistent
        self.local: ShardScorer | None = None
        self.actors = []
        self.info: dict | None = None
        if persistent and in_process and len(self.shards) == 1:
            s = self.shards[0]
            self.local = ShardScorer(self.uri, s.files, s.gidx, opt.device)
            self.info = self.local.info()
        elif persistent:
            import ray

            cpus = float(ray.cluster_resources().get("CPU", 0.0))
            if len(self.shards) * opt.num_cpus > cpus:  # the actors that do not fit would wait forever
                raise LarcqError(
                    f"the index has {len(self.shards)} shards of up to {opt.shard_chunks} chunks and each shard actor "
                    f"takes {opt.num_cpus} CPU(s), more than the cluster's {cpus:g}: raise search.shard_chunks or "
                    "lower search.shard_num_cpus")
            cls = ray.remote(_ShardActor).options(num_cpus=opt.num_cpus, num_gpus=_gpus(opt, len(self.shards)))
            # Loading a shard briefly takes a few times its size: at most one shard per CPU loads at once,
            # so the peak is the shards held plus a few loading, not every shard's load at the same time.
            wave = max(1, int(cpus))
            infos = []
            for w in range(0, len(self.shards), wave):
                new = [cls.remote(self.uri, s.files, s.gidx, opt.device, opt.num_cpus) for s in self.shards[w:w + wave]]
                self.actors += new
                infos += ray_get([a.info.remote() for a in new])
            self.info = {"n_audios": sum(i["n_audios"] for i in infos), "n_chunks": sum(i["n_chunks"] for i in infos),
                         "has_whole": all(i["has_whole"] for i in infos), "dim": infos[0]["dim"]}

    @property
    def n_audios(self) -> int:
        return len(self.audio_ids)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    # -- running one method on shards --------------------------------------------------------
    def _run(self, method: str, queries, per_shard: list[tuple[int, pa.Table | None, np.ndarray | None, tuple, dict]],
             progress=None) -> list[ShardResult]:
        """per_shard: (shard number, files subset or None = the whole shard, its gidx, args, kwargs);
        queries: the QueryEmbeddings (in process) or their object-store reference; progress(n) is
        called as n more shards are done."""
        if self.local is not None:
            out = []
            for _, _, _, a, kw in per_shard:
                out.append(getattr(self.local, method)(queries, *a, **kw))
                if progress is not None:
                    progress(1)
            return out
        import ray

        if self.actors:
            return _wait_all([self.actors[s].call.remote(method, queries, a, kw) for s, _, _, a, kw in per_shard],
                             progress)
        task = ray.remote(_shard_task).options(num_cpus=self.opt.num_cpus,
                                               num_gpus=_gpus(self.opt, len(self.shards)))
        refs = []
        for s, files, gidx, a, kw in per_shard:
            sh = self.shards[s]
            refs.append(task.remote(self.uri, sh.files if files is None else files, sh.gidx if gidx is None else gidx,
                                    self.opt.device, self.opt.num_cpus, method, queries, a, kw))
        return _wait_all(refs, progress)

    def _gt_phase(self, queries_ref, gt_gidx: np.ndarray, modes: list[str]) -> dict[str, np.ndarray]:
        uniq = np.unique(gt_gidx[gt_gidx >= 0])
        n_q = len(gt_gidx)
        if len(uniq) == 0:
            return {m: np.full(n_q, np.nan, dtype=np.float32) for m in modes}
        files = self.files.take(pa.array(uniq))
        if self.local is not None:
            import ray

            q = ray.get(queries_ref) if isinstance(queries_ref, ray.ObjectRef) else queries_ref
            return gt_scores(self.uri, files, uniq, q, gt_gidx, modes, self.opt.chunk_block, self.opt.device)
        import ray

        task = ray.remote(_gt_task).options(num_cpus=self.opt.num_cpus, num_gpus=_gpus(self.opt, len(self.shards)))
        return ray_get(task.remote(self.opt.num_cpus, self.uri, files, uniq, queries_ref, gt_gidx, modes,
                                   self.opt.chunk_block, self.opt.device))

    # -- search -----------------------------------------------------------------------------
    def search(self, queries: QueryEmbeddings, modes: list[str], top_k: int, gt_gidx: np.ndarray | None = None,
               candidates: list[np.ndarray] | None = None, progress=None) -> dict[str, ModeScores]:
        """Top-K per query and mode over every shard (or, with candidates, over each query's
        candidate audios, scored exactly), and the ground truth's rank when gt_gidx is given
        ((Q,) global indices, -1 for none)."""
        import ray

        modes = list(dict.fromkeys(modes))
        n_q = len(queries.query_ids)
        k = min(int(top_k), self.n_audios)
        q_ref = queries if self.local is not None else ray.put(queries)
        gt_score = None
        if gt_gidx is not None:
            gt_gidx = np.asarray(gt_gidx, dtype=np.int64)
            gt_score = self._gt_phase(q_ref, gt_gidx, modes)
            if not np.isfinite(np.stack([gt_score[m] for m in modes])).any():
                gt_score = None
        kw = dict(gt_score=gt_score, gt_gidx=gt_gidx) if gt_score is not None else {}
        if candidates is None:
            jobs = [(s.number, None, None, (modes, k),
                     dict(query_block=self.opt.query_block, chunk_block=self.opt.chunk_block, **kw))
                    for s in self.shards]
            results = self._run("search", q_ref, jobs, progress)
        else:
            results = self._run("search_candidates", q_ref, self._candidate_jobs(modes, k, candidates, kw), progress)
        if not results:
            raise LarcqError("no candidate audios to score")
        top_i, top_s = merge_top(results, modes, k)
        if candidates is not None:
            k_real = int(min((top_i[m] >= 0).sum(1).min() for m in modes)) if n_q else k
            if k_real < k:
                log.warning("the ANN search returned fewer than top_k=%d candidate audios for some queries: "
                            "keeping the top %d of each (raise search.ann.candidates or nprobe)", k, k_real)
                top_i = {m: v[:, :k_real] for m, v in top_i.items()}
                top_s = {m: v[:, :k_real] for m, v in top_s.items()}
        out = {}
        for m in modes:
            rank = score_gt = None
            if gt_gidx is not None:
                has = gt_gidx >= 0
                score_gt = gt_score[m] if gt_score is not None else np.full(n_q, np.nan, dtype=np.float32)
                above = sum(r.above[m] for r in results) if gt_score is not None else np.zeros(n_q, np.int64)
                rank = np.where(has, 1 + above, 0).astype(np.int64)
                if candidates is not None:  # a ground truth the ANN did not return ranks last
                    found = np.array([g >= 0 and np.isin(g, c).item() for g, c in zip(gt_gidx, candidates)])
                    rank = np.where(has & ~found, self.n_audios, rank)
            out[m] = ModeScores(m, top_i[m], top_s[m], rank, score_gt)
        return out

    def _candidate_jobs(self, modes, k, candidates, kw):
        """Each shard gets the candidates it holds; a task loads only those audios' files."""
        bounds = [(s.gidx, s.number) for s in self.shards]
        shard_of = np.empty(self.n_audios, dtype=np.int64)
        for g, n in bounds:
            shard_of[g] = n
        jobs = []
        per_shard: dict[int, list[np.ndarray]] = {}
        for q, c in enumerate(candidates):
            c = np.unique(np.asarray(c, dtype=np.int64))
            sh = shard_of[c]
            for s in np.unique(sh).tolist():
                per_shard.setdefault(s, [np.empty(0, np.int64)] * len(candidates))[q] = c[sh == s]
        for s, cands in sorted(per_shard.items()):
            files = gidx = None
            if not self.persistent:  # a task: load only this shard's candidates
                gidx = np.unique(np.concatenate(cands))
                files = self.files.take(pa.array(gidx))
            jobs.append((s, files, gidx, (modes, k, cands), dict(chunk_block=self.opt.chunk_block, **kw)))
        return jobs


# -- what results_table needs: the top audios only ---------------------------------------------


def top_audios(store: IndexStore, files: pa.Table, results: dict[str, ModeScores], results_k: int
               ) -> tuple[AudioEmbeddings, "object", dict[str, ModeScores]]:
    """The embeddings and chunk times of the audios in the first results_k of any mode (loaded from the
    store for those files only), and `results` cut to results_k with indices into that subset."""
    from larcq_ray.search.results import ChunkTimes

    need = np.unique(np.concatenate([r.topk_index[:, :results_k].reshape(-1) for r in results.values()]))
    sub_files = files.take(pa.array(need))
    table = store.read_chunks_of(sub_files)
    from larcq_ray.index.store import embeddings_from_table

    audios = embeddings_from_table(table)
    ids = table.column("audio_id").to_numpy(zero_copy_only=False)
    cidx = table.column("chunk_index").to_numpy()
    start = table.column("start_s").to_numpy(zero_copy_only=False).astype(np.float64)
    end = table.column("end_s").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.lexsort((cidx, ids))  # as embeddings_from_table orders rows
    ids, cidx, start, end = ids[order], cidx[order], start[order], end[order]
    _, first = np.unique(ids, return_index=True)
    whole = cidx == -1
    keep = ~whole
    keep[first[np.add.reduceat((~whole).astype(np.int64), first) == 0]] = True
    times = ChunkTimes(start[keep], end[keep])
    if audios.audio_ids != sub_files.column("audio_id").to_pylist():
        raise LarcqError("the index changed during search (top audios are missing their chunks); search again")
    cut = {m: ModeScores(m, np.searchsorted(need, r.topk_index[:, :results_k]), r.topk_score[:, :results_k],
                         r.gt_rank, r.gt_score) for m, r in results.items()}
    return audios, times, cut
