"""Every artifact a stage leaves in the run directory: where it lives, its Arrow schema, and the one
typed reader and writer all stages use. Data flows one way:

    index/ -> queries.parquet, shortlist.parquet, results.parquet (+ gt_ranks.parquet) -> captions.parquet
           -> reranked.parquet -> metrics.json, report.md

Writers check the schema and write atomically (a temp file, then a rename), so a crash never leaves
half a file. Readers cast to the schema, fill columns that older runs did not write yet, and name
the command to run when an artifact is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from larcq_ray.core.errors import LarcqError


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class TableArtifact:
    name: str
    relpath: str  # relative to the run directory
    schema: pa.Schema
    producer: str  # the command that writes it
    # Columns a reader fills (with this value) when an older run's file lacks them.
    defaults: dict[str, Any] = field(default_factory=dict)

    def path(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.relpath

    def exists(self, run_dir: str | Path) -> bool:
        return self.path(run_dir).is_file()

    def table(self, rows: pa.Table | Iterable[dict]) -> pa.Table:
        """Rows (or a table) as a table of exactly this schema; a missing or mistyped column is an error."""
        try:
            if isinstance(rows, pa.Table):
                return rows.select(self.schema.names).cast(self.schema)
            return pa.Table.from_pylist(list(rows), schema=self.schema)
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            raise LarcqError(f"{self.name}: rows do not fit its schema ({e})") from None

    def write(self, run_dir: str | Path, rows: pa.Table | Iterable[dict]) -> Path:
        return self.write_to(self.path(run_dir), rows)

    def write_to(self, path: Path, rows: pa.Table | Iterable[dict]) -> Path:
        table = self.table(rows)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def read(self, run_dir: str | Path, columns: Optional[list[str]] = None) -> pa.Table:
        return self.read_from(self.path(run_dir), columns)

    def read_from(self, path: str | Path, columns: Optional[list[str]] = None,
                  filesystem: Optional[pafs.FileSystem] = None) -> pa.Table:
        """The table at `path`: a local path, or a path inside `filesystem` (an object store's, from
        core.storage.open_location)."""
        if filesystem is None:
            path = Path(path)
            found = path.is_file()
        else:
            found = filesystem.get_file_info(str(path)).type == pafs.FileType.File
        if not found:
            raise LarcqError(f"no {self.name} at {path}: run `larcq-ray {self.producer}` first")
        try:
            table = pq.read_table(path, filesystem=filesystem)
        except (pa.ArrowInvalid, OSError) as e:
            raise LarcqError(f"{path} exists but is not a readable Parquet file ({e}); move it away") from None
        for name, value in self.defaults.items():
            if name not in table.column_names:
                typ = self.schema.field(name).type
                table = table.append_column(name, pa.array([value] * table.num_rows, type=typ))
        missing = [n for n in self.schema.names if n not in table.column_names]
        if missing:
            raise LarcqError(f"{path} is not a {self.name} file (it lacks columns {missing}); move it away")
        try:
            table = table.select(self.schema.names).cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise LarcqError(f"{path}: columns of the wrong type for {self.name} ({e})") from None
        return table.select(columns) if columns else table

    def read_pandas(self, run_dir: str | Path, columns: Optional[list[str]] = None):
        return self.read(run_dir, columns).to_pandas()


@dataclass(frozen=True)
class JsonArtifact:
    name: str
    relpath: str
    producer: str

    def path(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.relpath

    def exists(self, run_dir: str | Path) -> bool:
        return self.path(run_dir).is_file()

    def write(self, run_dir: str | Path, data: dict) -> Path:
        path = self.path(run_dir)
        _atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
        return path

    def read(self, run_dir: str | Path) -> dict:
        path = self.path(run_dir)
        if not path.is_file():
            raise LarcqError(f"no {self.name} at {path}: run `larcq-ray {self.producer}` first")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LarcqError(f"{path} is not valid JSON ({e}); move it away") from None


# -- index (a folder of committed parts; index/store.py reads and writes it) ----------------
INDEX_DIR = "index"
INDEX_CHUNK_SCHEMA = pa.schema([
    ("audio_id", pa.string()),
    ("chunk_index", pa.int32()),  # -1: the whole-file embedding
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("embedding", pa.list_(pa.float32())),
])
INDEX_FILE_SCHEMA = pa.schema([
    ("audio_id", pa.string()),
    ("duration_s", pa.float64()),
    ("sample_rate", pa.int32()),
    ("channels", pa.int32()),
    ("n_chunks", pa.int32()),
    ("status", pa.string()),  # "ok", "failed", or "deleted" (the file left the corpus)
    ("error", pa.string()),
    ("warning", pa.string()),
    ("size_bytes", pa.int64()),  # of the file when it was indexed: a changed file is indexed again
    ("mtime_ns", pa.int64()),
])

# -- search ---------------------------------------------------------------------------------
QUERIES = TableArtifact("query embeddings", "queries.parquet", pa.schema([
    ("query_id", pa.int32()),
    ("audio_id", pa.string()),  # ground truth
    ("chunk_index", pa.int32()),  # -1: the whole query
    ("text", pa.string()),
    ("embedding", pa.list_(pa.float32())),
    ("truncated", pa.bool_()),
]), "search")
QUERIES_META = JsonArtifact("query embedding settings", "queries_meta.json", "search")
SHORTLIST = TableArtifact("shortlist", "shortlist.parquet", pa.schema([
    ("query_id", pa.int32()),
    ("mode", pa.string()),
    ("rank", pa.int32()),
    ("audio_id", pa.string()),
    ("score", pa.float32()),
]), "search")
GT_RANKS = TableArtifact("ground-truth ranks", "gt_ranks.parquet", pa.schema([
    ("query_id", pa.int32()),
    ("mode", pa.string()),
    ("gt_audio_id", pa.string()),
    ("gt_rank", pa.int64()),  # 0: the ground truth is not indexed
    ("gt_score", pa.float32()),
]), "search")
SEARCH_META = JsonArtifact("search summary", "search_meta.json", "search")
# The answer to each query, with or without ground truth: its top search.results_k audios per mode
# and, for modes that score audio chunks (audio-max*, audio-sum*), the best-matching window of each
# audio for each query chunk (one row per query chunk; chunk -1 is the whole query, for audio-max /
# audio-sum). Modes that score whole files (none, query-*) have one row per audio, window columns null.
RESULTS = TableArtifact("search results", "results.parquet", pa.schema([
    ("query_id", pa.int32()),  # row number, as in shortlist.parquet
    ("query_name", pa.string()),  # the CSV's query_id cell, else the row number
    ("query", pa.string()),
    ("mode", pa.string()),
    ("rank", pa.int32()),
    ("audio_id", pa.string()),
    ("score", pa.float32()),  # the mode's score of the audio
    ("query_chunk", pa.int32()),  # -1: the whole query; null: the mode has no windows
    ("query_chunk_text", pa.string()),
    ("start_s", pa.float64()),  # the audio window (index chunk) most similar to the query chunk
    ("end_s", pa.float64()),
    ("window_score", pa.float32()),  # that window's similarity to the query chunk
]), "search")
RESULTS_MD = "results.md"  # the same answers, readable: the top audios of search.results_mode per query


def retrieved_csv(mode: str) -> str:
    """The research code's layout: query, retrieved_audio_1..k, groundtruth_audio."""
    return f"retrieved_{mode}.csv"


# -- caption --------------------------------------------------------------------------------
CAPTIONS = TableArtifact("captions", "captions.parquet", pa.schema([
    ("audio_id", pa.string()),
    ("chunk_index", pa.int32()),  # -1: the timeline caption of the whole file
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("captioner", pa.string()),
    ("prompt", pa.string()),
    ("caption", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("settings", pa.string()),  # JSON of every setting that changes a caption: resume compares it
]), "caption", defaults={"settings": ""})
CAPTION_PARTS_DIR = "captions.parts"  # committed while the job runs; folded into captions.parquet at its end

# -- rerank ---------------------------------------------------------------------------------
RERANKED = TableArtifact("re-ranked shortlist", "reranked.parquet", pa.schema([
    ("query_id", pa.int32()),
    ("rank", pa.int32()),
    ("audio_id", pa.string()),
    ("clap_rank", pa.int32()),
    ("clap_score", pa.float32()),
    ("rerank_score", pa.float32()),
    ("final_score", pa.float32()),
    ("note", pa.string()),  # why a candidate kept its CLAP score (no caption, the query's re-rank failed)
]), "rerank")
RERANK_META = JsonArtifact("re-rank summary", "rerank_meta.json", "rerank")

# -- evaluate -------------------------------------------------------------------------------
METRICS = JsonArtifact("metrics", "metrics.json", "evaluate")
REPORT = "report.md"
RECALL_PLOT = "recall_at_k.png"

# -- eval-alm (in its --out folder: a captioner judged on a seed-004 test list) -------------------
ALM_SUBMISSION = "submission.csv"  # testset_id,text (evaluate/alm_submission.py writes and checks it)
ALM_PREDICTIONS = TableArtifact("ALM predictions", "predictions.parquet", pa.schema([
    ("id", pa.string()),  # the testset_id ("#<index>" for an entry without one)
    ("path", pa.string()),
    ("task", pa.string()),  # as the test list says
    ("prediction", pa.string()),  # "" when the item failed
    ("reference", pa.string()),  # null for blind sets
    ("status", pa.string()),  # ok | failed
    ("error", pa.string()),
]), "eval-alm")
ALM_EVAL = JsonArtifact("ALM evaluation", "eval.json", "eval-alm")

# -- a benchmark folder (synthesize writes it; index, search and train-clap read it) -----------
BENCHMARK_QUERIES = "queries.csv"  # audio_id, query, split_1 ... split_N
BENCHMARK_AUDIOS = "audios"
PROVENANCE = TableArtifact("provenance", "provenance.parquet", pa.schema([
    ("audio_id", pa.string()),
    ("position", pa.int32()),  # 1-based place of the clip in its long audio
    ("source_file", pa.string()),
    ("caption", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
]), "synthesize")

# -- the run itself -------------------------------------------------------------------------
RUN_CONFIG = "config.yaml"  # the config a run was started with
