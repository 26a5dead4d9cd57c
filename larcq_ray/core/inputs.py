"""Typed inputs: the corpus (which files, under which ids) and the benchmark (queries.csv).

An audio id is a path relative to the corpus root, with '/' separators, that stays inside it.
"""

from __future__ import annotations

import csv
import glob as globlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from larcq_ray.core.errors import LarcqError


class DataConfig(BaseModel):
    """Where the audio and the queries are (the `data` section of a pipeline config)."""

    model_config = ConfigDict(extra="forbid")
    # LARCQ layout: <benchmark>/queries.csv and <benchmark>/audios/<audio_id>.
    benchmark: Optional[str] = None
    # A corpus without queries: a folder, a text file listing paths (one per line), or a glob.
    corpus: Optional[str] = None
    # Overrides <benchmark>/queries.csv. Its `audio_id` column (ground truth) is optional: without it
    # search answers the queries (results.parquet, results.md) and nothing is evaluated.
    queries_csv: Optional[str] = None
    # Free-text queries (`larcq-ray search --query ...`): when set, searched instead of any CSV.
    queries: list[str] = Field(default_factory=list)
    extensions: list[str] = Field(default_factory=lambda: ["wav", "flac", "ogg", "mp3"])


@dataclass(frozen=True)
class AudioRef:
    audio_id: str
    path: str  # absolute; "" for a rejected entry
    # Why this corpus entry cannot be indexed ("<kind>: <detail>"), "" when it can. A rejected entry
    # (a link leading outside the corpus root, a name that is not UTF-8, a folder that cannot be
    # listed...) is recorded as a failed file under an id no accepted file can have; never decoded.
    reject: str = ""


@dataclass(frozen=True)
class Query:
    query_id: int  # row number in queries.csv (0-based, header excluded): stable ground-truth alignment
    audio_id: Optional[str]  # ground truth; None for a query without one (a user's own search)
    text: str
    splits: tuple[str, ...]  # non-empty split_i cells, in column order
    name: str = ""  # the CSV's query_id cell when it has that column, else the row number

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", str(self.query_id))


def safe_audio_id(raw: str, where: str) -> str:
    """Normalize an audio id and refuse one that is absolute or escapes the corpus root."""
    s = raw.strip().replace("\\", "/")
    if not s:
        raise LarcqError(f"{where}: empty audio_id")
    p = PurePosixPath(s)
    if p.is_absolute() or re.match(r"^[A-Za-z]:", s):
        raise LarcqError(f"{where}: audio_id {raw!r} is an absolute path; ids are relative to the corpus root")
    parts: list[str] = []
    for x in p.parts:
        if x == "..":
            if not parts:
                raise LarcqError(f"{where}: audio_id {raw!r} escapes the corpus root")
            parts.pop()
        elif x not in ("", "."):
            parts.append(x)
    if not parts:
        raise LarcqError(f"{where}: audio_id {raw!r} names no file")
    return "/".join(parts)


def corpus_root(data: DataConfig) -> Path:
    if data.corpus:
        c = Path(data.corpus)
        if c.is_dir():
            return c.resolve()
        if c.is_file():
            return c.resolve().parent  # list file: ids relative to its folder
        return Path(_glob_base(data.corpus)).resolve()
    if data.benchmark:
        return (Path(data.benchmark) / "audios").resolve()
    raise LarcqError("config data: set data.benchmark (LARCQ layout) or data.corpus (folder, list file or glob)")


def _glob_base(pattern: str) -> str:
    base = []
    for part in Path(pattern).parts:
        if any(ch in part for ch in "*?["):
            break
        base.append(part)
    return str(Path(*base)) if base else "."


# Kinds of a rejected entry that only a change of the entry itself (its name, its link) undoes; an
# entry that is accepted again later is indexed even though its earlier row failed for this kind.
# (A folder that cannot be listed is "unreadable", retried on every run like an unreadable file.)
REJECT_KINDS = ("outside", "invalid name")


def readable_path(s: str) -> str:
    r"""A path as the file system gave it, as valid UTF-8 text: bytes that are not UTF-8 (Python's
    surrogate escapes) as \xNN. For messages; ids use `_entry_id`."""
    return os.fsencode(s).decode("utf-8", "backslashreplace")


def _entry_id(posix: str) -> str:
    r"""The id of a rejected entry: its path, losslessly readable. Undecodable bytes become \xNN and
    a backslash \x5c, so every backslash starts an escape: two entries never share an id, and none
    has an accepted file's id (those hold no backslash, see safe_audio_id)."""
    return os.fsencode(posix).replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


def _bad_name(parts: tuple[str, ...]) -> str:
    """Why a path relative to the corpus root cannot be an audio id, or ""."""
    for x in parts:
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return f"invalid name: '{readable_path(x)}' is not valid UTF-8 (undecodable bytes shown as \\xNN)"
        if "\\" in x:  # POSIX only (a separator elsewhere); ids use '/', and read '\' as one
            return f"invalid name: '{x}' holds a backslash, which an audio id cannot"
    return ""


def _corpus_entry(p: Path, root: Path, given: str | None = None) -> AudioRef:
    """One listed path -> its AudioRef, accepted or rejected (`reject` says why).

    An accepted file's id is its real path (links followed) relative to the root. A rejected
    entry's id is its path as listed, relative to the root when it lies there (a link, a bad
    name), else as given (`given`: a list file's line; absolute stays absolute)."""
    lex = Path(os.path.normpath(os.path.abspath(p)))  # as listed: links not followed
    try:
        lex_rel: str | None = lex.relative_to(root).as_posix()
    except ValueError:
        lex_rel = None
    if lex_rel is not None:
        rid = _entry_id(lex_rel)
    elif given is not None and not Path(given).is_absolute():
        rid = _entry_id(os.path.relpath(lex, root).replace(os.sep, "/"))  # "../x.wav"
    else:
        rid = _entry_id(lex.as_posix())
    shown = readable_path(str(lex))
    try:
        real = lex.resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        return AudioRef(rid, "", f"unreadable: cannot follow the link {shown} ({readable_path(str(e))})")
    try:
        rel = real.relative_to(root)
    except ValueError:
        how = "leads to" if lex_rel is not None else "names"  # a link (or a path through one)
        where = readable_path(str(real)) if lex_rel is not None else shown
        return AudioRef(rid, "", f"outside: {how} {where}, outside the corpus root {readable_path(str(root))}")
    bad = _bad_name(rel.parts)
    if bad:
        return AudioRef(_entry_id(rel.as_posix()), "", bad)
    try:
        aid = safe_audio_id(rel.as_posix(), "corpus")
    except LarcqError:  # a list line naming the root itself
        return AudioRef(rid, "", "missing: names the corpus root, not a file")
    return AudioRef(aid, str(real))


def list_corpus(data: DataConfig) -> list[AudioRef]:
    """Every audio file of the corpus, sorted by id. Unreadable files are kept: indexing records why.

    An entry that cannot be accepted (a link or a list line leading outside the corpus root, a
    name that is not UTF-8, a folder that cannot be listed) is kept as a rejected AudioRef, which
    indexing records as one failed file. Only a problem with the corpus as a whole raises: no
    root, a glob matching nothing, no audio (or none that can be accepted)."""
    root = corpus_root(data)
    exts = {"." + e.lower().lstrip(".") for e in data.extensions}
    src = data.corpus
    entries: list[AudioRef] = []
    if src and Path(src).is_file():
        # Bytes that are not UTF-8 name files as the file system has them (POSIX), then are rejected.
        text = Path(src).read_bytes().decode("utf-8", "surrogateescape").lstrip("\ufeff")
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line) if Path(line).is_absolute() else root / line
                entries.append(_corpus_entry(p, root, given=line))
    elif src and not Path(src).is_dir():
        paths = [Path(p) for p in globlib.glob(src, recursive=True) if Path(p).is_file()]
        if not paths:
            raise LarcqError(f"data.corpus: the glob {src!r} matches no files")
        entries = [_corpus_entry(p, root) for p in paths]
    else:
        if not root.is_dir():
            raise LarcqError(f"corpus folder not found: {root}")
        unlisted: list[OSError] = []
        for dp, _, files in os.walk(root, onerror=unlisted.append):
            entries += [_corpus_entry(Path(dp) / f, root) for f in files
                        if Path(f).suffix.lower() in exts and not f.startswith(".")]
        for e in unlisted:
            folder = Path(os.path.abspath(e.filename)) if e.filename else root
            if folder == root:
                raise LarcqError(f"cannot list the corpus folder {readable_path(str(root))}: {e.strerror or e}")
            why = e.strerror or type(e).__name__
            # "<folder>/": ids of files never end with '/', so it cannot be one
            entries.append(AudioRef(_entry_id(folder.relative_to(root).as_posix()) + "/", "",
                                    f"unreadable: cannot list the folder ({why})"))
    refs = {r.audio_id: r for r in entries if not r.reject}
    rejected = {r.audio_id: r for r in entries if r.reject and r.audio_id not in refs}
    if not refs:
        if rejected:
            shown = "; ".join(f"{a}: {r.reject}" for a, r in sorted(rejected.items())[:3])
            raise LarcqError(f"no audio file of the corpus {src or root} can be indexed: {len(rejected)} "
                             f"entr{'y' if len(rejected) == 1 else 'ies'} rejected ({shown}"
                             f"{' ...' if len(rejected) > 3 else ''})")
        raise LarcqError(f"no audio files ({', '.join(sorted(exts))}) found in the corpus {src or root}")
    return [x[1] for x in sorted({**refs, **rejected}.items())]


def queries_csv_path(data: DataConfig) -> Path:
    if data.queries_csv:
        return Path(data.queries_csv)
    if data.benchmark:
        return Path(data.benchmark) / "queries.csv"
    raise LarcqError("config data: searching needs queries: set data.benchmark or data.queries_csv "
                     "(a CSV with a `query` column), or give `larcq-ray search --query \"...\"`")


_SPLIT_COL = re.compile(r"^split_(\d+)$")


def queries_from_texts(texts: list[str], where: str = "data.queries") -> list[Query]:
    """Free-text queries (no ground truth, no split cells), ids 0..n-1 in the given order."""
    out = []
    for i, t in enumerate(texts):
        t = " ".join(str(t).split())
        if not t:
            raise LarcqError(f"{where}: query {i + 1} is empty")
        out.append(Query(i, None, t, ()))
    if not out:
        raise LarcqError(f"{where}: no queries")
    return out


def has_ground_truth(queries: list[Query]) -> bool:
    return any(q.audio_id is not None for q in queries)


def read_queries(path: str | Path) -> list[Query]:
    """Parse queries.csv (`audio_id, query, split_1 ... split_N`, optionally `query_id`).

    Rows may have fewer split cells than the header (ragged) or empty ones; both are skipped,
    never shifted. Rows are never dropped: a query's id is its row number. Without an `audio_id`
    column the queries have no ground truth (a user's own search); with one, every row needs it.
    A `query_id` column names the queries (unique) in search results.
    """
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"queries file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as e:
        raise LarcqError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise LarcqError(f"{path} is empty: expected a header `audio_id,query,split_1,...`")
    header = [h.strip() for h in rows[0]]
    if "query" not in header:
        raise LarcqError(f"{path}: header lacks column(s) ['query']; found {header} "
                         "(a benchmark needs `audio_id,query,split_1,...`; your own queries need `query`)")
    dupes = sorted({h for h in header if header.count(h) > 1 and h})
    if dupes:
        raise LarcqError(f"{path}: duplicate column(s) {dupes} in the header")
    if "audio_id" not in header:
        # Queries without ground truth have only these columns; anything else (e.g. `audio`) is more
        # likely a benchmark whose ground-truth column is misnamed than extra data to ignore.
        other = [h for h in header if h not in ("query", "query_id") and not _SPLIT_COL.match(h)]
        if other:
            raise LarcqError(f"{path}: header lacks column(s) ['audio_id']; found {header} (queries without "
                             "ground truth may have only query, query_id and split_N columns)")
    i_aid = header.index("audio_id") if "audio_id" in header else None
    i_q = header.index("query")
    i_name = header.index("query_id") if "query_id" in header else None
    names: dict[str, int] = {}
    split_cols = sorted(
        ((int(m.group(1)), i) for i, h in enumerate(header) if (m := _SPLIT_COL.match(h))), key=lambda t: t[0]
    )
    queries: list[Query] = []
    for n, row in enumerate(rows[1:]):
        line = n + 2
        if not row or all(not c.strip() for c in row):
            raise LarcqError(f"{path}:{line}: empty row (every row is a query; remove it or fill it)")
        if len(row) > len(header):
            raise LarcqError(f"{path}:{line}: {len(row)} cells but the header has {len(header)} columns")
        cell = lambda i: row[i].strip() if i < len(row) else ""  # noqa: E731
        aid = safe_audio_id(cell(i_aid), f"{path}:{line}") if i_aid is not None else None
        q = cell(i_q)
        if not q:
            raise LarcqError(f"{path}:{line}: empty query" + (f" for audio {aid!r}" if aid else ""))
        splits = tuple(cell(i) for _, i in split_cols if cell(i))
        name = ""
        if i_name is not None:
            name = cell(i_name)
            if not name:
                raise LarcqError(f"{path}:{line}: empty query_id")
            if name in names:
                raise LarcqError(f"{path}:{line}: query_id {name!r} already names the query on line {names[name]}")
            names[name] = line
        queries.append(Query(len(queries), aid, q, splits, name))
    if not queries:
        raise LarcqError(f"{path} has a header but no queries")
    return queries


def check_queries_against_corpus(queries: list[Query], audio_ids: set[str], root: Path) -> None:
    missing = sorted({q.audio_id for q in queries if q.audio_id is not None and q.audio_id not in audio_ids})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LarcqError(
            f"queries name {len(missing)} audio file(s) that are not in the corpus {root}: {shown}"
        )


def read_audio_id_list(path: str | Path) -> list[str]:
    """Audio ids from a file: .txt (one per line, '#' comments), .csv (an `audio_id` column, else
    the first column) or .parquet (an `audio_id` column). Order kept, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise LarcqError(f"audio id list {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if "audio_id" not in names:
            raise LarcqError(f"{path} has no audio_id column (columns: {names})")
        ids = [str(x) for x in pq.read_table(path, columns=["audio_id"]).column("audio_id").to_pylist() if x is not None]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise LarcqError(f"{path} is empty")
        col = rows[0].index("audio_id") if "audio_id" in rows[0] else 0
        ids = [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        ids = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not ids:
        raise LarcqError(f"audio id list {path} holds no ids")
    return list(dict.fromkeys(ids))
