"""Build the loss-parity corpus (issue 7): natural text and Python code, long documents.

Sources (``../shared/data/README.md``), each written as ``{"id", "text"}`` JSON lines:

* ``--debian DIR``: the Debian packages ``dict-gcide``, ``linux-doc-6.1`` and ``python3.11-doc``,
  fetched with ``apt-get download`` into DIR (skipped when the ``.deb`` files are already there)
  and unpacked with ``dpkg-deb -x``, plus the bundled King James Bible (``bible-kjv-text`` is a
  compressed binary format). Documents: one per documentation directory (its ``.rst.txt``
  sources concatenated), the dictionary cut at entry boundaries, one per book of the Bible; all
  cut to at most ``--max_doc_kb``. → ``natural.jsonl.gz``.
* ``--code ROOT`` (repeatable): Python source trees (the standard library, a site-packages).
  One document per directory: its ``.py`` files in name order, each after a ``# file: path``
  line, cut to at most ``--max_doc_kb``. → ``code.jsonl.gz``.

Directories whose files belong together make documents of thousands to tens of thousands of
tokens: what long-context training needs. ``fsa-train train-tokenizer`` and ``prepare-data`` take
the written files as they are.

``python -m benchmarks run parity_corpus --out corpus --debian /tmp/debs --code "$(python3 -c
'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"``
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from benchmarks import REGISTRY, register
from fsa_train.data.corpus import demo_corpus_path

DEBIAN_PACKAGES = ("dict-gcide", "linux-doc-6.1", "python3.11-doc")


def cut(doc_id: str, text: str, max_chars: int, separator: str = "\n\n") -> Iterator[dict]:
    """``text`` as documents of at most ``max_chars``, cut at ``separator`` where possible."""
    part, start = 0, 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            at = text.rfind(separator, start + max_chars // 2, end)
            end = at + len(separator) if at > 0 else end
        chunk = text[start:end]
        if chunk.strip():
            yield {"id": f"{doc_id}#{part}" if part or end < len(text) else doc_id, "text": chunk}
            part += 1
        start = end


def directory_documents(root: Path, pattern: str, max_chars: int) -> Iterator[dict]:
    """One document per directory under ``root``: its files matching ``pattern``, in name order,
    each after a ``# file:`` line."""
    by_dir: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob(pattern)):
        if path.is_file():
            by_dir.setdefault(path.parent, []).append(path)
    for directory, files in sorted(by_dir.items()):
        pieces = []
        for path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            pieces.append(f"# file: {path.relative_to(root)}\n{text}")
        yield from cut(str(directory.relative_to(root)) or ".", "\n".join(pieces), max_chars,
                       separator="\n# file: ")


def unpack_debian(workdir: Path) -> Path:
    """Download (if missing) and unpack the Debian packages; returns the unpacked root."""
    workdir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not list(workdir.glob(f"{p}_*.deb"))]
    if missing:
        if shutil.which("apt-get") is None:
            sys.exit(f"parity_corpus: error: {missing} not in {workdir} and no apt-get to fetch")
        subprocess.run(["apt-get", "download", *missing], cwd=workdir, check=True)
    root = workdir / "unpacked"
    for package in DEBIAN_PACKAGES:
        target = root / package
        if not target.exists():
            target.mkdir(parents=True)
            deb = sorted(workdir.glob(f"{package}_*.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return root


def debian_documents(root: Path, max_chars: int) -> Iterator[dict]:
    for package, sources in (("linux-doc", "linux-doc-6.1/usr/share/doc/linux-doc-6.1/html"),
                             ("python-doc", "python3.11-doc/usr/share/doc/python3.11/html")):
        for doc in directory_documents(root / sources / "_sources", "*.rst.txt", max_chars):
            yield {"id": f"{package}/{doc['id']}", "text": doc["text"]}
    gcide = root / "dict-gcide/usr/share/dictd/gcide.dict.dz"
    with gzip.open(gcide, "rt", encoding="utf-8", errors="replace") as source:
        yield from cut("gcide", source.read(), max_chars)
    with gzip.open(demo_corpus_path(), "rt", encoding="utf-8") as source:
        for line in source:
            book = json.loads(line)
            yield from cut(f"kjv/{book['id']}", book["text"], max_chars)


def write_jsonl_gz(path: Path, docs: Iterable[dict]) -> tuple[int, int]:
    """Write documents; returns (documents, characters)."""
    count = chars = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as out:
        for doc in docs:
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
            chars += len(doc["text"])
    return count, chars


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the .jsonl.gz files")
    parser.add_argument("--debian", metavar="DIR", help="where the .deb files are (or go)")
    parser.add_argument("--code", metavar="ROOT", action="append", default=[],
                        help="a Python source tree (repeatable)")
    parser.add_argument("--max_doc_kb", type=int, default=256, help="longest document, in KB")


@register("parity_corpus", summary="build the loss-parity corpus (natural text and Python code)",
          arguments=add_arguments, gpu=False, record=False)
def main(args: argparse.Namespace) -> None:
    def error(message: str) -> None:
        raise SystemExit(f"parity_corpus: error: {message}")

    if not args.debian and not args.code:
        error("give --debian and/or --code")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    max_chars = args.max_doc_kb * 1024
    if args.debian:
        docs = debian_documents(unpack_debian(Path(args.debian)), max_chars)
        count, chars = write_jsonl_gz(out / "natural.jsonl.gz", docs)
        print(f"natural.jsonl.gz: {count} documents, {chars / 1e6:.1f} M characters")
    if args.code:
        for root in args.code:
            if not Path(root).is_dir():
                error(f"--code {root}: not a directory")

        def code_docs() -> Iterator[dict]:
            for root in args.code:
                name = Path(root).name
                for doc in directory_documents(Path(root), "*.py", max_chars):
                    yield {"id": f"{name}/{doc['id']}", "text": doc["text"]}

        count, chars = write_jsonl_gz(out / "code.jsonl.gz", code_docs())
        print(f"code.jsonl.gz: {count} documents, {chars / 1e6:.1f} M characters")



if __name__ == "__main__":  # as `python -m benchmarks run` does
    REGISTRY["parity_corpus"].run()
