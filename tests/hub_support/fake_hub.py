"""A local stand-in for the Hugging Face hub that the real ``huggingface_hub`` client talks to through ``HF_ENDPOINT``.

It answers what huggingface_hub 2.x asks (read from its ``file_download.py``, ``utils/_http.py`` and ``hf_api.py``):

* ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: small (git) files answer 200 with ``ETag`` = the git blob sha1,
  ``X-Repo-Commit`` and ``Content-Length``. LFS files (``.safetensors``, or anything large) answer ``302`` to a
  second server on another port, the "CDN", with ``X-Linked-Etag`` = the sha256, ``X-Linked-Size`` and
  ``X-Repo-Commit`` on the redirect itself, as the real hub does: the client reads the metadata there and does not
  send its token to the CDN. Both serve ``Range: bytes=N-`` with ``206`` and ``Content-Range``.
* errors with ``X-Error-Code``: ``RepoNotFound`` (401 without a token, 404 with one), ``GatedRepo`` (401 without a
  token, 403 with a token that was not granted), ``RevisionNotFound`` and ``EntryNotFound`` (404).
* ``GET /api/models/{repo}/revision/{revision}[?blobs=true]``: the model info with ``siblings`` (``size``, ``blobId``,
  ``lfs.sha256``); public metadata, also for gated repositories.

Faults for tests: :meth:`FakeHub.fail` makes the next byte transfers of a file drop the connection mid-body, arrive
short (a clean response with a smaller ``Content-Length``) or arrive corrupted. Every request is recorded in
:attr:`FakeHub.requests` so tests can count them.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".model")


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str  # the URL path, unquoted
    range: str | None
    authorization: str | None


@dataclass
class Fault:
    kind: str  # "drop": close the connection after `at` body bytes; "short": send only `at` bytes, cleanly;
    #            "corrupt": flip a byte of the body
    at: int = 0
    times: int = 1


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes] = field(default_factory=dict)
    gated: bool = False
    revision: str = "main"

    @property
    def commit(self) -> str:
        return hashlib.sha1(f"{self.repo_id}@{sorted(self.files)}".encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or len(self.files[path]) > 10_000_000


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """``with FakeHub() as hub: hub.add_file(repo, path, data); os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.granted: dict[str, set[str]] = {}  # token -> gated repos it may read
        self.requests: list[Request] = []
        self.faults: dict[tuple[str, str], list[Fault]] = {}  # per file, used in order
        self._lock = threading.Lock()
        self._hub = _Server(self, "hub")
        self._cdn = _Server(self, "cdn")

    # ---- content

    def add_file(self, repo_id: str, path: str, data: bytes | Path, *, gated: bool | None = None) -> None:
        repo = self.repos.setdefault(repo_id, FakeRepo(repo_id))
        repo.files[path] = Path(data).read_bytes() if isinstance(data, Path) else bytes(data)
        if gated is not None:
            repo.gated = gated

    def grant(self, token: str, repo_id: str) -> None:
        """``token`` has accepted the licence of the gated ``repo_id``."""
        self.granted.setdefault(token, set()).add(repo_id)

    def fail(self, repo_id: str, path: str, kind: str, at: int = 0, times: int = 1) -> None:
        """``times`` byte transfers of the file go wrong (see :class:`Fault`), after the faults already queued."""
        self.faults.setdefault((repo_id, path), []).append(Fault(kind, at, times))

    # ---- inspection

    @property
    def url(self) -> str:
        return self._hub.url

    def downloads(self, path_suffix: str = "") -> list[Request]:
        """The GETs that transferred file bytes (hub resolve of small files, or CDN), optionally of one file."""
        return [r for r in self.requests if r.method == "GET" and ("/resolve/" in r.path or r.server == "cdn")
                and r.path.endswith(path_suffix)]

    # ---- lifecycle

    def __enter__(self) -> FakeHub:
        self._hub.start()
        self._cdn.start()
        return self

    def __exit__(self, *exc) -> None:
        self._hub.stop()
        self._cdn.stop()

    # ---- request handling (called by the servers' handler threads)

    def _record(self, server: str, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(Request(server, handler.command, unquote(urlparse(handler.path).path),
                                         handler.headers.get("Range"), handler.headers.get("Authorization")))

    def _take_fault(self, repo_id: str, path: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get((repo_id, path), [])
            while queue and queue[0].times <= 0:
                queue.pop(0)
            if not queue:
                return None
            queue[0].times -= 1
            return queue[0]

    def _token_of(self, handler: BaseHTTPRequestHandler) -> str | None:
        auth = handler.headers.get("Authorization") or ""
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None

    def _access_error(self, repo: FakeRepo | None, repo_id: str, token: str | None) -> tuple[int, str, str] | None:
        if repo is None:
            return (404 if token else 401), "RepoNotFound", "Repository not found"
        if repo.gated and repo_id not in self.granted.get(token or "", set()):
            if token is None:
                return 401, "GatedRepo", (f"Access to model {repo_id} is restricted. You must have access to it and "
                                          f"be authenticated to access it. Please log in.")
            return 403, "GatedRepo", (f"Access to model {repo_id} is restricted and you are not in the authorized "
                                      f"list. Visit {self.url}/{repo_id} to ask for access.")
        return None


_RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_CDN = re.compile(r"^/lfs/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})/(?P<path>.+)$")


class _Server:
    def __init__(self, hub: FakeHub, name: str) -> None:
        self.hub, self.name = hub, name
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub, name))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(hub: FakeHub, server_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a Content-Length

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_HEAD(self) -> None:
            self._dispatch(body=False)

        def do_GET(self) -> None:
            self._dispatch(body=True)

        # ---- routing

        def _dispatch(self, body: bool) -> None:
            hub._record(server_name, self)
            path = unquote(urlparse(self.path).path)
            if server_name == "cdn":
                match = _CDN.match(path)
                return self._cdn(match, body) if match else self._error(404, None, "Not found", body)
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["rev"], match["path"], body)
            if (match := _API_MODEL.match(path)) and body:
                return self._api_model(match["repo"], match["rev"] or "main")
            return self._error(404, None, "Not found", body)

        def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            refused = hub._access_error(repo, repo_id, hub._token_of(self))
            if refused:
                return self._error(*refused, body)
            if revision not in (repo.revision, repo.commit):
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            commit = {"X-Repo-Commit": repo.commit}
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", body, commit)
            data = repo.files[path]
            if repo.is_lfs(path):
                sha256 = hashlib.sha256(data).hexdigest()
                location = f"{hub._cdn.url}/lfs/{repo_id}/{sha256}/{path}"
                headers = {**commit, "Location": location, "X-Linked-Etag": f'"{sha256}"',
                           "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'}
                return self._answer(302, headers, b"", body)
            headers = {**commit, "ETag": f'"{git_blob_sha1(data)}"', "Content-Type": "application/octet-stream"}
            return self._send_file(repo_id, path, data, headers, body)

        def _cdn(self, match: re.Match, body: bool) -> None:
            repo = hub.repos.get(match["repo"])
            data = repo.files.get(match["path"]) if repo else None
            if data is None or hashlib.sha256(data).hexdigest() != match["sha"]:
                return self._error(404, None, "NoSuchKey", body)
            self._send_file(repo.repo_id, match["path"], data, {"ETag": f'"{match["sha"]}"'}, body)

        def _api_model(self, repo_id: str, revision: str) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(401 if hub._token_of(self) is None else 404, "RepoNotFound", "Repository not found",
                                   True)
            blobs = parse_qs(urlparse(self.path).query).get("blobs", ["false"])[0] == "true"
            siblings = []
            for path, data in sorted(repo.files.items()):
                sibling = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(data), blobId=git_blob_sha1(data))
                    if repo.is_lfs(path):
                        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                          "pointerSize": 134}
                siblings.append(sibling)
            info = {"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                    "sha": repo.commit, "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                    "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                    "lastModified": "2025-06-26T00:00:00.000Z", "createdAt": "2025-06-26T00:00:00.000Z"}
            self._answer(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), True)

        # ---- answers

        def _send_file(self, repo_id: str, path: str, data: bytes, headers: dict, body: bool) -> None:
            start, status = 0, 200
            requested = self.headers.get("Range")
            if requested and (match := re.fullmatch(r"bytes=(\d+)-", requested.strip())):
                start = int(match[1])
                if start >= len(data):
                    return self._answer(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            payload = data[start:]
            headers = {**headers, "Accept-Ranges": "bytes"}
            fault = hub._take_fault(repo_id, path) if body else None
            if fault is None:
                return self._answer(status, headers, payload, body)
            if fault.kind == "short":  # a clean answer that is simply too short
                return self._answer(status, headers, payload[: fault.at], body)
            if fault.kind == "corrupt":
                damaged = bytearray(payload)
                damaged[len(damaged) // 2] ^= 0xFF
                return self._answer(status, headers, bytes(damaged), body)
            # "drop": announce everything, send the first bytes, then cut the connection
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload[: fault.at])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
            headers = {**(extra or {}), "X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._answer(status, headers, json.dumps({"error": message}).encode(), body)

        def _answer(self, status: int, headers: dict, payload: bytes, body: bool) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
