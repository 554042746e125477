"""scripts/fetch_msmarco.py against a loopback HTTP server: resumes a partial download with a Range request,
rejects a wrong md5, and extracts members atomically."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import importlib.util
import io
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT


def _load_fetch():
    spec = importlib.util.spec_from_file_location("fetch_msmarco", REPO_ROOT / "scripts" / "fetch_msmarco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (the stdlib handler ignores Range)."""

    ranges_seen: list[str] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            RangeHandler.ranges_seen.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


def test_resume_md5_and_extraction(server, tmp_path):
    fetch = _load_fetch()
    served, base = server
    collection = "".join(f"{i}\tpassage {i}\n" for i in range(2000)).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("collectionandqueries/collection.tsv")
        info.size = len(collection)
        tar.addfile(info, io.BytesIO(collection))
    archive = buf.getvalue()
    (served / "collectionandqueries.tar.gz").write_bytes(archive)
    queries = gzip.compress(b"1\twhat is a test\n")
    (served / "msmarco-test2019-queries.tsv.gz").write_bytes(queries)

    fetch.MIRRORS[:] = [base]
    fetch.FILES = {
        "collectionandqueries.tar.gz": (None, hashlib.md5(archive).hexdigest(), {"collection.tsv": "collection.tsv"}),
        "msmarco-test2019-queries.tsv.gz": (None, hashlib.md5(queries).hexdigest(), {"msmarco-test2019-queries.tsv": ""}),
    }
    fetch.GROUPS = {"corpus": ["collectionandqueries.tar.gz"], "dl19": ["msmarco-test2019-queries.tsv.gz"]}
    out = tmp_path / "msmarco"
    out.mkdir()
    (out / "collectionandqueries.tar.gz.part").write_bytes(archive[: len(archive) // 2])  # an interrupted download

    assert fetch.main(["--out", str(out), "--only", "corpus,dl19"]) == 0
    assert RangeHandler.ranges_seen and RangeHandler.ranges_seen[0] == f"bytes={len(archive) // 2}-"
    assert (out / "collection.tsv").read_bytes() == collection
    assert (out / "msmarco-test2019-queries.tsv").read_text() == "1\twhat is a test\n"
    assert not list(out.glob(".tmp-*")) and not list(out.glob("*.part"))
    # without --keep-archives no download stays once extracted: a single-file .gz was kept beside its file
    assert sorted(f.name for f in out.iterdir()) == ["collection.tsv", "msmarco-test2019-queries.tsv"]

    fetch.FILES["collectionandqueries.tar.gz"] = (None, "0" * 32, {"collection2.tsv": "collection.tsv"})
    with pytest.raises(SystemExit, match="could not download"):
        fetch.download([base + "collectionandqueries.tar.gz"], out / "bad.tar.gz", "0" * 32, retries=1)
    assert not (out / "bad.tar.gz").exists()


def test_the_default_folder_is_the_one_data_msmarco_reads(monkeypatch, tmp_path):
    """The script's default was data/msmarco under the working directory, the config's the repository's: a fetch
    run from another folder put the files where `data=msmarco` did not look."""
    from pipeline.config import compose

    monkeypatch.delenv("MSMARCO_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    fetch = _load_fetch()
    assert Path(compose(["data=msmarco"]).data.root) == fetch.DEFAULT_OUT
