import pytest

from larcq_ray.config import DataConfig
from larcq_ray.core.errors import LarcqError
from larcq_ray.core.inputs import check_queries_against_corpus, list_corpus, read_queries, safe_audio_id
from larcq_ray.search.query_chunking import query_chunks, split_sentences


def write(p, text):
    p.write_text(text)
    return p


def test_ragged_rows_and_empty_cells_are_skipped_not_shifted(tmp_path):
    p = write(tmp_path / "q.csv",
              "audio_id,query,split_1,split_2,split_3\n"
              "a.wav,\"a dog barks, rain falls\",a dog barks,rain falls\n"
              "b.wav,one thing,,one thing,\n"
              "sub/c.wav,no splits\n")
    qs = read_queries(p)
    assert [q.query_id for q in qs] == [0, 1, 2]
    assert qs[0].splits == ("a dog barks", "rain falls")
    assert qs[1].splits == ("one thing",)
    assert qs[2].splits == () and qs[2].audio_id == "sub/c.wav"


def test_split_columns_sorted_numerically_and_bom_tolerated(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes("\ufeffaudio_id,query,split_10,split_2\nx.wav,q,ten,two\n".encode("utf-8"))
    assert read_queries(p)[0].splits == ("two", "ten")


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("audio_id,split_1\na.wav,s\n", "lacks column"),  # no `query` column (audio_id is optional)
    ("audio_id,query\n", "no queries"),
    ("audio_id,query\na.wav,\n", "empty query"),
    ("audio_id,query\na.wav,q,extra\n", "cells but the header"),
    ("audio_id,query\n../x.wav,q\n", "escapes the corpus root"),
    ("audio_id,query\n/etc/passwd,q\n", "absolute path"),
    ("audio_id,query,query\na,b,c\n", "duplicate column"),
    ("audio_id,query\na.wav,q\n,\n", "empty row"),
])
def test_malformed_csv_names_the_problem(tmp_path, text, match):
    p = write(tmp_path / "q.csv", text)
    with pytest.raises(LarcqError, match=match):
        read_queries(p)


def test_non_utf8_and_missing_file(tmp_path):
    p = tmp_path / "q.csv"
    p.write_bytes(b"audio_id,query\na.wav,caf\xe9\n")
    with pytest.raises(LarcqError, match="not UTF-8"):
        read_queries(p)
    with pytest.raises(LarcqError, match="not found"):
        read_queries(tmp_path / "none.csv")


def test_safe_audio_id_normalizes():
    assert safe_audio_id("./sub//a.wav", "t") == "sub/a.wav"
    assert safe_audio_id("sub\\a.wav", "t") == "sub/a.wav"
    assert safe_audio_id("a/../b.wav", "t") == "b.wav"
    with pytest.raises(LarcqError):
        safe_audio_id("a/../../b.wav", "t")


def test_corpus_folder_list_file_and_glob(tmp_path):
    root = tmp_path / "c"
    (root / "sub").mkdir(parents=True)
    for name in ["a.wav", "sub/b.flac", "c.txt", ".hidden.wav"]:
        (root / name).write_bytes(b"x")
    refs = list_corpus(DataConfig(corpus=str(root)))
    assert [r.audio_id for r in refs] == ["a.wav", "sub/b.flac"]
    lst = write(root / "list.txt", "a.wav\n# comment\n\nsub/b.flac\n")
    assert [r.audio_id for r in list_corpus(DataConfig(corpus=str(lst)))] == ["a.wav", "sub/b.flac"]
    assert [r.audio_id for r in list_corpus(DataConfig(corpus=str(root / "**" / "*.flac")))] == ["sub/b.flac"]
    with pytest.raises(LarcqError, match="matches no files"):
        list_corpus(DataConfig(corpus=str(root / "*.ogg")))
    with pytest.raises(LarcqError, match="set data.benchmark"):
        list_corpus(DataConfig())


def test_queries_naming_missing_audio_fail_clearly(tmp_path):
    qs = read_queries(write(tmp_path / "q.csv", "audio_id,query\na.wav,x\nb.wav,y\n"))
    check_queries_against_corpus(qs, {"a.wav", "b.wav"}, tmp_path)
    with pytest.raises(LarcqError, match="1 audio file.*b.wav"):
        check_queries_against_corpus(qs, {"a.wav"}, tmp_path)


def test_query_chunking_modes(tmp_path):
    qs = read_queries(write(tmp_path / "q.csv",
                            "audio_id,query,split_1,split_2\n"
                            "a.wav,\"A dog barks. Rain falls, a car passes!\",dog,rain\n"
                            "b.wav,lonely,,\n"))
    assert query_chunks(qs[0], "columns") == (["dog", "rain"], False)
    assert query_chunks(qs[0], "sentences") == (["A dog barks", "Rain falls", "a car passes"], False)
    assert query_chunks(qs[0], "none") == (["A dog barks. Rain falls, a car passes!"], False)
    assert query_chunks(qs[1], "columns") == (["lonely"], True)  # no splits: the query itself, flagged
    assert split_sentences("a dog barks, rain falls on a roof, a car passes by") == [
        "a dog barks", "rain falls on a roof", "a car passes by"]


def _bytes_name_ok(folder) -> bool:
    """Whether this file system takes a file name that is not UTF-8 (Linux does, macOS does not)."""
    import os

    try:
        open(os.fsencode(str(folder)) + b"/probe\xff.wav", "wb").close()
    except OSError:
        return False
    os.remove(os.fsencode(str(folder)) + b"/probe\xff.wav")
    return True


def _lock(monkeypatch, folder):
    """Make `folder` unlistable, as chmod 000 would (CI runs as root, where chmod does not stop reads)."""
    import os

    real = os.scandir
    locked = os.path.realpath(folder)

    def scandir(path=".", *a, **k):
        if os.path.abspath(os.fspath(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)


def test_entries_that_cannot_be_accepted_are_rejected_one_by_one(tmp_path, monkeypatch):
    import os

    root, out = tmp_path / "c", tmp_path / "out"
    (root / "sub").mkdir(parents=True)
    (root / "locked").mkdir()
    out.mkdir()
    for p in [root / "a.wav", root / "sub" / "b.wav", root / "locked" / "c.wav", out / "o.wav"]:
        p.write_bytes(b"x")
    (root / "link.wav").symlink_to(out / "o.wav")  # leads outside: never followed
    (root / "sub" / "in.wav").symlink_to(root / "a.wav")  # inside: the same file, one id
    (root / "loop.wav").symlink_to("loop.wav")
    (root / "back\\slash.wav").write_bytes(b"x")  # ids read '\' as '/': this name cannot be an id
    bytes_names = _bytes_name_ok(root)
    if bytes_names:
        open(os.fsencode(str(root)) + b"/bad\xff.wav", "wb").close()
        (root / "bad\\xff.wav").write_bytes(b"x")  # looks like the escaped id above; must not share it
    _lock(monkeypatch, root / "locked")

    refs = {r.audio_id: r for r in list_corpus(DataConfig(corpus=str(root)))}
    assert {a for a, r in refs.items() if not r.reject} == {"a.wav", "sub/b.wav"}
    assert refs["a.wav"].path == str((root / "a.wav").resolve())
    got = {a: r.reject.split(":", 1)[0] for a, r in refs.items() if r.reject}
    want = {"link.wav": "outside", "loop.wav": "unreadable", "locked/": "unreadable",
            "back\\x5cslash.wav": "invalid name"}
    if bytes_names:
        want.update({"bad\\xff.wav": "invalid name", "bad\\x5cxff.wav": "invalid name"})
    assert got == want
    assert "outside the corpus root" in refs["link.wav"].reject and str(out / "o.wav") in refs["link.wav"].reject
    assert "Permission denied" in refs["locked/"].reject
    for r in refs.values():  # every id and reason can be written as UTF-8 (Parquet); none is decoded
        r.audio_id.encode("utf-8"), r.reject.encode("utf-8")
        assert (r.path == "") == bool(r.reject)
    assert list(refs) == sorted(refs)

    # The root itself cannot be listed: a problem with the corpus as a whole.
    _lock(monkeypatch, root)
    with pytest.raises(LarcqError, match="cannot list the corpus folder"):
        list_corpus(DataConfig(corpus=str(root)))


def test_list_file_lines_outside_the_root_are_rejected(tmp_path):
    root, out = tmp_path / "c", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    (root / "a.wav").write_bytes(b"x")
    (out / "o.wav").write_bytes(b"x")
    (root / "link.wav").symlink_to(out / "o.wav")
    lst = write(root / "list.txt", f"a.wav\n../out/o.wav\n{out / 'o.wav'}\nlink.wav\n{root / 'a.wav'}\nmissing.wav\n")
    refs = {r.audio_id: r for r in list_corpus(DataConfig(corpus=str(lst)))}
    assert {a: r.reject.split(":", 1)[0] for a, r in refs.items()} == {
        "a.wav": "", "missing.wav": "",  # missing: decoding says so
        "../out/o.wav": "outside", str(out / "o.wav"): "outside", "link.wav": "outside"}

    # Nothing at all that can be accepted: the corpus as a whole is wrong.
    only_out = write(root / "out.txt", f"{out / 'o.wav'}\n")
    with pytest.raises(LarcqError, match="no audio file of the corpus .* can be indexed: 1 entry rejected"):
        list_corpus(DataConfig(corpus=str(only_out)))
