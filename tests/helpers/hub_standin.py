"""A stand-in for the Hugging Face Hub on loopback, for offline tests of "load a model by its Hub id".

`HubStandin` serves a few folders as Hub model repos on 127.0.0.1, over plain HTTP, and the real
`huggingface_hub` client downloads from it exactly as it would from huggingface.co: the repo-info
API, the tree listing, `HEAD`/`GET` on `/{repo_id}/resolve/{revision}/{path}`, Range resumes,
gated repos and the Hub's error codes. It never speaks Xet/CAS: no response carries an
`X-Xet-Hash` header, an `xet-auth` link or a `xetHash` tree field, so huggingface_hub always falls
back to plain HTTP downloads (and `point_huggingface_hub` sets `HF_HUB_DISABLE_XET` as well).

Written against huggingface_hub 2.5.0 (`file_download.py`, `_snapshot_download.py`, `hf_api.py`,
`utils/_http.py`); the wire protocol is the one huggingface.co speaks, so older clients work too.

Pointing the client at it
-------------------------
huggingface_hub reads its environment ONCE, at import (`HF_ENDPOINT` -> `constants.ENDPOINT` and
`constants.HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HOME`/`HF_HUB_CACHE`, `HF_HUB_OFFLINE`,
`HF_HUB_DISABLE_XET`, token paths...). Setting env vars inside a test that runs after the import
therefore changes nothing in-process. Two clean ways:

* In-process: `hub.point_huggingface_hub(monkeypatch, tmp_path / "hf_home")` sets the env vars
  (for subprocesses) AND monkeypatches the module attributes of `huggingface_hub.constants` that
  the download code reads at call time (it always reads `constants.X`, never a copied name).
  It also installs an HTTP client whose request hook refuses any host but loopback (recorded in
  `hub.escaped`), and drops huggingface_hub's cached client before and after. Everything is undone
  by monkeypatch at teardown; call `huggingface_hub.close_session()` in the fixture's teardown to
  close the connections the test opened.
* In a subprocess (e.g. `python -m mistral_jax.serve --model org/name`): pass
  `env=hub.env(hf_home)` (merged over `os.environ`); the child imports huggingface_hub fresh.

Passing `endpoint=` to `snapshot_download`/`hf_hub_download`/`HfApi` is not enough on its own: the
product code under test would have to pass it too, and with telemetry on, the client's user-agent
fetches an agent registry from `constants.ENDPOINT` (`/api/agent-harnesses`) whatever `endpoint=`
says. Both helpers set `HF_HUB_DISABLE_TELEMETRY`, which skips that fetch; the stand-in still
answers it (an empty registry) in case a client makes it.

Offline mode is `constants.HF_HUB_OFFLINE` (what `is_offline_mode()` returns); monkeypatch it to
True (and set the env var for subprocesses) - setting only the env var in-process has no effect.

What huggingface_hub 2.5.0 asks, for `snapshot_download(repo_id, allow_patterns=...)`::

    GET  /api/models/{repo_id}/revision/main                      -> sha, siblings
    GET  /api/models/{repo_id}/tree/{sha}?recursive=true&expand=false   (cached on disk per commit)
    HEAD /{repo_id}/resolve/{sha}/{file}   then   GET the same      (per matching file)

A dropped body is retried inside the same call with `Range: bytes=N-` (N = bytes already written,
a multiple of `constants.DOWNLOAD_CHUNK_SIZE`, 10 MiB); 2.x writes to a per-process temporary it
deletes on failure, so there is no `.incomplete` file to resume from on a later call.

Example::

    with HubStandin({"org/tiny": folder}, gated={"org/locked"}, tokens={"hf_ok"}) as hub:
        hub.point_huggingface_hub(monkeypatch, tmp_path / "hf_home")
        path = huggingface_hub.snapshot_download("org/tiny", allow_patterns=["*.json"])
        assert hub.downloads() == [("org/tiny", "config.json")]
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit

LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
HOUSEKEEPING_PATHS = ("/api/agent-harnesses",)  # fetched by huggingface_hub on its own (user-agent)


class Request(NamedTuple):
    """One request the stand-in served: method, request target as sent (query included), Range."""

    method: str
    path: str
    range: str | None


class RepoFile:
    """One file of a repo at its single commit, with the hashes the Hub reports for it.

    Files of at least `lfs_threshold` bytes are "LFS files", as weights are on the Hub: their ETag
    is the sha256 of the content and the tree listing carries an `lfs` entry; smaller files are
    plain git blobs whose ETag is the git blob sha1. huggingface_hub names cache blobs by ETag.
    """

    def __init__(self, path: str, data: bytes, lfs: bool):
        self.path = path
        self.data = data
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.lfs = lfs
        if lfs:
            self.pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                            f"size {self.size}\n").encode()
            self.blob_id = _git_blob_sha1(self.pointer)  # git stores the LFS pointer, not the bytes
            self.etag = self.sha256
        else:
            self.pointer = None
            self.blob_id = _git_blob_sha1(data)
            self.etag = self.blob_id

    def tree_entry(self) -> dict:
        """This file as `GET /api/models/{id}/tree/{rev}` lists it (huggingface_hub's `RepoFile`)."""
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry

    def sibling(self, blobs: bool) -> dict:
        """This file in the model-info `siblings` list (sizes and hashes only with `?blobs=true`)."""
        if not blobs:
            return {"rfilename": self.path}
        entry = {"rfilename": self.path, "size": self.size, "blobId": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


class Repo:
    """A folder read once into memory: the repo's files at one commit (a fixed 40-hex sha)."""

    def __init__(self, repo_id: str, folder: Path, lfs_threshold: int, sha: str | None = None):
        folder = Path(folder)
        self.repo_id = repo_id
        self.files: dict[str, RepoFile] = {}
        for file in sorted(folder.rglob("*")):
            rel = file.relative_to(folder)
            if file.is_file() and ".git" not in rel.parts:
                data = file.read_bytes()
                self.files[rel.as_posix()] = RepoFile(rel.as_posix(), data, len(data) >= lfs_threshold)
        digest = hashlib.sha1(repo_id.encode())
        for path, f in self.files.items():
            digest.update(f"\0{path}\0{f.sha256}".encode())
        self.sha = sha or digest.hexdigest()  # a stable commit id: changes iff the contents do

    def resolves(self, revision: str) -> bool:
        """The one branch ("main") and the commit sha name this commit; nothing else exists."""
        return revision in ("main", self.sha)

    def folders(self) -> list[str]:
        return sorted({"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)})


class LeftLoopback(Exception):
    """Raised by the client guard of `point_huggingface_hub` for any request to a non-loopback host."""


class HubStandin:
    """Serves `{repo_id: folder}` as Hub model repos on 127.0.0.1 (a free port, background threads).

    Attributes:
        endpoint: the URL to use as HF_ENDPOINT.
        requests: every `Request` served, in order (appended under a lock; `clear_requests()`).
        unexpected: the requests no Hub route matched (answered 404); a test asserts it is empty.
        escaped: URLs the client guard refused because they left loopback (see module docstring).
        gated: repo ids whose file contents (and with `gate_metadata=True` also their API) need
            `Authorization: Bearer <t>` with `t` in `tokens`: 401 without a token, 403 with another,
            both with `X-Error-Code: GatedRepo` (huggingface_hub's `GatedRepoError`). As on
            huggingface.co, the model info and tree of a gated repo are public by default.
        tokens: the tokens that open gated repos.

    `lfs_redirect=True` mimics huggingface.co's LFS path: `/resolve` of an LFS file answers 302 to a
    "CDN" (a second loopback port, another origin, no auth) with `X-Linked-Etag`/`X-Linked-Size`.
    """

    def __init__(self, repos: dict[str, str | Path], *, gated: Iterable[str] = (), tokens: Iterable[str] = (),
                 gate_metadata: bool = False, lfs_threshold: int = 10 * 1024, lfs_redirect: bool = False,
                 commits: dict[str, str] | None = None):
        commits = commits or {}
        self.repos = {rid: Repo(rid, folder, lfs_threshold, commits.get(rid)) for rid, folder in repos.items()}
        self.gated: set[str] = set(gated)
        self.tokens: set[str] = set(tokens)
        self.gate_metadata = gate_metadata
        self.lfs_redirect = lfs_redirect
        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self.escaped: list[str] = []
        self._lock = threading.Lock()
        self._cuts: dict[tuple[str | None, str], list[int]] = {}
        self._connections: set[socket.socket] = set()
        self._servers: list[ThreadingHTTPServer] = []
        self.endpoint = self.cdn_endpoint = ""

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubStandin:
        hub_server = self._serve("hub")
        self.endpoint = f"http://127.0.0.1:{hub_server.server_address[1]}"
        cdn_server = self._serve("cdn")  # another port = another origin: no auth header follows
        self.cdn_endpoint = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:  # kept-alive connections: their handler threads would wait on them forever
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._servers.clear()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self, role: str) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub, server.role = self, role
        threading.Thread(target=server.serve_forever, args=(0.05,), name=f"hub-standin-{role}", daemon=True).start()
        self._servers.append(server)
        return server

    # ----------------------------------------------------------------- test controls
    def cut_after(self, filename: str, nbytes: int, *, times: int = 1, repo_id: str | None = None) -> None:
        """Make the next `times` GETs of `filename` (repo-relative path) stop after `nbytes` of body.

        The response still announces the full Content-Length (206/Content-Range for a Range
        request) and the server then closes the connection, as a dropped connection would.
        """
        with self._lock:
            self._cuts[(repo_id, filename)] = [nbytes, times]

    def _take_cut(self, repo_id: str, filename: str) -> int | None:
        with self._lock:
            for key in ((repo_id, filename), (None, filename)):
                cut = self._cuts.get(key)
                if cut is not None:
                    cut[1] -= 1
                    if cut[1] <= 0:
                        del self._cuts[key]
                    return cut[0]
        return None

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unexpected.clear()

    def downloads(self, method: str = "GET") -> list[tuple[str, str]]:
        """(repo_id, path) of each `method` request on a file (`/resolve/` or the CDN), in order."""
        out = []
        for req in list(self.requests):
            if req.method != method:
                continue
            path = urlsplit(req.path).path
            if "/resolve/" in path:
                repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                out.append((unquote(repo_id), unquote(rest.split("/", 1)[1]) if "/" in rest else ""))
            elif path.startswith("/_cdn/"):
                out.append(tuple(unquote(p) for p in path[len("/_cdn/"):].split("/-/", 1)))
        return out

    def hub_requests(self) -> list[Request]:
        """`requests` less the client's own housekeeping (the agent-harness registry it fetches)."""
        return [r for r in list(self.requests) if urlsplit(r.path).path not in HOUSEKEEPING_PATHS]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    # ----------------------------------------------------------------- pointing a client here
    def env(self, hf_home: str | Path) -> dict[str, str]:
        """Environment for a subprocess that should use this stand-in and a cache under `hf_home`."""
        hf_home = Path(hf_home)
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": "",  # empty = no token (huggingface_hub treats "" as unset)
        }

    def point_huggingface_hub(self, monkeypatch, hf_home: str | Path) -> None:
        """Point the already-imported huggingface_hub of this process here (see module docstring).

        `monkeypatch` is pytest's fixture (anything with setenv/delenv/setattr and undo at teardown).
        """
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        hf_home = Path(hf_home)
        hf_home.mkdir(parents=True, exist_ok=True)
        for name, value in self.env(hf_home).items():
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN",
                     "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        patched = {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
            "HF_ASSETS_CACHE": str(hf_home / "assets"),
            "HF_XET_CACHE": str(hf_home / "xet"),
            "HF_TOKEN_PATH": str(hf_home / "token"),
            "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
            "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_TELEMETRY": True,
        }
        for name, value in patched.items():
            monkeypatch.setattr(constants, name, value, raising=False)
        # The module-level HfApi() behind huggingface_hub.list_repo_files & co. copied the endpoint
        # when huggingface_hub was imported: it is repointed too.
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", self.endpoint)

        escaped = self.escaped
        previous_factory = _http._GLOBAL_CLIENT_FACTORY

        def loopback_only(request) -> None:
            if request.url.host not in ("127.0.0.1", "localhost", "::1"):
                escaped.append(str(request.url))
                raise LeftLoopback(f"test request left loopback: {request.method} {request.url}")

        def factory():
            client = previous_factory()
            client.event_hooks = {**client.event_hooks,
                                  "request": [*client.event_hooks.get("request", []), loopback_only]}
            return client

        huggingface_hub.close_session()
        monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", factory)
        monkeypatch.setattr(_http, "_GLOBAL_CLIENT", None)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _Handler(BaseHTTPRequestHandler):
    """Routes one connection's requests; `self.server.hub` is the HubStandin, `.role` hub or cdn."""

    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    timeout = 60  # an idle kept-alive connection gives up after this

    def setup(self):
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections.add(self.connection)

    def finish(self):
        with self.server.hub._lock:
            self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # quiet: pytest shows `requests` when a test fails
        pass

    # ----------------------------------------------------------------- dispatch
    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        hub: HubStandin = self.server.hub
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # drain a body we don't use, or the connection desyncs
        request = Request(self.command, self.path, self.headers.get("Range"))
        path = urlsplit(self.path).path
        query = urlsplit(self.path).query
        route = None
        if self.command in ("GET", "HEAD"):
            if self.server.role == "cdn":
                route = self._cdn if path.startswith("/_cdn/") else None
            elif path in HOUSEKEEPING_PATHS:
                route = self._agent_harnesses
            elif path.startswith("/api/models/"):
                route = self._api if self.command == "GET" else None
            elif "/resolve/" in path and not path.startswith("/api/"):
                route = self._resolve
        self._request = request
        hub._record(request)
        if route is None:
            return self._no_route()
        route(path, query)

    def _no_route(self):
        """Anything huggingface.co would serve but this stand-in doesn't: 404, noted in `unexpected`."""
        hub: HubStandin = self.server.hub
        with hub._lock:
            hub.unexpected.append(self._request)
        self._error(404, None, f"Stand-in has no route for {self.command} {self.path}")

    # ----------------------------------------------------------------- routes
    def _agent_harnesses(self, path, query):
        """huggingface_hub fetches this registry once per process to fill its user-agent."""
        self._json({"standardEnvVars": [], "harnesses": {}})

    def _api(self, path, query):
        """`GET /api/models/{id}[/revision/{rev}]` (model_info/repo_info) and `/tree/{rev}[/{dir}]`."""
        hub: HubStandin = self.server.hub
        rest = path[len("/api/models/"):]
        repo = self._find_repo(rest)
        if repo is None:
            return self._repo_not_found(re.split(r"/(?:revision|tree)/", rest, maxsplit=1)[0])
        tail = rest[len(repo.repo_id):]
        match = re.fullmatch(r"(?:/(revision|tree)/([^/]+)(/.*)?)?", tail)
        if match is None or (match.group(1) == "revision" and match.group(3)):
            return self._no_route()
        kind, revision, subdir = match.group(1), unquote(match.group(2) or "main"), match.group(3)
        if hub.gate_metadata and not self._allowed(repo):
            return
        if not repo.resolves(revision):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        params = {k.lower(): v.lower() for k, v in (p.split("=", 1) for p in query.split("&") if "=" in p)}
        if kind == "tree":
            return self._json(self._tree(repo, unquote(subdir or "/").strip("/"), params.get("recursive") == "true"))
        blobs = params.get("blobs") == "true"
        self._json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": repo.sha,
            "lastModified": LAST_MODIFIED,
            "createdAt": LAST_MODIFIED,
            "private": False,
            "gated": "manual" if repo.repo_id in hub.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": None,
            "siblings": [f.sibling(blobs) for f in repo.files.values()],
            **({"usedStorage": sum(f.size for f in repo.files.values())} if blobs else {}),
        })

    def _tree(self, repo: Repo, subdir: str, recursive: bool) -> list[dict]:
        prefix = subdir + "/" if subdir else ""
        entries = [{"type": "directory", "oid": _git_blob_sha1(d.encode()), "size": 0, "path": d}
                   for d in repo.folders() if d.startswith(prefix)]
        entries += [f.tree_entry() for p, f in repo.files.items() if p.startswith(prefix)]
        if not recursive:
            entries = [e for e in entries if "/" not in e["path"][len(prefix):]]
        return entries

    def _resolve(self, path, query):
        """`HEAD`/`GET /{repo_id}/resolve/{revision}/{path}`: the file's metadata and bytes."""
        hub: HubStandin = self.server.hub
        repo_part, rest = path.lstrip("/").split("/resolve/", 1)
        repo = hub.repos.get(unquote(repo_part))
        if repo is None:
            return self._repo_not_found(unquote(repo_part))
        if not self._allowed(repo):
            return
        revision, _, filename = rest.partition("/")
        revision, filename = unquote(revision), unquote(filename)
        if not repo.resolves(revision):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        file = repo.files.get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"",
                               {"X-Repo-Commit": repo.sha})
        if hub.lfs_redirect and file.lfs:
            signed = f"{quote(repo.repo_id, safe='')}/-/{quote(filename)}?sha256={file.sha256}"
            location = f"{hub.cdn_endpoint}/_cdn/{signed}"
            return self._reply(302, b"", {"Location": location, "X-Repo-Commit": repo.sha,
                                          "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size),
                                          "ETag": f'"{file.blob_id}"', "Content-Type": "text/plain"})
        self._file(repo, file, {"X-Repo-Commit": repo.sha, "ETag": f'"{file.etag}"'})

    def _cdn(self, path, query):
        """The "CDN" a 302 points to: a signed URL stands in as `?sha256=`, so no auth is needed."""
        hub: HubStandin = self.server.hub
        repo_part, _, filename = path[len("/_cdn/"):].partition("/-/")
        repo = hub.repos.get(unquote(repo_part))
        file = repo.files.get(unquote(filename)) if repo else None
        if file is None or f"sha256={file.sha256}" not in query:
            return self._error(403, None, "Bad or expired signature")
        self._file(repo, file, {"ETag": f'"{file.sha256}"'})

    # ----------------------------------------------------------------- helpers
    def _find_repo(self, rest: str) -> Repo | None:
        """The served repo whose id `rest` starts with (ids may or may not have an org part)."""
        hub: HubStandin = self.server.hub
        for repo_id in sorted(hub.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return hub.repos[repo_id]
        return None

    def _allowed(self, repo: Repo) -> bool:
        """Gate check; answers 401/403 `GatedRepo` itself and returns False when refused."""
        hub: HubStandin = self.server.hub
        if repo.repo_id not in hub.gated:
            return True
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token in hub.tokens:
            return True
        message = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                   "authenticated to access it. Please log in." if token is None else
                   f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.")
        self._error(401 if token is None else 403, "GatedRepo", message)
        return False

    def _repo_not_found(self, repo_id: str):
        self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")

    def _file(self, repo: Repo, file: RepoFile, headers: dict[str, str]):
        """The file's bytes, whole (200) or the asked `Range: bytes=a-b` (206), maybe cut short."""
        hub: HubStandin = self.server.hub
        total, status, start, end = file.size, 200, 0, file.size - 1
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if file.lfs:
            headers.update({"X-Linked-Size": str(file.size), "X-Linked-Etag": f'"{file.sha256}"'})
        wanted = self.headers.get("Range")
        if wanted:
            match = _RANGE.fullmatch(wanted.strip())
            if match and match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            elif match and match.group(2):  # a suffix: the last N bytes
                start = max(total - int(match.group(2)), 0)
            if not match or not (match.group(1) or match.group(2)) or start >= total or start > end:
                return self._error(416, None, f"Range not satisfiable: {wanted}",
                                   {"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = file.data[start:end + 1]
        cut = hub._take_cut(repo.repo_id, file.path) if self.command == "GET" else None
        self._reply(status, body, headers, cut=cut)

    def _json(self, payload):
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json; charset=utf-8"})

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        """An error as the Hub sends it: `X-Error-Code`/`X-Error-Message` and `{"error": ...}`."""
        headers = dict(headers or {}, **{"Content-Type": "application/json; charset=utf-8",
                                         "X-Error-Message": message})
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, json.dumps({"error": message}).encode(), headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str], cut: int | None = None):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is None:
            self.wfile.write(body)
        else:
            self.wfile.write(body[:cut])  # announced len(body), sends `cut` bytes, hangs up
            self.wfile.flush()
            self.close_connection = True
