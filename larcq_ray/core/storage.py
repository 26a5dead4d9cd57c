"""Where artifacts live: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Two ways in:
- `open_location(uri)` -> a `Location` (filesystem + base path) that tasks on any node use to
  read and write bytes directly; the benchmark synthesizer writes its audios this way.
- `staged_run_dir(run_dir)`: the small artifacts the driver writes (shortlist, caption parts,
  metrics) live in a local scratch copy of a remote run_dir: its files are copied there first
  (that is what makes resume work on object stores), the stage works there, and new or changed
  files are uploaded when it ends, also when it fails. `publish(path)` uploads one file at once:
  a job calls it when it commits (caption parts), so what it committed survives the driver's
  death. The index is not staged: it is read and written in place (index/store.py), by the
  workers, so `index/` is neither downloaded nor uploaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from larcq_ray.core.errors import LarcqError

log = logging.getLogger(__name__)


def is_uri(location: str) -> bool:
    """True for `scheme://...` (file:// included); False for plain paths (Windows drives too)."""
    scheme, sep, _ = str(location).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").isalnum()


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    base: str  # path inside fs, no trailing slash
    uri: str  # as the user wrote it

    def path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write; on local disks via a temp file + rename, so readers never see half a file."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{target}.tmp-{os.getpid()}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, target)
        else:  # object stores: a PUT is already all-or-nothing
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def list_files(self, rel: str = "") -> list[str]:
        """Relative paths of all files under rel (recursive), sorted."""
        root = self.path(rel)
        if self.fs.get_file_info(root).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True))
        prefix = self.base.rstrip("/") + "/"
        return sorted(i.path[len(prefix):] if i.path.startswith(prefix) else i.path
                      for i in infos if i.type == pafs.FileType.File)


def open_location(location: str | Path) -> Location:
    location = str(location)
    if not is_uri(location):
        return Location(pafs.LocalFileSystem(), str(Path(location).expanduser().resolve()), location)
    try:
        fs, base = pafs.FileSystem.from_uri(location)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise LarcqError(f"cannot open {location!r} as a filesystem URI: {e}") from None
    return Location(fs, base.rstrip("/"), location)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


# Folders of run_dir that stages read and write in place (never staged).
IN_PLACE = ("index/",)
_staged: dict[Path, Location] = {}  # local scratch folder -> the run_dir it stands for


def publish(path: str | Path) -> bool:
    """Upload `path` now if it lies in a staged run_dir's scratch folder; False when nothing is staged."""
    p = Path(path).resolve()
    for scratch, loc in list(_staged.items()):
        try:
            rel = p.relative_to(scratch)
        except ValueError:
            continue
        loc.write_bytes(rel.as_posix(), p.read_bytes())
        return True
    return False


@contextlib.contextmanager
def staged_run_dir(run_dir: str) -> Iterator[Path]:
    """A local folder standing for run_dir for the duration of a stage (see the module doc)."""
    if not is_uri(run_dir):
        yield Path(run_dir)
        return
    loc = open_location(run_dir)
    scratch = Path(tempfile.mkdtemp(prefix="larcq_run_")).resolve()
    _staged[scratch] = loc
    try:
        pulled = [rel for rel in loc.list_files() if not rel.startswith(IN_PLACE)]
        for rel in pulled:
            dest = scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(loc.read_bytes(rel))
        if pulled:
            log.info("staged %d files of %s in %s", len(pulled), run_dir, scratch)
        before = _snapshot(scratch)
        try:
            yield scratch
        finally:
            after = _snapshot(scratch)
            changed = [rel for rel, st in after.items() if before.get(rel) != st]
            for rel in sorted(changed):
                loc.write_bytes(rel, (scratch / rel).read_bytes())
            for rel in sorted(set(before) - set(after)):  # e.g. orphan index parts cleaned up
                loc.delete(rel)
            if changed:
                log.info("uploaded %d files to %s", len(changed), run_dir)
    finally:
        _staged.pop(scratch, None)
        shutil.rmtree(scratch, ignore_errors=True)
