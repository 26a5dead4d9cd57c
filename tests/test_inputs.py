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
