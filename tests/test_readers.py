"""Readers on good and broken files: every error names the file and the line, and the good variants (BOM, CRLF,
gzip, BEIR header) read the same as plain files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.readers import (Corpus, DataError, check_qrels_in_corpus, read_candidates, read_qrels, read_queries,
                              read_run, write_run)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def raises_at(path: Path, line: int | None, match: str):
    """pytest.raises for a DataError whose message starts with `file:line:` and mentions `match`."""
    where = f"{path}:{line}: " if line else f"{path}: "
    return pytest.raises(DataError, match=_escape(where) + ".*" + match)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------- queries


def test_queries_tsv_good_variants_read_the_same(tmp_path):
    plain = write(tmp_path / "q.tsv", "1\tfirst query\n2\tsecond query\n")
    bom_crlf = write(tmp_path / "q_bom.tsv", b"\xef\xbb\xbf1\tfirst query\r\n2\tsecond query\r\n")
    gz = tmp_path / "q.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    expected = {"1": "first query", "2": "second query"}
    assert read_queries(plain) == expected
    assert read_queries(bom_crlf) == expected
    assert read_queries(gz) == expected
    assert list(read_queries(plain)) == ["1", "2"]  # ids stay strings


def test_queries_beir_jsonl(tmp_path):
    path = write(tmp_path / "queries.jsonl", '{"_id": "a", "text": "what is x"}\n{"_id": 7, "text": "y?"}\n')
    assert read_queries(path) == {"a": "what is x", "7": "y?"}


@pytest.mark.parametrize("content,line,match", [
    ("1\tok\n2\n", 2, "expected 2 columns"),
    ("1\tok\n1\tagain\n", 2, "duplicate query id '1'"),
    ("1\tok\n 2\tpadded id\n", 2, "leading or trailing whitespace"),
    ("1\tok\n2\t  \n", 2, "empty text"),
    ("1\tok\n\n2\tx\n", 2, "blank line"),
    ("1\tok\n\tno id\n", 2, "empty id"),
    ("\n\n", None, "file is empty \\(blank lines only\\)"),
])
def test_queries_tsv_errors_name_file_and_line(tmp_path, content, line, match):
    path = write(tmp_path / "queries.tsv", content)
    with raises_at(path, line, match):
        read_queries(path)


@pytest.mark.parametrize("header", ["id\ttext", "pid\tpassage", "docid\ttext", "_id\ttext", "qid\tquery",
                                    "query_id\tQuery"])
def test_a_header_line_is_skipped_with_a_warning(tmp_path, caplog, header):
    # a header read as a record becomes passage "id": retrieved, and mined as a hard negative
    queries = write(tmp_path / "queries.tsv", f"{header}\n1\tfirst\n")
    with caplog.at_level("WARNING"):
        assert read_queries(queries) == {"1": "first"}
    assert f"{queries}: line 1" in caplog.text and "header" in caplog.text
    corpus = _corpus(tmp_path, f"{header}\n0\tzero\n1\tone\n")
    assert len(corpus) == 2 and corpus.lookup(["0", "1"]).tolist() == [0, 1]
    # only line 1, and only words: a decimal id or a real text is a record
    assert read_queries(write(tmp_path / "q2.tsv", "1\ttext\n2\tquery\n")) == {"1": "text", "2": "query"}
    assert read_queries(write(tmp_path / "q3.tsv", "id\twhat is an id\n")) == {"id": "what is an id"}
    assert read_queries(write(tmp_path / "q4.tsv", "id\ttext\nid\ttext\n")) == {"id": "text"}


@pytest.mark.parametrize("name,read", [("queries.tsv", read_queries),
                                       ("collection.tsv", lambda p: Corpus.open(p, p.parent / "cache"))])
def test_an_extra_column_is_an_error_not_text(tmp_path, name, read):
    # MS MARCO texts hold no tab: a third field is a shifted column that would be indexed as text unnoticed
    path = write(tmp_path / name, "1\tone\n2\ttwo\textra\n")
    with raises_at(path, 2, r"expected 2 columns \(id \\t text\), found 3: '2\\ttwo\\textra'"):
        read(path)


@pytest.mark.parametrize("name,content,read", [
    ("queries.tsv", "1\tone\n2\ttwo\n\n", read_queries),
    ("qrels.txt", "1 Q0 10 2\n2 Q0 11 0\n\n \n", read_qrels),
    ("qrels.tsv", "query-id\tcorpus-id\tscore\n1\t10\t2\n2\t11\t0\n\r\n", read_qrels),
    ("run.trec", "1 Q0 10 1 0.5 t\n2 Q0 11 1 0.4 t\n\n", read_run),
    ("collection.tsv", "1\tone\n2\ttwo\n\n\n", lambda p: Corpus.open(p, p.parent / "cache").texts_at([0, 1])),
])
def test_blank_lines_at_the_end_are_accepted(tmp_path, name, content, read):
    # editors and `echo >> file` leave them; only a blank line with records after it is suspect (test above)
    assert len(read(write(tmp_path / name, content))) == 2


def test_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "q.tsv", b"1\tfine\n2\tbad \xff byte\n")
    with raises_at(path, 2, "invalid UTF-8"):
        read_queries(path)


def test_truncated_gzip_is_a_data_error(tmp_path):
    data = gzip.compress("".join(f"{i}\tquery number {i} with some words\n" for i in range(5000)).encode())
    path = write(tmp_path / "q.tsv.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match=_escape(str(path)) + r":\d+: corrupt or truncated gzip"):
        read_queries(path)


def test_empty_and_missing_files(tmp_path):
    empty = write(tmp_path / "empty.tsv", "")
    with raises_at(empty, None, "file is empty"):
        read_queries(empty)
    with raises_at(tmp_path / "nope.tsv", None, "file not found"):
        read_queries(tmp_path / "nope.tsv")


def test_a_missing_file_whose_gzipped_copy_is_there_says_so(tmp_path):
    # data.root at a folder of gzipped files: the config names collection.tsv, the folder holds collection.tsv.gz
    write(tmp_path / "collection.tsv.gz", gzip.compress(b"0\tsome passage\n"))
    with raises_at(tmp_path / "collection.tsv", None, r"file not found \(collection.tsv.gz is there"):
        read_queries(tmp_path / "collection.tsv")


@pytest.mark.parametrize("content,line,match", [
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"\n', 2, "invalid JSON"),
    ('{"_id": "a", "text": "x"}\n["b", "y"]\n', 2, "expected a JSON object"),
    ('{"_id": "a", "text": "x"}\n{"text": "y"}\n', 2, "missing id field"),
    ('{"_id": "a", "text": "x"}\n{"_id": "b"}\n', 2, "missing text field"),
    ('{"_id": "a", "text": "x"}\n{"_id": true, "text": "y"}\n', 2, "id must be a string or integer"),
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": 3}\n', 2, "must be strings"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, match):
    path = write(tmp_path / "queries.jsonl", content)
    with raises_at(path, line, match):
        read_queries(path)


# --------------------------------------------------------------------------- qrels


def test_qrels_formats_read_the_same(tmp_path):
    trec = write(tmp_path / "qrels.txt", "1 Q0 10 2\n1 Q0 11 0\n2 0 12 1\n")
    msmarco = write(tmp_path / "qrels.tsv", "1\t0\t10\t2\n1\t0\t11\t0\n2\t0\t12\t1\n")
    beir = write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\r\n1\t10\t2\r\n1\t11\t0\r\n2\t12\t1\r\n")
    expected = {"1": {"10": 2, "11": 0}, "2": {"12": 1}}
    assert read_qrels(trec) == read_qrels(msmarco) == read_qrels(beir) == expected


@pytest.mark.parametrize("content,line,match", [
    ("1 Q0 10 2\n1 Q0 11\n", 2, "expected 4 columns"),
    ("1 Q0 10 2\n1 Q0 11 high\n", 2, "grade 'high' is not an integer"),
    ("1 Q0 10 2\n1 Q0 10 1\n", 2, "conflicting grades"),
    ("1 Q0 10 2\n\n1 Q0 11 1\n", 2, "blank line"),
    ("query-id\tcorpus-id\tscore\n1\t10\n", 2, "expected 3 tab-separated columns"),
    # BEIR's rows without their header line: the one format hint the reader has
    ("1\t10\t2\n", 1, r"found 3: '1\\t10\\t2' \(a BEIR qrels file starts with its tab-separated header line: "
                       r"query-id, corpus-id, score\)"),
])
def test_qrels_errors_name_file_and_line(tmp_path, content, line, match):
    path = write(tmp_path / "qrels.txt", content)
    with raises_at(path, line, match):
        read_qrels(path)


def test_qrels_header_only(tmp_path):
    path = write(tmp_path / "test.tsv", "query-id\tcorpus-id\tscore\n")
    with raises_at(path, None, "no judgements"):
        read_qrels(path)


def test_qrels_with_unknown_ids_fail_past_the_threshold(tmp_path):
    corpus = _corpus(tmp_path, "1\tone\n2\ttwo\n3\tthree\n4\tfour\n")
    qrels = read_qrels(write(tmp_path / "qrels.txt", "q Q0 1 1\nq Q0 2 1\nq Q0 99 1\nq Q0 98 1\n"))
    with pytest.raises(DataError, match=r"qrels\.txt: 2 of 4 judged passages \(50\.0%\) are not in the corpus"):
        check_qrels_in_corpus(qrels, corpus, str(tmp_path / "qrels.txt"), max_missing_fraction=0.25)
    assert check_qrels_in_corpus(qrels, corpus, "qrels.txt", max_missing_fraction=0.5) == 2


# --------------------------------------------------------------------------- runs and candidates


def test_run_round_trip_keeps_trec_eval_order(tmp_path):
    run = {"q1": {"a": 0.5, "b": 0.5, "c": 0.9}, "q2": {"d": np.float32(0.123456789)}}
    path = tmp_path / "run.trec"
    write_run(path, run, tag="t")
    lines = path.read_text().splitlines()
    assert [line.split()[2] for line in lines[:3]] == ["c", "b", "a"]  # ties: doc id descending, like trec_eval
    assert [line.split()[3] for line in lines[:3]] == ["1", "2", "3"]
    back = read_run(path)
    assert np.float32(back["q2"]["d"]) == np.float32(0.123456789)  # float32 scores survive: no new ties


@pytest.mark.parametrize("content,line,match", [
    ("1 Q0 a 1 0.5 t\n1 Q0 b 2 0.4\n", 2, "expected 6 columns"),
    ("1 Q0 a 1 0.5 t\n1 Q0 b two 0.4 t\n", 2, "must be an integer"),
    ("1 Q0 a 1 0.5 t\n1 Q0 b 2 nan t\n", 2, "not finite"),
    ("1 Q0 a 1 0.5 t\n1 Q0 a 2 0.4 t\n", 2, "appears twice"),
])
def test_run_errors_name_file_and_line(tmp_path, content, line, match):
    path = write(tmp_path / "run.trec", content)
    with raises_at(path, line, match):
        read_run(path)


def test_candidates_top1000_and_run(tmp_path):
    top = write(tmp_path / "top1000.tsv", "1\t10\twhat\tpassage ten\n1\t11\twhat\tpassage eleven\n2\t10\twho\tpassage ten\n")
    cands = read_candidates(top)
    assert cands.ranked == {"1": ["10", "11"], "2": ["10"]}
    assert cands.queries == {"1": "what", "2": "who"} and cands.passages["11"] == "passage eleven"
    run = write(tmp_path / "run.trec", "1 Q0 10 1 0.5 t\n1 Q0 11 2 0.7 t\n")
    assert read_candidates(run).ranked == {"1": ["11", "10"]}
    bad = write(tmp_path / "bad.tsv", "1\t10\twhat\tpassage\n1\t11\twhat else\tpassage\n")
    with raises_at(bad, 2, "two different texts"):
        read_candidates(bad)


# --------------------------------------------------------------------------- corpus


def _corpus(tmp_path: Path, content: str, name: str = "collection.tsv") -> Corpus:
    return Corpus.open(write(tmp_path / name, content), tmp_path / "cache")


def test_corpus_dense_lookup(tmp_path):
    corpus = _corpus(tmp_path, "0\tzero\n1\tone\n5\tfive\n")
    assert corpus._dense is not None
    assert corpus.lookup(["5", "0", "7", "05", "x"]).tolist() == [2, 0, -1, -1, -1]
    assert corpus.texts(["1", "5"]) == ["one", "five"]
    assert "1" in corpus and "2" not in corpus
    with pytest.raises(DataError, match="1 passage ids not in the corpus"):
        corpus.rows(["1", "2"])
    again = Corpus.open(tmp_path / "collection.tsv", tmp_path / "cache")
    assert again.folder == corpus.folder  # converted once, then memory-mapped


def test_only_ascii_digits_are_dense_ids(tmp_path):
    # full-width and Arabic-Indic digits are other ids, never passage 12 (and '²' is no crash)
    corpus = _corpus(tmp_path, "".join(f"{i}\tp{i}\n" for i in range(20)))
    assert corpus._dense is not None
    assert corpus.lookup(["12", "\uff11\uff12", "\u0661\u0662", "\u00b2"]).tolist() == [12, -1, -1, -1]
    odd = Corpus.open(write(tmp_path / "odd.tsv", "1\tone\n\u00b2\tsquare\n"), tmp_path / "cache-odd")
    assert odd.lookup(["\u00b2", "1"]).tolist() == [1, 0]


def test_corpus_dense_lookup_array_matches_lookup(tmp_path):
    # the vectorised lookup maps run/qrels ids to rows: a padded id ("05") is another document, never passage 5,
    # and the highest id must resolve (it is the last slot of the dense index)
    pa = pytest.importorskip("pyarrow")
    corpus = _corpus(tmp_path, "0\tzero\n1\tone\n5\tfive\n")
    assert corpus._dense is not None
    pids = ["5", "0", "1", "05", "007", "00", "7", "6", "x", "-1", "+5", " 5", "5.0", "\uff15", "1" + "0" * 18]
    expected = [2, 0, 1] + [-1] * 12
    assert corpus.lookup(pids).tolist() == expected
    assert corpus.lookup_array(pa.array(pids)).tolist() == expected
    assert corpus.lookup_array(pa.chunked_array([pa.array(["5"]), pa.array(["05", "1"])])).tolist() == [2, -1, 1]
    assert corpus.lookup_array(pa.array(["5"])).tolist() == [2]  # the highest id alone


def test_corpus_hash_lookup_rejects_a_hash_collision(tmp_path, monkeypatch):
    # ids are found by a 64-bit hash: an unknown id whose hash collides with a corpus id must stay unknown
    import pipeline.readers as readers

    folder = tmp_path / "beir"
    folder.mkdir()
    write(folder / "corpus.jsonl", "".join(json.dumps({"_id": i, "text": f"t {i}"}) + "\n"
                                           for i in ("doc-b", "doc-a", "MED-10")))
    corpus = Corpus.open(folder, tmp_path / "cache")
    assert corpus._dense is None
    real = readers._hash64
    monkeypatch.setattr(readers, "_hash64", lambda v: real("doc-a") if v == "impostor" else real(v))
    assert corpus.lookup(["impostor", "doc-a", "MED-10", "nope"]).tolist() == [-1, 1, 2, -1]
    assert "impostor" not in corpus


def test_a_beir_folder_is_keyed_by_its_corpus_file_alone(tmp_path):
    """Editing a BEIR folder's qrels or queries (or a note beside them) must not re-key what reads only the corpus
    (retrieve, score, mine, train): they are keyed by their own files."""
    from pipeline.readers import corpus_source_fingerprint

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write(folder / "corpus.jsonl", json.dumps({"_id": "d1", "title": "", "text": "one"}) + "\n")
    write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    before = corpus_source_fingerprint(str(folder))
    write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td1\t1\n")
    write(folder / "SOURCE.txt", "copied from elsewhere")
    assert corpus_source_fingerprint(str(folder)) == before
    write(folder / "corpus.jsonl", json.dumps({"_id": "d1", "title": "", "text": "changed"}) + "\n")
    assert corpus_source_fingerprint(str(folder)) != before


def test_a_dataset_saved_on_disk_is_keyed_by_its_content(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    from pipeline.readers import corpus_source_fingerprint

    datasets.Dataset.from_dict({"_id": ["d1"], "text": ["one"]}).save_to_disk(tmp_path / "corpus")
    before = corpus_source_fingerprint(f"hf:{tmp_path / 'corpus'}")
    assert before == corpus_source_fingerprint(f"hf:{tmp_path / 'corpus'}")
    assert before != corpus_source_fingerprint(f"hf:{tmp_path / 'corpus'}@test")  # another split
    datasets.Dataset.from_dict({"_id": ["d1"], "text": ["rebuilt in place"]}).save_to_disk(tmp_path / "corpus2")
    import shutil

    shutil.rmtree(tmp_path / "corpus")
    (tmp_path / "corpus2").rename(tmp_path / "corpus")
    assert corpus_source_fingerprint(f"hf:{tmp_path / 'corpus'}") != before
    # a Hub id is keyed by the commit loaded (the hub_datasets_cache tests); offline with nothing cached, one line
    with pytest.raises(DataError, match=r"hf:BeIR/no-such-dataset@corpus: cannot be loaded: .*BeIR/no-such-dataset"):
        corpus_source_fingerprint("hf:BeIR/no-such-dataset@corpus")


def test_a_saved_folder_whose_name_holds_an_at_is_keyed_by_the_folder_read(tmp_path, monkeypatch):
    """hf:<dir>@v2 reads the folder named `<dir>@v2` when it exists; its key was that of `<dir>` beside it (an older
    copy) or, alone, its name (a rebuilt folder then reused the old results), never the content read."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    from pipeline.artifacts import file_fingerprint
    from pipeline.readers import corpus_source_fingerprint

    datasets.Dataset.from_dict({"_id": ["q1"], "text": ["old"]}).save_to_disk(tmp_path / "queries")
    datasets.Dataset.from_dict({"_id": ["q1"], "text": ["new"]}).save_to_disk(tmp_path / "queries@v2")
    source = f"hf:{tmp_path / 'queries@v2'}"
    assert read_queries(source) == {"q1": "new"}
    assert corpus_source_fingerprint(source) == {"source": "hf:", "content": file_fingerprint(tmp_path / "queries@v2")}
    assert corpus_source_fingerprint(f"{source}@train") == {"source": "hf:@train",
                                                            "content": file_fingerprint(tmp_path / "queries@v2")}
    import shutil

    shutil.rmtree(tmp_path / "queries")  # alone: still its content, not its name
    assert corpus_source_fingerprint(source) == {"source": "hf:", "content": file_fingerprint(tmp_path / "queries@v2")}


def test_saved_folders_whose_names_hold_an_at_or_a_hash_are_read_as_folders(tmp_path, monkeypatch):
    """A relative folder spelled like owner/name with an @ in its name was taken for a Hub id with a revision, and a
    folder with a # in its name for a folder and a config: neither was read (offline, "cannot be loaded")."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    from pipeline.readers import split_hf_spec

    splits = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"_id": ["q1"], "text": ["one"]})})
    splits.save_to_disk("runs/saved@v2")
    assert split_hf_spec("runs/saved@v2@test") == ("runs/saved@v2", None, "test", None)
    assert read_queries("hf:runs/saved@v2@test") == {"q1": "one"}
    splits.save_to_disk(tmp_path / "run#2")
    assert split_hf_spec(f"{tmp_path}/run#2@test") == (f"{tmp_path}/run#2", None, "test", None)
    assert read_queries(f"hf:{tmp_path}/run#2@test") == {"q1": "one"}
    assert split_hf_spec("BeIR/scifact@corpus#corpus") == ("BeIR/scifact", None, "corpus", "corpus")  # no folder


def test_a_beir_folder_with_both_corpus_files_says_which_it_reads(tmp_path, caplog):
    # the two may differ (a stale unpacked copy): the user must be able to see which one was indexed
    folder = tmp_path / "beir"
    folder.mkdir()
    write(folder / "corpus.jsonl", json.dumps({"_id": "d1", "text": "plain"}) + "\n")
    write(folder / "corpus.jsonl.gz", gzip.compress((json.dumps({"_id": "d1", "text": "gzipped"}) + "\n").encode()))
    with caplog.at_level("INFO"):
        corpus = Corpus.open(folder, tmp_path / "cache")
    assert corpus.texts(["d1"]) == ["plain"]
    assert f"reading {folder / 'corpus.jsonl'}, ignoring corpus.jsonl.gz" in caplog.text
    assert f"converting corpus {folder / 'corpus.jsonl'} into" in caplog.text


def test_a_damaged_corpus_cache_says_to_delete_its_folder(tmp_path):
    # a raw ArrowInvalid traceback says neither which cache is broken nor that deleting it is the fix
    corpus = _corpus(tmp_path, "1\tone\n2\ttwo\n")
    folder, arrow = corpus.folder, corpus.folder / "corpus.arrow"
    del corpus
    data = arrow.read_bytes()
    expected = _escape(f"{folder}: corpus cache is damaged (") + ".*" + _escape("); delete the folder to rebuild it")
    for damaged in (data[: len(data) // 2], data + b"\0" * 64):  # truncated; rewritten at another size
        arrow.unlink()  # not in place: the old bytes may still be mapped
        write(arrow, damaged)
        with pytest.raises(DataError, match=expected):
            Corpus.open(tmp_path / "collection.tsv", tmp_path / "cache")
    meta = json.loads((folder / "meta.json").read_text())
    del meta["arrow_bytes"]  # a cache written before the size was recorded: the Arrow reader's own check
    write(folder / "meta.json", json.dumps(meta))
    arrow.unlink()
    write(arrow, data[: len(data) // 2])
    with pytest.raises(DataError, match=expected):
        Corpus.open(tmp_path / "collection.tsv", tmp_path / "cache")


def test_corpus_hash_lookup_and_beir_titles(tmp_path):
    lines = [{"_id": "doc-b", "title": "Title", "text": "body"}, {"_id": "doc-a", "title": "", "text": "only body"},
             {"_id": "MED-10", "title": "T2", "text": ""}]
    folder = tmp_path / "beir"
    folder.mkdir()
    write(folder / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    corpus = Corpus.open(folder, tmp_path / "cache")
    assert corpus._dense is None
    assert corpus.lookup(["doc-a", "MED-10", "nope"]).tolist() == [1, 2, -1]
    assert corpus.texts(["doc-b", "doc-a", "MED-10"]) == ["Title body", "only body", "T2"]


def test_corpus_errors(tmp_path):
    with pytest.raises(DataError, match=r"collection\.tsv:3: duplicate document id '1' \(first seen at line 1\)"):
        _corpus(tmp_path, "1\tone\n2\ttwo\n1\tagain\n")
    with pytest.raises(DataError, match=r"c2\.tsv:2: document '2' has empty text"):
        Corpus.open(write(tmp_path / "c2.tsv", "1\tone\n2\t\n"), tmp_path / "cache", empty_text="error")
    kept = Corpus.open(tmp_path / "c2.tsv", tmp_path / "cache2")
    assert kept.meta["empty_text_documents"] == 1


def test_hugging_face_sources_for_corpus_queries_and_qrels(tmp_path):
    """`hf:<dir or hub id>[@split]` wherever a file is expected (here datasets saved to disk, as a hub download
    would give them): BEIR's column names, ids as strings, the qrels checks of the file readers."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"_id": ["d1", "d2"], "title": ["T", ""], "text": ["one", "two"]}).save_to_disk(
        tmp_path / "corpus")
    datasets.Dataset.from_dict({"_id": ["007", "8"], "text": ["q seven", "q eight"]}).save_to_disk(tmp_path / "queries")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"query-id": ["007", "007", "8"], "corpus-id": ["d1", "d2", "d2"], "score": [1, 0, 2]})}).save_to_disk(
        tmp_path / "qrels")
    corpus = Corpus.open(f"hf:{tmp_path / 'corpus'}", tmp_path / "cache")
    assert len(corpus) == 2
    assert read_queries(f"hf:{tmp_path / 'queries'}") == {"007": "q seven", "8": "q eight"}
    with pytest.raises(DataError, match=r"a dataset without splits: no split 'tset' in it \(drop @tset\)"):
        read_queries(f"hf:{tmp_path / 'queries'}@tset")  # was read whole, the split ignored
    assert read_qrels(f"hf:{tmp_path / 'qrels'}@test") == {"007": {"d1": 1, "d2": 0}, "8": {"d2": 2}}
    datasets.Dataset.from_dict({"query-id": ["1", "1"], "corpus-id": ["d1", "d1"], "score": [1, 2]}).save_to_disk(
        tmp_path / "bad")
    with pytest.raises(DataError, match=r"conflicting grades for \(1, d1\)"):
        read_qrels(f"hf:{tmp_path / 'bad'}")
    # queries from a dataset get the file readers' checks: a duplicate id, an empty text
    datasets.Dataset.from_dict({"_id": ["1", "1"], "text": ["a", "b"]}).save_to_disk(tmp_path / "dup")
    with pytest.raises(DataError, match=r"dup:2: duplicate query id '1'"):
        read_queries(f"hf:{tmp_path / 'dup'}")
    datasets.Dataset.from_dict({"_id": ["1", "2"], "text": ["a", " "]}).save_to_disk(tmp_path / "empty")
    with pytest.raises(DataError, match=r"query '2' has empty text"):
        read_queries(f"hf:{tmp_path / 'empty'}")


# --------------------------------------------------------------------------- Hub datasets


@pytest.mark.parametrize("spec, parts", [
    ("BeIR/scifact-qrels@test", ("BeIR/scifact-qrels", None, "test", None)),  # one part: the split, as before
    ("BeIR/scifact@" + "a" * 40, ("BeIR/scifact", "a" * 40, None, None)),  # ... unless it is a full commit
    ("BeIR/scifact@v1.0@corpus#corpus", ("BeIR/scifact", "v1.0", "corpus", "corpus")),
    ("BeIR/scifact#queries", ("BeIR/scifact", None, None, "queries")),
    ("/data/saved@v2@test", ("/data/saved@v2", None, "test", None)),  # a folder: only the last part is a split
])
def test_hf_specs_name_a_revision_a_split_and_a_config(spec, parts):
    from pipeline.readers import split_hf_spec

    assert split_hf_spec(spec) == parts


def test_an_hf_spec_with_more_parts_than_it_can_hold_is_refused():
    from pipeline.readers import split_hf_spec

    for spec in ("BeIR/scifact@main@test@x", "BeIR/scifact@@test"):
        with pytest.raises(DataError, match=r"expected hf:<hub id>\[@revision\]\[@split\]\[#config\]"):
            split_hf_spec(spec)


@pytest.fixture
def hub_datasets_cache(tmp_path, monkeypatch):
    """An offline datasets cache laid out as `datasets.load_dataset` leaves a Hub dataset
    (<owner>___<name>/<config>/<version>/<commit>/, the newest commit the one it reads offline).
    ``add(commit, rows)`` caches one more commit of BeIR/scifact's corpus config (its ``splits``, each of ``rows``)."""
    datasets = pytest.importorskip("datasets")
    import os
    import shutil
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    from pipeline import readers

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    readers._hub_dataset.cache_clear()  # a process that starts now
    stamp = [time.time() - 100]

    def add(commit: str, rows: dict[str, list[str]], splits: tuple[str, ...] = ("corpus",)) -> None:
        pq.write_table(pa.table(rows), tmp_path / f"{commit}.parquet")
        builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="scifact", hash=commit,
                          data_files={split: str(tmp_path / f"{commit}.parquet") for split in splits},
                          config_name="corpus")
        builder.download_and_prepare()
        cached = tmp_path / "datasets-cache" / "BeIR___scifact" / "corpus" / "0.0.0" / commit
        shutil.copytree(builder.cache_dir, cached)
        stamp[0] += 10  # each commit newer than the last, whatever the file system's clock resolution
        os.utime(cached, (stamp[0], stamp[0]))

    yield add
    readers._hub_dataset.cache_clear()


def test_a_hub_dataset_is_keyed_by_the_commit_read_and_read_at_that_commit(hub_datasets_cache, tmp_path):
    """The key names the commit loaded, so results made from the data before the Hub's main moved are not reused
    for the new data; and a process reads what its key names, even if the cache gains a commit in between."""
    from pipeline import readers
    from pipeline.readers import corpus_source_fingerprint

    first, second = "1" * 40, "2" * 40
    hub_datasets_cache(first, {"_id": ["d1", "d2"], "title": ["", ""], "text": ["one", "two"]})
    source = "hf:BeIR/scifact@corpus#corpus"
    key = corpus_source_fingerprint(source)
    assert key == {"source": source, "commit": first}
    hub_datasets_cache(second, {"_id": ["d1", "d2"], "title": ["", ""], "text": ["one", "two, revised"]})
    assert Corpus.open(source, tmp_path / "cache").texts(["d2"]) == ["two"]  # the commit the key named
    readers._hub_dataset.cache_clear()  # the next run
    assert corpus_source_fingerprint(source) == {"source": source, "commit": second}
    assert Corpus.open(source, tmp_path / "cache").texts(["d2"]) == ["two, revised"]  # a new cache, not the first


def test_a_pinned_commit_is_read_or_refused(hub_datasets_cache):
    """Offline, the datasets library reads its newest cached commit whatever revision it is asked for: a pin to
    another commit is an error naming both, never the other commit's data under the pin's name."""
    first, second = "1" * 40, "2" * 40
    hub_datasets_cache(first, {"_id": ["d1"], "title": [""], "text": ["one"]})
    hub_datasets_cache(second, {"_id": ["d1"], "title": [""], "text": ["one, revised"]})
    from pipeline.readers import corpus_source_fingerprint

    pinned = f"hf:BeIR/scifact@{second}@corpus#corpus"
    assert corpus_source_fingerprint(pinned) == {"source": pinned, "commit": second}
    with pytest.raises(DataError, match=f"pinned to commit {first}, but the datasets cache gave commit {second}"):
        corpus_source_fingerprint(f"hf:BeIR/scifact@{first}@corpus#corpus")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: corpus\)"):
        read_queries("hf:BeIR/scifact@test#corpus")


def test_hub_dataset_errors_are_one_line_and_say_what_to_write(hub_datasets_cache):
    """A config the offline cache lacks (or a mistyped one) was a ValueError traceback from the datasets library; the
    several-splits error told a spec with a config to write hf:<id>@<split>, which dropped the config."""
    hub_datasets_cache("1" * 40, {"_id": ["q1"], "text": ["one"]}, splits=("train", "test"))
    with pytest.raises(DataError, match=r"^hf:BeIR/scifact@test#corpuss: cannot be loaded: .*'corpuss'"):
        read_queries("hf:BeIR/scifact@test#corpuss")
    with pytest.raises(DataError, match=r"several splits \(train, test\); name one as hf:BeIR/scifact@<split>#corpus$"):
        read_queries("hf:BeIR/scifact#corpus")
    assert read_queries("hf:BeIR/scifact@test#corpus") == {"q1": "one"}  # what it says to write


# --------------------------------------------------------------------------- ir_datasets


@pytest.fixture
def irds_dataset(tmp_path, monkeypatch):
    """``register(docs, queries, qrels)`` -> an `irds:` source naming an ir_datasets dataset registered over local
    files (TSV documents and queries, TREC qrels), read by the installed package as it reads its own."""
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "ir_datasets"))
    ir_datasets = pytest.importorskip("ir_datasets")
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels, TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    def register(docs: str, queries: str, qrels: str) -> str:
        name = f"pipeline-test/{tmp_path.name}-{len(list(tmp_path.glob('*.tsv')))}"
        files = [write(tmp_path / f"{name.rsplit('/')[1]}-{kind}.tsv", text)
                 for kind, text in (("docs", docs), ("queries", queries), ("qrels", qrels))]
        docs, queries, qrels = (LocalDownload(f) for f in files)
        grades = {0: "not relevant", 1: "relevant", 2: "highly relevant"}
        ir_datasets.registry.register(name, Dataset(TsvDocs(docs), TsvQueries(queries), TrecQrels(qrels, grades)))
        return f"irds:{name}"

    return register


def test_ir_datasets_sources_get_the_file_readers_checks(irds_dataset, tmp_path):
    """`irds:<id>` wherever a file is expected: a duplicate query id was silently the later one, a conflicting grade
    silently the later grade, an unknown id a KeyError traceback from ir_datasets' registry."""
    source = irds_dataset("d1\tfirst doc\nd2\tsecond doc\n", "q1\tquery one\nq2\tquery two\n",
                          "q1 0 d1 1\nq1 0 d2 0\nq2 0 d2 2\n")
    assert len(Corpus.open(source, tmp_path / "cache")) == 2
    assert Corpus.open(source, tmp_path / "cache").texts(["d2"]) == ["second doc"]
    assert read_queries(source) == {"q1": "query one", "q2": "query two"}
    assert read_qrels(source) == {"q1": {"d1": 1, "d2": 0}, "q2": {"d2": 2}}
    broken = irds_dataset("d1\tdoc\n", "q1\tone\nq1\tagain\n", "q1 0 d1 1\nq1 0 d1 2\n")
    with pytest.raises(DataError, match=_escape(f"{broken}:2: duplicate query id 'q1'")):
        read_queries(broken)
    with pytest.raises(DataError, match=_escape(f"{broken}:2: conflicting grades for (q1, d1): 1 and 2")):
        read_qrels(broken)
    with pytest.raises(DataError, match=r"irds:msmarco-pasage/dev: no such ir_datasets id; did you mean "
                                        r"msmarco-passage/dev"):
        read_queries("irds:msmarco-pasage/dev")


def test_ir_datasets_source_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch):
    # offline (a cluster node), ir_datasets' download raised a requests ConnectionError: a traceback where an hf:
    # source that cannot be loaded says so in one line
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "ir_datasets"))
    ir_datasets = pytest.importorskip("ir_datasets")
    import requests
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels, TsvDocs, TsvQueries

    class Unreachable:  # what an ir_datasets download does without a network
        def path(self, force=True):
            raise requests.exceptions.ConnectionError("Failed to resolve 'example.org'")

        def stream(self):
            raise requests.exceptions.ConnectionError("Failed to resolve 'example.org'")

    name = f"pipeline-test/{tmp_path.name}-offline"
    ir_datasets.registry.register(name, Dataset(TsvDocs(Unreachable()), TsvQueries(Unreachable()),
                                                TrecQrels(Unreachable(), {1: "relevant"})))
    for read in (read_queries, read_qrels, lambda s: Corpus.open(s, tmp_path / "cache")):
        with pytest.raises(DataError, match=_escape(f"irds:{name}: cannot be loaded") + ".*Failed to resolve"):
            read(f"irds:{name}")
