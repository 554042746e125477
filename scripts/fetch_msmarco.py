#!/usr/bin/env python
"""Fetch the official MS MARCO passage files into data/msmarco/ (resumable, md5-checked).

    python scripts/fetch_msmarco.py [--out data/msmarco] [--only dl19,dev]

Downloads resume from where they stopped (HTTP Range); every archive is checked against its published md5
(the checksums ir_datasets/datamaestro use) before anything is extracted; extracted files are written
atomically, so an interrupted run never leaves a half file under its final name. About 1.1 GB of downloads,
3.2 GB on disk after extraction. The MS MARCO terms of use (non-commercial research) apply.

The same data is also reachable without this script: data.corpus=irds:msmarco-passage (ir_datasets) or
hf:<dataset id> for Hugging Face copies.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# where data=msmarco looks (conf/data/msmarco.yaml: ${repo_root:}/data/msmarco, or $MSMARCO_DIR): the repository's
# data/ folder, not the working directory's, so a fetch run from elsewhere lands where the pipeline reads
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "msmarco"

MIRRORS = ["https://msmarco.z22.web.core.windows.net/msmarcoranking/",
           "https://msmarco.blob.core.windows.net/msmarcoranking/"]

# name -> (url or file name on the mirrors, md5, files it provides: archive member or "" for the file itself)
FILES = {
    "collectionandqueries.tar.gz": (None, "31644046b18952c1386cd4564ba2ae69",
                                    {"collection.tsv": "collection.tsv",
                                     "queries.dev.small.tsv": "queries.dev.small.tsv",
                                     "qrels.dev.small.tsv": "qrels.dev.small.tsv"}),
    "queries.tar.gz": (None, "c177b2795d5f2dcc524cf00fcd973be1", {"queries.train.tsv": "queries.train.tsv"}),
    "qrels.train.tsv": (None, "733fb9fe12d93e497f7289409316eccf", {"qrels.train.tsv": ""}),
    "msmarco-test2019-queries.tsv.gz": (None, "756e60d714cee28d3b552289d6272f1d",
                                        {"msmarco-test2019-queries.tsv": ""}),
    "msmarco-passagetest2019-top1000.tsv.gz": (None, "ec9e012746aa9763c7ff10b3336a3ce1",
                                               {"msmarco-passagetest2019-top1000.tsv": ""}),
    "2019qrels-pass.txt": ("https://trec.nist.gov/data/deep/2019qrels-pass.txt", "2f4be390198da108f6845c822e5ada14",
                           {"2019qrels-pass.txt": ""}),
}
GROUPS = {
    "corpus": ["collectionandqueries.tar.gz"],
    "train": ["queries.tar.gz", "qrels.train.tsv"],
    "dev": ["collectionandqueries.tar.gz"],
    "dl19": ["msmarco-test2019-queries.tsv.gz", "msmarco-passagetest2019-top1000.tsv.gz", "2019qrels-pass.txt"],
}


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download(urls: list[str], target: Path, md5: str, retries: int = 5) -> None:
    """Resumable download into <target>.part; renamed onto target only once the md5 matches."""
    if target.exists() and md5sum(target) == md5:
        print(f"ok      {target.name} (already here, md5 matches)")
        return
    part = target.with_name(target.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries):
        for url in urls:
            have = part.stat().st_size if part.exists() else 0
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    if have and resp.status != 206:  # server ignored the range: start over
                        have = 0
                    total = have + int(resp.headers.get("Content-Length") or 0)
                    with open(part, "ab" if have else "wb") as out:
                        done, start = have, time.monotonic()
                        while chunk := resp.read(1 << 20):
                            out.write(chunk)
                            done += len(chunk)
                            rate = (done - have) / max(time.monotonic() - start, 1e-6) / 1e6
                            print(f"\r{target.name}: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB {rate:.1f} MB/s",
                                  end="", file=sys.stderr)
                print(file=sys.stderr)
                got = md5sum(part)
                if got != md5:
                    part.unlink()
                    raise OSError(f"md5 mismatch for {target.name}: got {got}, expected {md5} (deleted, retrying)")
                os.replace(part, target)
                print(f"fetched {target.name}")
                return
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last_error = exc
                print(f"\n{url}: {exc}; retrying", file=sys.stderr)
        time.sleep(min(60, 2 ** attempt))
    raise SystemExit(f"could not download {target.name}: {last_error}. Rerun to resume.")


def extract(archive: Path, members: dict[str, str], out: Path) -> None:
    """Write each wanted file atomically (tmp + rename) from a tar, a .gz or the file itself."""
    for name, member in members.items():
        final = out / name
        if final.exists():
            continue
        tmp = out / f".tmp-{name}"
        if archive.name.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tar:
                info = next((m for m in tar.getmembers() if Path(m.name).name == member), None)
                if info is None:
                    raise SystemExit(f"{archive.name} has no member {member}")
                with tar.extractfile(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
        elif archive.name.endswith(".gz"):
            with gzip.open(archive, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        else:
            continue  # the download is the file itself
        os.replace(tmp, final)
        print(f"wrote   {final}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("MSMARCO_DIR", str(DEFAULT_OUT)), help="target folder")
    parser.add_argument("--only", default="corpus,train,dev,dl19", help=f"groups: {','.join(GROUPS)}")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted: list[str] = []
    for group in args.only.split(","):
        if group not in GROUPS:
            parser.error(f"unknown group {group!r}; choose from {', '.join(GROUPS)}")
        wanted += [f for f in GROUPS[group] if f not in wanted]
    for name in wanted:
        url, md5, members = FILES[name]
        if all((out / m).exists() for m in members):
            print(f"ok      {', '.join(members)}")
            continue
        archive = out / name
        download([url] if url else [m + name for m in MIRRORS], archive, md5)
        extract(archive, members, out)
        # every .gz download was extracted (a .tar.gz into its members, a .gz into the file it compresses); the
        # downloads that are the file itself (qrels.train.tsv, 2019qrels-pass.txt) end otherwise and stay
        if not args.keep_archives and archive.name.endswith(".gz"):
            archive.unlink()
    print(f"done: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
