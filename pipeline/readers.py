"""Every on-disk format the pipeline reads, one function per format, ids kept as strings end to end.

Sources are paths (format from the name and the first line) or prefixed ids:
  ``hf:<hub id>[@revision][@split][#config]`` or ``hf:<local dir>[@split]``  Hugging Face datasets
  ``irds:<ir_datasets id>``             ir_datasets (optional extra ``irds``)

Bad input raises :class:`DataError`, whose message starts with ``file:line:`` and says what is wrong.
The corpus is converted once into a memory-mapped Arrow file (cached by the source's fingerprint) so that
8.8M passages never become 8.8M Python objects; lookups by id go through a numpy index.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .models import COMMIT, HUB_ID

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

BEIR_QRELS_HEADER = ("query-id", "corpus-id", "score")


class DataError(ValueError):
    """Malformed input. ``str(err)`` is ``<file>:<line>: <what is wrong>``."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line, self.reason = str(path), line, message
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------- line iteration


def _open_binary(path: Path):
    if not path.exists():
        # every reader takes a gzipped file as is, but a setting names one file: a user who gzipped the data (the
        # layout's collection.tsv[.gz]) was told only that the file the config names is not there
        gz = path.with_name(path.name + ".gz")
        raise DataError(path, None, "file not found" + (f" ({gz.name} is there: point the setting at it)"
                                                        if gz.is_file() else ""))
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a file")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text without line ending) for every line; BOM, CRLF and gzip handled; bad bytes,
    truncated archives and empty files are DataErrors naming the line."""
    path = Path(path)
    lineno = 0
    with _open_binary(path) as fh:
        try:
            for lineno, raw in enumerate(fh, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(path, lineno, f"invalid UTF-8 at byte {exc.start} of the line "
                                                  f"({raw[max(0, exc.start - 10):exc.start + 10]!r})") from None
                yield lineno, text.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, gzip.BadGzipFile) and exc.errno is not None:
                raise
            raise DataError(path, lineno + 1, f"corrupt or truncated gzip data ({exc})") from None
    if lineno == 0:
        raise DataError(path, None, "file is empty")


def _content_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`iter_lines` without blank lines at the end of the file (editors and `echo >>` leave them); a blank line
    with content after it is still an error, at the blank line."""
    blank = None
    content = False
    for lineno, line in iter_lines(path):
        if not line.strip():
            blank = blank or lineno
            continue
        if blank:
            raise DataError(path, blank, "blank line")
        content = True
        yield lineno, line
    if not content:
        raise DataError(path, None, "file is empty (blank lines only)")


def _check_id(path: Path, lineno: int, value: str, what: str) -> str:
    if not value:
        raise DataError(path, lineno, f"empty {what}")
    if value != value.strip():
        raise DataError(path, lineno, f"{what} {value!r} has leading or trailing whitespace")
    return value


def _split(path: Path, lineno: int, line: str, columns: int, layout: str) -> list[str]:
    """Split into exactly `columns` tab-separated fields. MS MARCO texts hold no tab, so an extra field is a
    shifted or foreign column: joined into the text it would be indexed (and mined) silently."""
    parts = line.split("\t")
    if len(parts) != columns:
        raise DataError(path, lineno, f"expected {columns} columns ({layout}), found {len(parts)}: {line[:80]!r}")
    return parts


# A first line `id \t text` (pandas' to_csv, BEIR-style exports) is a header, not a passage that retrieval and
# mining would then return; words only, so a decimal id is never taken for one.
_HEADER_IDS = frozenset({"id", "_id", "pid", "qid", "docid", "doc_id", "doc-id", "docno", "did", "passage_id",
                         "passageid", "query_id", "queryid", "query-id", "corpus-id", "corpus_id"})
_HEADER_TEXTS = frozenset({"text", "passage", "passage_text", "body", "contents", "content", "doc", "document",
                           "query", "query_text", "question", "title"})


def _is_header(fields: Sequence[str]) -> bool:
    return (len(fields) == 2 and not _decimal_id(fields[0]) and fields[0].strip().lower() in _HEADER_IDS
            and fields[1].strip().lower() in _HEADER_TEXTS)


# --------------------------------------------------------------------------- queries


def read_queries(source: str | os.PathLike, *, empty_text: str = "error") -> dict[str, str]:
    """Queries as {qid: text}: MS MARCO TSV (`qid \\t text`), BEIR queries.jsonl, `hf:` or `irds:`."""
    source = str(source)
    path: Any = source
    records: Iterable[tuple[int, str, str, Any]]
    # hf: and irds: get the same checks as the files (row numbers for line numbers)
    if source.startswith("irds:"):
        records = ((i, qid, text, None) for i, (qid, text) in enumerate(_irds_queries(source[5:]), 1))
    elif source.startswith("hf:"):
        rows = _hf_records(source[3:], ("_id", "id", "query_id", "qid"), ("text", "query"), ())
        records = ((i, r["id"], r["text"], None) for i, r in enumerate(rows, 1))
    else:
        path = Path(source)
        records = _jsonl_records(path, ("_id",), ("text",), ()) if _is_jsonl(path) else _tsv_records(path)
    queries: dict[str, str] = {}
    empties = 0
    for lineno, qid, text, _ in records:
        if qid in queries:
            raise DataError(path, lineno, f"duplicate query id {qid!r}")
        if not text.strip():
            if empty_text == "error":
                raise DataError(path, lineno, f"query {qid!r} has empty text")
            empties += 1
            continue
        queries[qid] = text
    if empties:
        log.warning("%s: skipped %d queries with empty text", path, empties)
    return queries


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz") or name.endswith(".json")


def _tsv_records(path: Path) -> Iterator[tuple[int, str, str, str]]:
    for lineno, line in _content_lines(path):
        if lineno == 1 and _is_header(line.split("\t")):
            log.warning("%s: line 1 %r is a header, skipped", path, line[:80])
            continue
        qid, text = _split(path, lineno, line, 2, "id \\t text")
        yield lineno, _check_id(path, lineno, qid, "id"), text, ""


def _jsonl_records(path: Path, id_keys: Sequence[str], text_keys: Sequence[str],
                   title_keys: Sequence[str]) -> Iterator[tuple[int, str, str, str]]:
    for lineno, line in _content_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, lineno, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, lineno, f"expected a JSON object, found {type(obj).__name__}")
        rid = next((obj[k] for k in id_keys if k in obj), None)
        if rid is None:
            raise DataError(path, lineno, f"missing id field (one of {', '.join(id_keys)})")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DataError(path, lineno, f"id must be a string or integer, found {type(rid).__name__}")
        text = next((obj[k] for k in text_keys if k in obj), None)
        if text is None:
            raise DataError(path, lineno, f"missing text field (one of {', '.join(text_keys)})")
        title = next((obj[k] for k in title_keys if k in obj), "") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            raise DataError(path, lineno, "text and title must be strings")
        yield lineno, _check_id(path, lineno, str(rid), "id"), text, title


# --------------------------------------------------------------------------- qrels


def read_qrels(source: str | os.PathLike) -> Qrels:
    """Relevance judgements {qid: {pid: grade}} from TREC 4-column whitespace (`qid Q0 pid grade`),
    MS MARCO tab (`qid \\t 0 \\t pid \\t 1`), BEIR `qrels/<split>.tsv` (with header), `hf:` or `irds:`."""
    source = str(source)
    if source.startswith("irds:"):
        return _irds_qrels(source[5:])
    if source.startswith("hf:"):
        return _hf_qrels(source[3:])
    path = Path(source)
    qrels: Qrels = {}
    beir = False
    for lineno, line in _content_lines(path):
        fields = line.split()
        if lineno == 1 and tuple(f.lower() for f in fields) == BEIR_QRELS_HEADER:
            beir = True
            continue
        if beir:
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(path, lineno, f"expected 3 tab-separated columns (query-id, corpus-id, score), "
                                              f"found {len(parts)}")
            qid, pid, grade_text = parts
        else:
            if len(fields) != 4:
                # three tab-separated columns: a BEIR qrels file whose header line was lost (it says which format)
                beir_hint = (f" (a BEIR qrels file starts with its tab-separated header line: "
                             f"{', '.join(BEIR_QRELS_HEADER)})" if len(line.split("\t")) == 3 else "")
                raise DataError(path, lineno, f"expected 4 columns (qid Q0 pid grade), found {len(fields)}: "
                                              f"{line[:80]!r}{beir_hint}")
            qid, _, pid, grade_text = fields
        qid = _check_id(path, lineno, qid, "query id")
        pid = _check_id(path, lineno, pid, "document id")
        try:
            grade = int(grade_text)
        except ValueError:
            raise DataError(path, lineno, f"relevance grade {grade_text!r} is not an integer") from None
        judged = qrels.setdefault(qid, {})
        if pid in judged and judged[pid] != grade:
            raise DataError(path, lineno, f"conflicting grades for ({qid}, {pid}): {judged[pid]} and {grade}")
        judged[pid] = grade
    if not qrels:
        raise DataError(path, None, "no judgements (only a header?)")
    return qrels


def write_qrels(path: str | os.PathLike, qrels: Qrels) -> None:
    from .artifacts import atomic_write_text

    lines = [f"{q} 0 {p} {g}" for q in qrels for p, g in qrels[q].items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def positives(qrels: Qrels, min_grade: int = 1) -> dict[str, list[str]]:
    """Relevant passage ids per query (grade >= min_grade), queries without any left out."""
    out = {q: [p for p, g in judged.items() if g >= min_grade] for q, judged in qrels.items()}
    return {q: ps for q, ps in out.items() if ps}


# --------------------------------------------------------------------------- runs


def read_run(source: str | os.PathLike) -> Run:
    """A TREC run (`qid Q0 pid rank score tag`) as {qid: {pid: score}}."""
    path = Path(source)
    run: Run = {}
    for lineno, line in _content_lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise DataError(path, lineno, f"expected 6 columns (qid Q0 pid rank score tag), found {len(fields)}")
        qid, _, pid, rank, score, _ = fields
        try:
            int(rank)
            value = float(score)
        except ValueError:
            raise DataError(path, lineno, f"rank {rank!r} must be an integer and score {score!r} a number") from None
        if not math.isfinite(value):
            raise DataError(path, lineno, f"score {score!r} is not finite")
        ranked = run.setdefault(_check_id(path, lineno, qid, "query id"), {})
        pid = _check_id(path, lineno, pid, "document id")
        if pid in ranked:
            raise DataError(path, lineno, f"document {pid!r} appears twice for query {qid!r}")
        ranked[pid] = value
    return run


def _trec_key(item: tuple[str, float]) -> tuple[float, str]:
    """Sort key (with reverse=True) of trec_eval's ranking: score descending, then doc id descending."""
    return item[1], item[0]


def write_run(path: str | os.PathLike, run: Run, tag: str = "pipeline", depth: int | None = None) -> None:
    """Write a TREC run in the order trec_eval ranks it (score descending, ties by id descending), so the rank
    column agrees with what trec_eval and the MS MARCO scripts compute from it; atomically."""
    from .artifacts import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for qid in sorted(run):
            ranked = sorted(run[qid].items(), key=_trec_key, reverse=True)[:depth]
            # 9 significant digits round-trip float32 exactly: rounding must not create ties trec_eval would
            # then break differently from the rank column.
            fh.writelines(f"{qid} Q0 {pid} {rank} {score:.9g} {tag}\n" for rank, (pid, score) in enumerate(ranked, 1))


@dataclass
class Candidates:
    """A rerank set: TREC-DL top-1000 file or a run plus texts."""

    ranked: dict[str, list[str]]  # qid -> pids in file order
    queries: dict[str, str]       # qid -> text (from the file itself for top-1000 files)
    passages: dict[str, str]      # pid -> text (empty when the file carries none)


def read_candidates(source: str | os.PathLike) -> Candidates:
    """TREC-DL top-1000 (`qid \\t pid \\t query \\t passage`) or a TREC run file (texts then come from the corpus)."""
    path = Path(source)
    first = next(iter_lines(path))[1]
    if len(first.split("\t")) != 4:
        run = read_run(path)
        ranked = {q: [p for p, _ in sorted(d.items(), key=_trec_key, reverse=True)] for q, d in run.items()}
        return Candidates(ranked, {}, {})
    ranked: dict[str, list[str]] = {}
    queries: dict[str, str] = {}
    passages: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for lineno, line in _content_lines(path):
        qid, pid, query, passage = _split(path, lineno, line, 4, "qid \\t pid \\t query \\t passage")
        qid, pid = _check_id(path, lineno, qid, "query id"), _check_id(path, lineno, pid, "passage id")
        if (qid, pid) in seen:
            raise DataError(path, lineno, f"passage {pid!r} listed twice for query {qid!r}")
        seen.add((qid, pid))
        if queries.setdefault(qid, query) != query:
            raise DataError(path, lineno, f"query {qid!r} has two different texts")
        if not passage.strip():
            raise DataError(path, lineno, f"passage {pid!r} has empty text")
        passages.setdefault(pid, passage)
        ranked.setdefault(qid, []).append(pid)
    return Candidates(ranked, queries, passages)


# --------------------------------------------------------------------------- corpus


def repair_mojibake(text: str) -> str:
    """Undo the latin-1/utf-8 double encoding of the MS MARCO collection where it round-trips exactly."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _corpus_records(source: str) -> Iterator[tuple[Any, int, str, str, str]]:
    """(path, line, id, title, text) from any corpus source."""
    if source.startswith("irds:"):
        for i, (pid, title, text) in enumerate(_irds_docs(source[5:]), 1):
            yield source, i, pid, title, text
        return
    if source.startswith("hf:"):
        for i, r in enumerate(_hf_records(source[3:], ("_id", "id", "docid", "pid", "corpus_id"),
                                          ("text", "passage", "contents"), ("title",)), 1):
            yield source, i, r["id"], r["title"], r["text"]
        return
    path = _beir_corpus_file(Path(source))
    if _is_jsonl(path):
        for lineno, pid, text, title in _jsonl_records(path, ("_id", "id", "docid"), ("text", "contents"), ("title",)):
            yield path, lineno, pid, title, text
    else:
        for lineno, pid, text, _ in _tsv_records(path):
            yield path, lineno, pid, "", text


_warned_both: set[Path] = set()  # once per process: every stage start fingerprints the corpus several times


def _beir_corpus_file(path: Path) -> Path:
    """A BEIR folder's corpus file (corpus.jsonl or .gz); any other path as it is."""
    if not path.is_dir():
        return path
    present = [path / n for n in ("corpus.jsonl", "corpus.jsonl.gz") if (path / n).exists()]
    if len(present) > 1 and path not in _warned_both:
        # two versions of the corpus (a download beside its unpacked copy, or a stale one): say which one counts
        _warned_both.add(path)
        log.warning("%s holds both %s and %s: reading %s, ignoring %s", path, present[0].name, present[1].name,
                    present[0], present[1].name)
    return present[0] if present else path / "corpus.jsonl"


def _decimal_id(pid: str) -> bool:
    """Whether ``pid`` is a decimal integer as int() writes it back (ASCII digits, no sign, no leading zero): the ids
    an MS MARCO corpus is indexed by row (mine._decimal_ids is the same rule over an Arrow column)."""
    return pid.isascii() and pid.isdigit() and (pid == "0" or pid[0] != "0")


def corpus_source_fingerprint(source: str) -> dict[str, Any]:
    """What a data source's artifacts are keyed by: a file's content fingerprint (a BEIR folder's: its corpus file
    alone, so editing its qrels or queries re-keys only what reads them); a dataset saved on disk and named
    ``hf:<dir>[@split][#config]``: the folder's content and the split and config; a Hub dataset: its id and the
    commit loaded (the dataset is loaded here, once a process, so that what is read is what the key names: results
    made before the Hub's main moved are not reused for the new data); an ir_datasets id: the id (ir_datasets
    checks its downloads against fixed checksums)."""
    from .artifacts import file_fingerprint

    if source.startswith("hf:"):
        local = split_hf_spec(source[3:])[0]  # the folder the readers read (its name may hold an @ or a #)
        if Path(local).is_dir():
            return {"source": "hf:" + source[3 + len(local):], "content": file_fingerprint(Path(local))}
        commit = _loaded_commit(_hf_dataset(source[3:])[0])
        if commit is None:
            log.warning("%s: the commit loaded is unknown (no cache files), so its results are keyed by its name "
                        "alone; pin a commit (hf:<id>@<commit>@<split>) to make them exact", source)
            return {"source": source}
        return {"source": source, "commit": commit}
    if source.startswith("irds:"):
        return {"source": source}
    return file_fingerprint(_beir_corpus_file(Path(source)))


def sources_by_content(section: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``section`` (a data config section) for an artifact key: the files its ``keys`` name replaced by their
    content fingerprints, so that where the data lies is in no key."""
    out = dict(section)
    for key in keys:
        if out.get(key):
            out[key] = corpus_source_fingerprint(str(out[key]))
    return out


class Corpus:
    """A read-only, memory-mapped corpus: Arrow columns ``id``, ``title``, ``text`` plus a numpy id index.

    ``text`` is what encoders see: BEIR title and body joined with a space (the BEIR/MTEB convention).
    Lookups: ids that are all small non-negative integers (MS MARCO) use a dense array (O(1)); any other
    ids use sorted 64-bit hashes with a collision check (O(log n), 16 bytes per passage).
    """

    def __init__(self, folder: Path):
        import pyarrow as pa

        self.folder = folder
        arrow = folder / "corpus.arrow"
        try:
            self.meta = json.loads((folder / "meta.json").read_text())
            recorded = self.meta.get("arrow_bytes")  # absent in caches written before it was recorded
            if recorded is not None and arrow.stat().st_size != recorded:
                raise ValueError(f"{arrow.name} has {arrow.stat().st_size} bytes, {recorded} when it was written")
            self._source = pa.memory_map(str(arrow), "r")
            self.table = pa.ipc.open_file(self._source).read_all()
            self._ids = self.table.column("id")
            self._text = self.table.column("text")
            if (folder / "dense_index.npy").exists():
                self._dense = np.load(folder / "dense_index.npy", mmap_mode="r")
                self._hashes = self._order = None
            else:
                self._dense = None
                self._hashes = np.load(folder / "hash_sorted.npy", mmap_mode="r")
                self._order = np.load(folder / "hash_order.npy", mmap_mode="r")
        except PermissionError:
            raise
        except (OSError, ValueError, KeyError) as exc:  # ArrowInvalid is a ValueError: say what to do, not a traceback
            raise DataError(folder, None, f"corpus cache is damaged ({exc}); delete the folder to rebuild it") from None

    # -- building

    @classmethod
    def open(cls, source: str | os.PathLike, cache_dir: str | os.PathLike, *, repair_encoding: bool = False,
             empty_text: str = "warn") -> Corpus:
        """Convert `source` once into `<cache_dir>/corpus/<fingerprint>/`; later calls only memory-map it.

        Empty documents are real (Cranfield has two, several BEIR corpora have some): by default they are
        kept, counted in meta.json and warned about; ``empty_text="error"`` makes them fatal."""
        from .artifacts import atomic_path, atomic_write_json, config_key, folder_lock

        source = str(source)
        fp = {"source": corpus_source_fingerprint(source), "repair_encoding": repair_encoding,
              "empty_text": empty_text, "format": 1}
        folder = Path(cache_dir) / "corpus" / config_key(fp, 16)
        if not (folder / "meta.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            with folder_lock(folder.parent / f".{folder.name}.lockdir", wait_s=3600):
                if not (folder / "meta.json").exists():
                    with atomic_path(folder) as tmp:
                        tmp.mkdir()
                        meta = _build_corpus(source, tmp, repair_encoding, empty_text)
                        atomic_write_json(tmp / "meta.json", {**meta, "fingerprint": fp})
        return cls(folder)

    # -- access

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def fingerprint(self) -> str:
        return self.folder.name

    def id_at(self, rows: int | Sequence[int] | np.ndarray) -> str | list[str]:
        if isinstance(rows, (int, np.integer)):
            return self._ids[int(rows)].as_py()
        return self._ids.take(np.asarray(rows, dtype=np.int64)).to_pylist()

    def id_array(self, rows: np.ndarray) -> Any:
        """The ids at ``rows`` as one Arrow string array (no Python object per id)."""
        import pyarrow as pa

        ids = self._ids.take(pa.array(np.asarray(rows, dtype=np.int64)))
        return (ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids).cast(pa.string())

    def texts_at(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        return self._text.take(np.asarray(rows, dtype=np.int64)).to_pylist()

    def lookup(self, pids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where the id is not in the corpus."""
        pids = list(pids)
        if not pids:
            return np.empty(0, dtype=np.int64)
        if self._dense is not None:
            out = np.full(len(pids), -1, dtype=np.int64)
            for i, pid in enumerate(pids):
                if _decimal_id(pid):
                    n = int(pid)
                    if n < len(self._dense):
                        out[i] = self._dense[n]
            return out
        keys = np.array([_hash64(p) for p in pids], dtype=np.uint64)
        pos = np.searchsorted(self._hashes, keys)
        pos_clipped = np.minimum(pos, len(self._hashes) - 1)
        rows = np.where(self._hashes[pos_clipped] == keys, self._order[pos_clipped], -1).astype(np.int64)
        found = rows >= 0
        if found.any():  # a hash match must also be an id match
            actual = self._ids.take(rows[found]).to_pylist()
            expected = [p for p, f in zip(pids, found) if f]
            bad = [i for i, (a, e) in zip(np.flatnonzero(found), zip(actual, expected)) if a != e]
            rows[bad] = -1
        return rows

    def lookup_array(self, pids: Any) -> np.ndarray:
        """`lookup` for an Arrow string array of ids: vectorised when the corpus has the dense integer index
        (millions of ids without a Python object each), else `lookup` on the list."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(pids, pa.ChunkedArray):
            pids = pids.combine_chunks()
        pids = pids.cast(pa.string())
        if self._dense is None or pids.null_count:
            return self.lookup(pids.to_pylist())
        canonical = pc.match_substring_regex(pids, r"^(0|[1-9][0-9]{0,17})$").to_numpy(zero_copy_only=False)
        out = np.full(len(pids), -1, dtype=np.int64)
        if canonical.any():
            at = np.flatnonzero(canonical)
            n = pc.cast(pids.filter(pa.array(canonical)), pa.int64()).to_numpy()
            inside = n < len(self._dense)
            out[at[inside]] = self._dense[n[inside]]
        return out

    def rows(self, pids: Sequence[str], what: str = "passage ids") -> np.ndarray:
        """Rows of ids that must exist; a missing id is a clear error, never a KeyError."""
        rows = self.lookup(pids)
        missing = [p for p, r in zip(pids, rows) if r < 0]
        if missing:
            raise DataError(self.meta["source"], None, f"{len(missing)} {what} not in the corpus, e.g. {missing[:5]}")
        return rows

    def __contains__(self, pid: str) -> bool:
        return bool(self.lookup([pid])[0] >= 0)

    def text(self, pid: str) -> str:
        return self.texts_at(self.rows([pid]))[0]

    def texts(self, pids: Sequence[str]) -> list[str]:
        return self.texts_at(self.rows(pids))

    def iter_batches(self, batch_size: int = 65536, start: int = 0, stop: int | None = None
                     ) -> Iterator[tuple[int, list[str], list[str]]]:
        """(first row, ids, texts) over rows [start, stop) in order."""
        stop = len(self) if stop is None else min(stop, len(self))
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield lo, self._ids.slice(lo, hi - lo).to_pylist(), self._text.slice(lo, hi - lo).to_pylist()


def _hash64(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


def _build_corpus(source: str, out: Path, repair_encoding: bool, empty_text: str) -> dict[str, Any]:
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    # Compact typed arrays, not Python lists: the index of 8.8M ids stays ~200 MB while building.
    hashes, lines, int_ids = array("Q"), array("q"), array("q")
    all_int = True
    empties = repaired = 0
    where: Any = source
    batch: dict[str, list[str]] = {"id": [], "title": [], "text": []}
    log.info("converting corpus %s into memory-mapped Arrow (one time)",
             source if source.startswith(("hf:", "irds:")) else _beir_corpus_file(Path(source)))
    from tqdm.auto import tqdm

    with pa.OSFile(str(out / "corpus.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for where, lineno, pid, title, text in tqdm(_corpus_records(source), desc="read corpus", unit=" docs",
                                                    mininterval=5):
            if repair_encoding:
                fixed_title, fixed_text = repair_mojibake(title), repair_mojibake(text)
                repaired += (fixed_title != title) or (fixed_text != text)
                title, text = fixed_title, fixed_text
            full = f"{title} {text}".strip() if title else text
            if not full.strip():
                if empty_text == "error":
                    raise DataError(where, lineno, f"document {pid!r} has empty text (set empty_text=warn to keep it)")
                empties += 1
            hashes.append(_hash64(pid))
            lines.append(lineno)
            if all_int and _decimal_id(pid) and len(pid) < 18:
                int_ids.append(int(pid))
            else:
                all_int = False
            batch["id"].append(pid)
            batch["title"].append(title)
            batch["text"].append(full)
            if len(batch["id"]) >= 100_000:
                writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
                batch = {k: [] for k in batch}
        if batch["id"]:
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    n = len(hashes)
    if n == 0:
        raise DataError(source, None, "corpus has no documents")
    keys = np.frombuffer(hashes, dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    _raise_on_duplicate_ids(out, where, sorted_keys, order, np.frombuffer(lines, dtype=np.int64))
    if all_int and max(int_ids) < 4 * n + 1024:
        dense = np.full(max(int_ids) + 1, -1, dtype=np.int64)
        dense[np.frombuffer(int_ids, dtype=np.int64)] = np.arange(n, dtype=np.int64)
        np.save(out / "dense_index.npy", dense)
    else:
        np.save(out / "hash_sorted.npy", sorted_keys)
        np.save(out / "hash_order.npy", order.astype(np.int64))
    if empties:
        log.warning("%s: %d documents with empty text kept", source, empties)
    return {"source": str(source), "documents": n, "empty_text_documents": empties, "repaired_texts": repaired,
            "arrow_bytes": (out / "corpus.arrow").stat().st_size}


def _raise_on_duplicate_ids(out: Path, where: Any, sorted_keys: np.ndarray, order: np.ndarray,
                            lines: np.ndarray) -> None:
    import pyarrow as pa

    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if not len(same):
        return
    ids = pa.ipc.open_file(pa.memory_map(str(out / "corpus.arrow"), "r")).read_all().column("id")
    for i in same:  # equal hashes: a duplicate unless a (vanishingly rare) collision of different ids
        a, b = sorted(int(r) for r in (order[i], order[i + 1]))
        if ids[a].as_py() == ids[b].as_py():
            raise DataError(where, int(lines[b]), f"duplicate document id {ids[b].as_py()!r} "
                                                  f"(first seen at line {int(lines[a])})")


def check_qrels_in_corpus(qrels: Qrels, corpus: Corpus, source: str, max_missing_fraction: float = 0.0) -> int:
    """Count judged ids absent from the corpus; warn, and raise past `max_missing_fraction`."""
    pids = [p for judged in qrels.values() for p in judged]
    if not pids:
        return 0
    rows = corpus.lookup(pids)
    missing = [p for p, r in zip(pids, rows) if r < 0]
    if missing:
        fraction = len(missing) / len(pids)
        msg = (f"{len(missing)} of {len(pids)} judged passages ({fraction:.1%}) are not in the corpus, "
               f"e.g. {missing[:5]}")
        if fraction > max_missing_fraction:
            raise DataError(source, None, msg + f" (allowed: {max_missing_fraction:.1%}, data.max_missing_qrels)")
        log.warning("%s: %s", source, msg)
    return len(missing)


# --------------------------------------------------------------------------- optional sources


def split_hf_spec(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """(hub id or folder, revision, split, config) of `<hub id>[@revision][@split][#config]` or
    `<dir>[@split][#config]`. After a Hub id, one `@` part is the split unless it is a full commit id (the
    spelling `hf:BeIR/scifact-qrels@test` kept its meaning); two are the revision (a branch, tag or commit, as a
    pinned model is spelled) and the split."""
    # a folder on disk first, as named (a name may hold an @ or a #: a relative one may look like owner/name), then
    # followed by [@split][#config]
    for end in [len(spec)] + [i for i in range(len(spec) - 1, 0, -1) if spec[i] in "@#"]:
        rest = re.fullmatch(r"(?:@([^@#]+))?(?:#(.+))?", spec[end:])
        if rest and Path(spec[:end]).exists():
            return spec[:end], None, rest[1], rest[2]
    config = None
    if "#" in spec:
        spec, config = spec.split("#", 1)
    if "@" not in spec:
        return spec, None, None, config
    name, *parts = spec.split("@")
    if Path(name).exists() or not re.fullmatch(HUB_ID, name):  # a folder: the last @ part is the split
        folder, split = spec.rsplit("@", 1)
        return folder, None, split, config
    if len(parts) > 2 or not all(parts):
        raise DataError(f"hf:{spec}", None, "expected hf:<hub id>[@revision][@split][#config]")
    if len(parts) == 1 and not COMMIT.fullmatch(parts[0]):
        return name, None, parts[0], config
    return name, parts[0], parts[1] if len(parts) == 2 else None, config


def _loaded_commit(ds: Any) -> str | None:
    """The Hub commit a loaded dataset came from: the datasets cache keeps each commit's Arrow files in a folder
    named by it (<owner>___<name>/<config>/<version>/<commit>/). None for a dataset with no cache files."""
    files = getattr(ds, "cache_files", None) or []
    folder = Path(files[0]["filename"]).parent.name if files else ""
    return folder if COMMIT.fullmatch(folder) else None


@lru_cache(maxsize=None)  # once a process: the commit a key names is the one read (the Hub's main may move between)
def _hub_dataset(hub_id: str, config: str | None, revision: str | None) -> Any:
    import datasets

    return datasets.load_dataset(hub_id, config, revision=revision)


def _hf_dataset(spec: str) -> tuple[Any, str, Callable[[Sequence[str], bool], str | None]]:
    """(dataset, its name for messages, pick(column names, required) -> the first present) of a Hugging Face
    dataset given as `<hub id>[@revision][@split][#config]` or `<dir>[@split][#config]`."""
    import datasets

    name = f"hf:{spec}"
    path, revision, split, config = split_hf_spec(spec)
    if Path(path).exists():
        ds = datasets.load_from_disk(path)
    else:
        try:
            ds = _hub_dataset(path, config, revision)
        except (ConnectionError, FileNotFoundError, ValueError) as exc:  # the library's not-found errors included
            # offline and not cached, a mistyped id, a missing revision, a config not cached or mistyped (a
            # ValueError): the library's message, where it came from, on one line
            raise DataError(name, None, f"cannot be loaded: {'; '.join(str(exc).splitlines())}") from None
        loaded = _loaded_commit(next(iter(ds.values())) if isinstance(ds, datasets.DatasetDict) else ds)
        if revision and COMMIT.fullmatch(revision) and loaded and loaded != revision:
            # offline, the datasets library reads its newest cached commit whatever revision was asked for
            raise DataError(name, None, f"pinned to commit {revision}, but the datasets cache gave commit {loaded} "
                                        "(offline, it reads its newest cached copy): fetch the pinned commit once "
                                        "online, or pin the cached one")
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            pinned = f"{path}@{revision}" if revision else path
            raise DataError(name, None, f"several splits ({', '.join(ds)}); name one as hf:{pinned}@<split>"
                                        + (f"#{config}" if config else ""))
        if split is not None and split not in ds:
            raise DataError(name, None, f"no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split or next(iter(ds))]
    elif split is not None:  # a Dataset saved on its own has no splits: a split named (or mistyped) was ignored
        raise DataError(name, None, f"a dataset without splits: no split {split!r} in it (drop @{split})")
    cols = ds.column_names

    def pick(keys: Sequence[str], required: bool) -> str | None:
        col = next((k for k in keys if k in cols), None)
        if col is None and required:
            raise DataError(name, None, f"no column among {list(keys)} (columns: {cols})")
        return col

    return ds, name, pick


def _hf_records(spec: str, id_keys: Sequence[str], text_keys: Sequence[str], title_keys: Sequence[str]
                ) -> Iterator[dict[str, str]]:
    """Rows of a Hugging Face dataset (`_hf_dataset`'s spec)."""
    ds, name, pick = _hf_dataset(spec)
    id_col, text_col, title_col = pick(id_keys, True), pick(text_keys, True), pick(title_keys, False)
    for i, row in enumerate(ds, 1):
        rid = row[id_col]
        if rid is None or str(rid) == "":
            raise DataError(name, i, "empty id")
        yield {"id": str(rid), "text": row[text_col] or "", "title": (row[title_col] or "") if title_col else ""}


def _hf_qrels(spec: str) -> Qrels:
    """Judgements from a Hugging Face dataset with a query id, a document id and a grade per row (BEIR's
    `BeIR/<name>-qrels@test`: query-id, corpus-id, score); the same checks as the file readers."""
    ds, name, pick = _hf_dataset(spec)
    q_col = pick(("query-id", "query_id", "qid"), True)
    d_col = pick(("corpus-id", "corpus_id", "doc_id", "docid", "pid"), True)
    g_col = pick(("score", "relevance", "grade", "label"), True)
    return _checked_qrels(name, ((row[q_col], row[d_col], row[g_col]) for row in ds))


def _checked_qrels(name: str, rows: Iterable[tuple[Any, Any, Any]]) -> Qrels:
    """Judgements from (query id, document id, grade) rows of a dataset (hf:, irds:), with the file readers'
    checks; errors name the row."""
    qrels: Qrels = {}
    for i, (qid, pid, grade) in enumerate(rows, 1):
        if qid is None or pid is None or str(qid) == "" or str(pid) == "":
            raise DataError(name, i, "empty query or document id")
        try:
            grade = int(grade)
        except (TypeError, ValueError):
            raise DataError(name, i, f"relevance grade {grade!r} is not an integer") from None
        judged = qrels.setdefault(str(qid), {})
        if str(pid) in judged and judged[str(pid)] != grade:
            raise DataError(name, i, f"conflicting grades for ({qid}, {pid}): {judged[str(pid)]} and {grade}")
        judged[str(pid)] = grade
    if not qrels:
        raise DataError(name, None, "no judgements")
    return qrels


def _irds(dataset_id: str):
    try:
        import ir_datasets
    except ImportError:
        raise DataError(f"irds:{dataset_id}", None, "ir_datasets is not installed: pip install '.[irds]'") from None
    try:
        return ir_datasets.load(dataset_id)
    except KeyError:  # its registry's own error: a bare KeyError traceback
        import difflib

        close = difflib.get_close_matches(dataset_id, list(ir_datasets.registry), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (ir_datasets.registry lists them)"
        raise DataError(f"irds:{dataset_id}", None, f"no such ir_datasets id{hint}") from None


def _irds_fetched(dataset_id: str, kind: str) -> Iterator[Any]:
    """The ``kind`` (docs, queries, qrels) of an ir_datasets dataset; a download it cannot make (offline, a host that
    does not resolve: a requests ConnectionError, an OSError) is one DataError line, as for an ``hf:`` source."""
    try:
        yield from getattr(_irds(dataset_id), f"{kind}_iter")()
    except OSError as exc:
        raise DataError(f"irds:{dataset_id}", None, f"cannot be loaded: {'; '.join(str(exc).splitlines())}") from None


def _irds_docs(dataset_id: str) -> Iterator[tuple[str, str, str]]:
    for doc in _irds_fetched(dataset_id, "docs"):
        text = doc.text if hasattr(doc, "text") else doc.default_text()
        yield str(doc.doc_id), getattr(doc, "title", "") or "", text


def _irds_queries(dataset_id: str) -> Iterator[tuple[str, str]]:
    for q in _irds_fetched(dataset_id, "queries"):
        yield str(q.query_id), q.text if hasattr(q, "text") else q.default_text()


def _irds_qrels(dataset_id: str) -> Qrels:
    return _checked_qrels(f"irds:{dataset_id}",
                          ((q.query_id, q.doc_id, q.relevance) for q in _irds_fetched(dataset_id, "qrels")))
