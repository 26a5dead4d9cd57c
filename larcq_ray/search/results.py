"""Search results as answers: each query's top audios per mode with the matched window of each
audio for each query chunk (results.parquet), and a readable results.md.

The matched window of a query chunk (or of the whole query, for audio-max / audio-sum) in an audio
is the audio's index chunk with the highest similarity to it: exactly the chunk an audio-max vote
takes; for audio-sum modes, which add every chunk's vote, it is the chunk that votes most. Modes that
score whole files (none, query-max, query-sum) have no window. Computed for the top results_k audios
only, queries in blocks: one batched matmul per block over the chunks of its queries' audios.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from larcq_ray import artifacts
from larcq_ray.index.store import AudioEmbeddings, IndexStore
from larcq_ray.search.scoring import _SIDES, ModeScores, QueryEmbeddings

# Bytes of gathered audio chunk embeddings per query block.
_BLOCK_BYTES = 128 * 2**20


@dataclass
class ChunkTimes:
    start_s: np.ndarray  # (C,) aligned with AudioEmbeddings.chunk_emb rows
    end_s: np.ndarray


def load_chunk_times(store: IndexStore, audios: AudioEmbeddings) -> ChunkTimes:
    """start_s / end_s of each row of `audios.chunk_emb`, in IndexStore.load_embeddings' order
    (audios by id, chunks by index; an audio indexed only whole uses its whole-file row)."""
    t = store.read_chunks(columns=["audio_id", "chunk_index", "start_s", "end_s"])
    ids = t.column("audio_id").to_numpy(zero_copy_only=False)
    cidx = t.column("chunk_index").to_numpy()
    start = t.column("start_s").to_numpy(zero_copy_only=False).astype(np.float64)
    end = t.column("end_s").to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.lexsort((cidx, ids))
    ids, cidx, start, end = ids[order], cidx[order], start[order], end[order]
    _, first = np.unique(ids, return_index=True)
    whole = cidx == -1
    n_chunk_rows = np.add.reduceat((~whole).astype(np.int64), first)
    keep = ~whole
    keep[first[n_chunk_rows == 0]] = True
    if int(keep.sum()) != len(audios.chunk_emb):
        raise RuntimeError("index chunk times do not line up with its embeddings (the index changed during search?)")
    return ChunkTimes(start[keep], end[keep])


def best_windows(q_emb: np.ndarray, q_off: np.ndarray, top: np.ndarray, audios: AudioEmbeddings,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """For query rows q_emb (R, D), grouped per query by q_off (Q+1,), and each query's audios top
    (Q, k): (R, k) the chunk row (into audios.chunk_emb) most similar to the query row, and (R, k)
    that similarity."""
    import torch

    n_q, k = top.shape
    n_rows = np.diff(q_off)
    counts = np.diff(audios.chunk_offsets)
    a_off = audios.chunk_offsets[:-1]
    dim = audios.chunk_emb.shape[1]
    out_row = np.zeros((len(q_emb), k), dtype=np.int64)
    out_sim = np.zeros((len(q_emb), k), dtype=np.float32)
    if n_q == 0 or k == 0:
        return out_row, out_sim
    dev = torch.device(device)
    chunks = torch.from_numpy(np.ascontiguousarray(audios.chunk_emb, dtype=np.float32)).to(dev)
    rows_t = torch.from_numpy(np.ascontiguousarray(q_emb, dtype=np.float32)).to(dev)
    kmax_q = counts[top].max(1)
    per_audio = k * dim * 4
    i = 0
    while i < n_q:
        j, km = i + 1, int(kmax_q[i])
        while j < n_q and (j - i + 1) * per_audio * max(km, int(kmax_q[j])) <= _BLOCK_BYTES:
            km = max(km, int(kmax_q[j]))
            j += 1
        aud = top[i:j]  # (B, k)
        # (B, k, km) chunk rows; short audios repeat their last chunk (argmax maps back to a real row)
        src = a_off[aud][..., None] + np.minimum(np.arange(km), counts[aud][..., None] - 1)
        e = chunks.index_select(0, torch.from_numpy(src.reshape(-1)).to(dev)).view(j - i, k * km, dim)
        nr = n_rows[i:j]
        jm = int(nr.max())
        ridx = q_off[i:j][:, None] + np.minimum(np.arange(jm), nr[:, None] - 1)  # (B, jm)
        qe = rows_t.index_select(0, torch.from_numpy(ridx.reshape(-1)).to(dev)).view(j - i, jm, dim)
        sim = torch.bmm(qe, e.transpose(1, 2)).view(j - i, jm, k, km)
        best, arg = sim.max(-1)  # (B, jm, k)
        arg = arg.cpu().numpy()
        best = best.float().cpu().numpy()
        valid = np.arange(jm)[None, :] < nr[:, None]  # (B, jm)
        bq, bj = np.nonzero(valid)
        dest = q_off[i:j][bq] + bj
        out_row[dest] = np.take_along_axis(src, arg.transpose(0, 2, 1), axis=2).transpose(0, 2, 1)[bq, bj]
        out_sim[dest] = best[bq, bj]
        i = j
    return out_row, out_sim


def results_table(queries, q_emb: QueryEmbeddings, chunk_texts: list[str], audios: AudioEmbeddings,
                  times: ChunkTimes | None, results: dict[str, ModeScores], results_k: int,
                  device: str = "cpu") -> pa.Table:
    """artifacts.RESULTS rows: per mode, query, rank (and query chunk, for modes with windows)."""
    ids = np.asarray(audios.audio_ids, dtype=object)
    n_q = len(queries)
    qids = np.array([q.query_id for q in queries], dtype=np.int32)
    names = np.array([q.name for q in queries], dtype=object)
    texts = np.array([q.text for q in queries], dtype=object)
    c_off = np.asarray(q_emb.chunk_offsets, dtype=np.int64)
    c_texts = np.asarray(chunk_texts, dtype=object)
    whole_off = np.arange(n_q + 1, dtype=np.int64)
    tables = []
    for mode, r in results.items():
        kk = min(results_k, r.topk_index.shape[1])
        top, score = r.topk_index[:, :kk], r.topk_score[:, :kk]
        audio_side, query_side = _SIDES[mode]
        if audio_side == "whole" or times is None:
            n = n_q * kk
            tables.append(pa.table({
                "query_id": np.repeat(qids, kk), "query_name": np.repeat(names, kk),
                "query": np.repeat(texts, kk), "mode": np.full(n, mode, dtype=object),
                "rank": np.tile(np.arange(1, kk + 1, dtype=np.int32), n_q),
                "audio_id": ids[top.reshape(-1)], "score": score.reshape(-1),
                "query_chunk": pa.nulls(n, pa.int32()), "query_chunk_text": pa.nulls(n, pa.string()),
                "start_s": pa.nulls(n, pa.float64()), "end_s": pa.nulls(n, pa.float64()),
                "window_score": pa.nulls(n, pa.float32()),
            }))
            continue
        if query_side == "whole":
            rows_emb, off = q_emb.whole_emb, whole_off
            row_chunk = np.full(n_q, -1, dtype=np.int32)
            row_text = texts
        else:
            rows_emb, off = q_emb.chunk_emb, c_off
            row_chunk = (np.arange(len(c_texts)) - np.repeat(c_off[:-1], np.diff(c_off))).astype(np.int32)
            row_text = c_texts
        crow, csim = best_windows(rows_emb, off, top, audios, device)
        q_of_row = np.repeat(np.arange(n_q), np.diff(off))
        n_r = len(q_of_row)
        # rows in (query, rank, chunk) order
        qq = np.repeat(q_of_row, kk)
        rr = np.tile(np.arange(kk), n_r)
        row = np.repeat(np.arange(n_r), kk)
        order = np.lexsort((row, rr, qq))
        qq, rr, row = qq[order], rr[order], row[order]
        win = crow[row, rr]
        tables.append(pa.table({
            "query_id": qids[qq], "query_name": names[qq], "query": texts[qq],
            "mode": np.full(len(qq), mode, dtype=object), "rank": (rr + 1).astype(np.int32),
            "audio_id": ids[top[qq, rr]], "score": score[qq, rr],
            "query_chunk": row_chunk[row], "query_chunk_text": row_text[row],
            "start_s": times.start_s[win], "end_s": times.end_s[win], "window_score": csim[row, rr],
        }))
    return artifacts.RESULTS.table(pa.concat_tables([artifacts.RESULTS.table(t) for t in tables]))


def _fmt_s(s: float) -> str:
    m, sec = divmod(float(s), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{sec:04.1f}" if h else f"{m}:{sec:04.1f}"


def _md_cell(x: str) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def results_markdown(table: pa.Table, mode: str, has_gt: bool, gt: dict[int, str] | None = None,
                     max_queries: int = 200) -> str:
    """One section per query: its chunks and its ranked audios under `mode`, with matched windows."""
    df = table.filter(pc.equal(table.column("mode"), mode)).to_pandas()
    n_queries = df["query_id"].nunique()
    lines = [f"# Search results ({mode})", ""]
    lines.append(f"{n_queries} queries; the top {int(df['rank'].max()) if len(df) else 0} audios of each, by score. "
                 "A window is the audio's stretch (start-end, m:ss) most similar to each part of the query."
                 + ("" if has_gt else " These queries have no ground truth: nothing is evaluated."))
    lines.append("")
    for n_shown, (qid, g) in enumerate(df.groupby("query_id", sort=True)):
        if n_shown == max_queries:
            lines.append(f"... and {n_queries - max_queries} more queries: see results.parquet")
            break
        first = g.iloc[0]
        name = f" ({first['query_name']})" if first["query_name"] != str(qid) else ""
        lines.append(f"## Query {qid}{name}: {_md_cell(first['query'])}")
        lines.append("")
        has_win = g["query_chunk"].notna().any()
        chunks = g.drop_duplicates("query_chunk").sort_values("query_chunk") if has_win else g.iloc[:0]
        many = has_win and len(chunks) > 1
        if many:
            for _, c in chunks.iterrows():
                lines.append(f"- part {int(c['query_chunk']) + 1}: {_md_cell(c['query_chunk_text'])}")
            lines.append("")
        head = ["rank", "audio", "score"]
        if has_win:
            head += [f"part {int(c['query_chunk']) + 1}" for _, c in chunks.iterrows()] if many else ["window"]
        if gt is not None and qid in gt:
            head.append("ground truth")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for rank, a in g.groupby("rank", sort=True):
            a0 = a.iloc[0]
            cells = [str(rank), _md_cell(a0["audio_id"]), f"{a0['score']:.3f}"]
            if has_win:
                cells += [f"{_fmt_s(w['start_s'])}-{_fmt_s(w['end_s'])} ({w['window_score']:.2f})"
                          for _, w in a.sort_values("query_chunk").iterrows()]
            if gt is not None and qid in gt:
                cells.append("yes" if a0["audio_id"] == gt[qid] else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
