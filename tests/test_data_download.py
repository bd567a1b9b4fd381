"""Data lookup and downloads, against a local HTTP server on 127.0.0.1 serving ../shared's files
and files built here.

The server plays the original hosts (``base_url`` / ``$ROME_JAX_DATA_URL`` point the downloads at
it, or a test gives a source its URLs): it serves each file under the name it has at its original
URL, can corrupt a file, and can cut a body off half way, after announcing the full length.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from rome_jax import data

SHARED = data.CHECKOUT.parent / "shared" / "data"


def shared_bytes(name: str) -> bytes:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path}: shared data file missing")
    return path.read_bytes()


class Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes); paths in ``cut`` stop after half the body."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/mirror"


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.path in self.server.cut else body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty user cache, no $ROME_JAX_DATA, and no checkout's ../shared/data to find."""
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROME_JAX_DATA", raising=False)
    monkeypatch.delenv("ROME_JAX_DATA_URL", raising=False)
    monkeypatch.setattr(data, "CHECKOUT", tmp_path / "not-a-checkout")
    return tmp_path / "cache"


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_pins_are_the_shared_files_or_known_subsets():
    """Every pinned file that is served as is has the sha256 of its copy in ../shared/data,
    except CounterFact: its pin is the full original's, and the shared copy is a known subset."""
    for name, source in data.SOURCES.items():
        if source.member is None and source.sha256 is not None and name != "counterfact.json":
            assert hashlib.sha256(shared_bytes(name)).hexdigest() == source.sha256, name
    cf = data.SOURCES["counterfact.json"]
    assert cf.sha256 == "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f"
    assert cf.urls[1].startswith("https://media.githubusercontent.com/media/"
                                 "scalable-model-editing/rebuilding-rome/")
    subset = hashlib.sha256(shared_bytes("counterfact.json")).hexdigest()
    assert "subset" in data.KNOWN["counterfact.json"][subset]
    assert data.SOURCES["zsre_eval.json"].sha256 is None  # trusted on first use


def built_counterfact(n: int = 40) -> bytes:
    """A CounterFact file built here from the shared records (the real one is not here)."""
    return json.dumps(json.loads(shared_bytes("counterfact.json"))[:n]).encode()


def test_download_tries_the_second_source_checks_the_pin_and_caches(server, cache, monkeypatch):
    """The first host fails, the second (the rebuilding-rome LFS object) serves the file with
    the pinned hash: kept, cached, read again without a download."""
    body = built_counterfact()
    monkeypatch.setitem(data.SOURCES, "counterfact.json", data.Source(
        (server.url + "/dsets/counterfact.json", server.url + "/media/counterfact.json"),
        hashlib.sha256(body).hexdigest()))
    server.files["/mirror/media/counterfact.json"] = body

    records = data.load_counterfact()
    assert server.requests == ["/mirror/dsets/counterfact.json", "/mirror/media/counterfact.json"]
    assert (cache / "data" / "counterfact.json").read_bytes() == body
    assert leftovers(cache / "data") == ["counterfact.json"]
    assert records[0]["case_id"] == 0
    assert "the original, sha256 verified" in data.describe(data.data_file("counterfact.json"))

    assert data.data_file("counterfact.json") == cache / "data" / "counterfact.json"
    assert data.load_counterfact() == records
    assert len(server.requests) == 2  # the second call read the cache


def test_the_subset_is_refused_as_a_download_and_named_where_it_is_used(server, cache,
                                                                         monkeypatch, tmp_path):
    """The shared 17,000-record copy is not the pinned file: a host serving it is refused. As a
    local file it is used, and said to be a subset."""
    server.files["/mirror/counterfact.json"] = shared_bytes("counterfact.json")
    with pytest.raises(ValueError, match="is not the pinned d017056125"):
        data.data_file("counterfact.json", base_url=server.url)
    assert leftovers(cache / "data") == []
    monkeypatch.setenv("ROME_JAX_DATA", str(SHARED))
    records, source = data.counterfact_cases([57, 1416])
    assert [r["case_id"] for r in records] == [57, 1416]
    assert source == f"{SHARED / 'counterfact.json'} (subset: 17,000 of the 21,919 records)"


def test_the_embedded_records_serve_their_case_ids_only(server, cache, monkeypatch):
    """Without counterfact.json anywhere, case ids the embedded default ships come from its
    copy; any other id needs the full data set (a download), so the shipped subset never
    stands in for it."""
    records, source = data.counterfact_cases([57, 946])
    assert [r["case_id"] for r in records] == [57, 946] and "embedded" in source
    assert server.requests == []
    shipped = {r["case_id"] for r in data._embedded_counterfact()}
    other = next(i for i in range(10**6) if i not in shipped)
    monkeypatch.setenv("ROME_JAX_DATA_URL", server.url)
    with pytest.raises(OSError, match="404"):
        data.counterfact_cases([57, other])
    with pytest.raises(OSError, match="404"):
        data.load_counterfact()
    assert server.requests == ["/mirror/counterfact.json"] * 2


def zsre_bytes(n: int = 30) -> bytes:
    return json.dumps(json.loads(shared_bytes("zsre_eval.json"))[:n]).encode()


def test_zsre_is_trusted_on_first_use_then_verified(server, cache, monkeypatch, capsys):
    """No hash of the original zsRE is known: the first download is kept when it has the
    schema, its sha256 recorded beside it and printed; every later use checks it; a changed
    file is refused."""
    body = zsre_bytes()
    digest = hashlib.sha256(body).hexdigest()
    server.files["/mirror/zsre_mem_eval.json"] = body
    monkeypatch.setenv("ROME_JAX_DATA_URL", server.url)

    records = data.load_zsre()
    assert len(records) == 30 and server.requests == ["/mirror/zsre_mem_eval.json"]
    assert digest in capsys.readouterr().err
    record = cache / "data" / "zsre_eval.json.sha256"
    assert record.read_text().split()[0] == digest
    assert leftovers(cache / "data") == ["zsre_eval.json", "zsre_eval.json.sha256"]

    assert data.load_zsre() == records  # verified, not downloaded again
    assert len(server.requests) == 1

    changed = bytearray(body)
    changed[body.index(b'"subject": "') + 12] ^= 1
    (cache / "data" / "zsre_eval.json").write_bytes(bytes(changed))
    with pytest.raises(ValueError, match=f"is not {digest}, recorded when it was downloaded"):
        data.load_zsre()
    record.unlink()
    with pytest.raises(ValueError, match="no sha256 recorded"):
        data.load_zsre()


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"subject": "x"}',
                                  json.dumps([{"subject": "x", "src": "y"}]).encode()])
def test_a_zsre_download_without_the_schema_is_refused(server, cache, body):
    server.files["/mirror/zsre_mem_eval.json"] = body
    with pytest.raises(ValueError, match="expected schema"):
        data.data_file("zsre_eval.json", base_url=server.url)
    assert leftovers(cache / "data") == []


def test_corrupted_download_is_refused_and_not_cached(server, cache):
    body = bytearray(shared_bytes("me_ppl/ME-PPL_1k.json"))
    body[len(body) // 2] ^= 1
    server.files["/mirror/ME-PPL_1k.json"] = bytes(body)
    with pytest.raises(ValueError, match="sha256 .* is not the pinned .* of me_ppl/ME-PPL_1k"):
        data.data_file("me_ppl/ME-PPL_1k.json", base_url=server.url)
    assert leftovers(cache / "data") == ["me_ppl"]  # no file, no temporary left behind


def test_interrupted_download_is_refused_and_not_cached(server, cache):
    body = shared_bytes("me_ppl/ME-PPL_1k.json")
    server.files["/mirror/ME-PPL_1k.json"] = body
    server.cut.add("/mirror/ME-PPL_1k.json")
    with pytest.raises(OSError, match=f"cut off after {len(body) // 2} of {len(body)} bytes"):
        data.data_file("me_ppl/ME-PPL_1k.json", base_url=server.url)
    assert leftovers(cache / "data") == ["me_ppl"]


def test_unreachable_or_missing_url_is_an_oserror(server, cache):
    with pytest.raises(OSError, match="404"):
        data.data_file("me_ppl/ME-PPL_1k.json", base_url=server.url)
    assert leftovers(cache / "data") == ["me_ppl"]


def test_me_ppl_50_is_the_shipped_copy_when_found_nowhere(server, cache):
    path = data.data_file("me_ppl/ME-PPL_50.json", base_url=server.url)
    assert path == data.EMBEDDED / "me_ppl" / "ME-PPL_50.json" and server.requests == []
    assert data.sha256_file(path) == data.SOURCES["me_ppl/ME-PPL_50.json"].sha256


def test_wikitext_is_the_non_blank_lines_of_the_archive_member(server, cache):
    """The derivation of corpus/wikitext2_raw_test.txt from the WikiText-2 zip, on a zip made
    here from the shared file with the original's blank lines put back."""
    text = shared_bytes("corpus/wikitext2_raw_test.txt")
    member = "wikitext-2-raw/wiki.test.raw"
    raw = b"".join(b" \r\n" + line for line in io.BytesIO(text)) + b" \r\n"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(member, raw)
        zipped.writestr("wikitext-2-raw/wiki.train.raw", b"not this one\n")
    body = archive.getvalue()
    server.files["/mirror/wikitext-2-raw-v1.zip"] = body
    original = data.SOURCES["corpus/wikitext2_raw_test.txt"]
    source = data.Source(original.urls, hashlib.sha256(body).hexdigest(), member)

    path = data.download("corpus/wikitext2_raw_test.txt", cache / "data", server.url, source)
    assert path.read_bytes() == text
    assert leftovers(cache / "data") == ["corpus", "corpus/wikitext2_raw_test.txt"]


def test_lookup_order(tmp_path, monkeypatch):
    """$ROME_JAX_DATA, then ../shared/data beside a checkout, then the user cache."""
    name = "me_ppl/ME-PPL_50.json"
    override, checkout, cache = tmp_path / "override", tmp_path / "repo", tmp_path / "cache"
    for folder in (override, checkout.parent / "shared" / "data", cache / "data"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("[]")
    (checkout / "pyproject.toml").parent.mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(data, "CHECKOUT", checkout)
    monkeypatch.setenv("ROME_JAX_CACHE", str(cache))
    monkeypatch.setenv("ROME_JAX_DATA", str(override))
    assert data.data_file(name) == override / name
    monkeypatch.delenv("ROME_JAX_DATA")
    assert data.data_file(name) == checkout.parent / "shared" / "data" / name
    (checkout / "pyproject.toml").unlink()  # an installed package: no ../shared/data
    assert data.data_file(name) == cache / "data" / name


def test_missing_file_without_a_source(cache):
    with pytest.raises(FileNotFoundError, match="glue/sst2.json: data file missing"):
        data.data_file("glue/sst2.json")


def test_tokenizer_falls_back_to_the_embedded_model(cache):
    from rome_jax.hf import DEFAULT_MODEL

    assert data.tokenizer_dir() == DEFAULT_MODEL
    assert (DEFAULT_MODEL / "vocab.json").is_file() and (DEFAULT_MODEL / "merges.txt").is_file()
