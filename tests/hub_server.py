"""A small in-memory stand-in for the Hugging Face Hub, for testing Hub code offline.

The real, unmodified ``huggingface_hub`` client (written against 2.4.0) talks HTTP to a
``ThreadingHTTPServer`` on 127.0.0.1; the server uses only the standard library. Repos live in
memory; files are stored whole, keyed by their git blob sha1 (which is also the ``ETag``).

Implemented (``{type}`` is ``models``, ``datasets`` or ``spaces``; ``{prefix}`` is empty for
models, else ``datasets/`` or ``spaces/``):

* ``GET    /api/whoami-v2``                         -> ``whoami`` (401 without a valid token)
* ``POST   /api/repos/create``                      -> ``create_repo`` (``private``; 409 if it exists)
* ``DELETE /api/repos/delete``                      -> ``delete_repo``
* ``POST   /api/validate-yaml``                     -> README.md check made by ``create_commit``;
  accepts everything (no YAML parser in the standard library)
* ``GET    /api/{type}/{repo}[/revision/{rev}]``    -> ``repo_info``/``model_info``/``repo_exists``/
  ``revision_exists`` (id, sha, private, siblings, dates)
* ``POST   /api/{type}/{repo}/preupload/{rev}``     -> always ``"uploadMode": "regular"``, plus the
  ``oid`` of a file already at that path (the client skips unchanged files with it)
* ``POST   /api/{type}/{repo}/commit/{rev}``        -> NDJSON ``header`` / ``file`` (base64) /
  ``deletedFile`` / ``deletedFolder``; ``parentCommit`` (412 if the branch moved);
  ``?create_pr=1`` (new ``refs/pr/N``); applied atomically, all or nothing
* ``POST|DELETE /api/{type}/{repo}/branch/{branch}``-> ``create_branch`` (``startingPoint``; 409
  if it exists) / ``delete_branch``
* ``GET    /api/{type}/{repo}/refs``                -> ``list_repo_refs`` (branches, PR refs)
* ``GET    /api/{type}/{repo}/tree/{rev}[/{path}]`` -> ``list_repo_tree``/``list_repo_files``
  (``recursive``; one page, no ``expand`` details)
* ``GET    /api/{type}/{repo}/commits/{rev}``       -> ``list_repo_commits``
* ``POST   /api/{type}/{repo}/discussions``         -> ``create_pull_request`` only (draft PR at
  the head of main); ``GET .../discussions/{num}`` for its details. ``upload_folder(create_pr=True)``
  uses these when ``hf_xet`` is installed (see below).
* ``HEAD|GET /{prefix}{repo}/resolve/{rev}/{path}`` -> ``hf_hub_download``/``snapshot_download``/
  ``file_exists``: ``ETag`` (git sha1), ``X-Repo-Commit``, ``Content-Length``, ``Range`` (206);
  no ``X-Linked-*`` and no ``X-Xet-*`` headers, so the client never takes the LFS/Xet route.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
``X-Error-Message`` headers plus a ``{"error": ...}`` body, which the client turns into
``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError`` or a plain
``HfHubHTTPError``. Auth: an ``Authorization: Bearer`` token that is not known gets 401 on every
endpoint (as on the Hub); writes need a known write token (missing -> 401, read token -> 403);
private repos answer 401 + ``RepoNotFound`` to requests without a valid token. Any valid token may
write to any namespace (namespaces are not enforced). Error texts approximate the Hub's.

Test helpers: ``hub.requests`` (every request as ``(method, path)``, path without query string,
as sent, e.g. ``refs%2Fpr%2F1``), ``hub.fail_next_commit(after_bytes=..., times=...)`` (drop the
connection after reading part of the next commit body: nothing is applied), ``hub.files(...)``,
``hub.commits(...)``, ``hub.unhandled`` (requests to endpoints not implemented here: answered
404) and ``hub.server_errors`` (tracebacks of 500s).

NOT implemented: LFS and Xet uploads/downloads (every file is stored inline as a regular git
blob, even ``*.safetensors`` which the real Hub would route to LFS/Xet), ``.gitignore``
(``shouldIgnore`` is always false), tags, plain discussions and comments, PR merge, repo settings,
``paths-info``, ``expand``/``blobs``/pagination, gated repos, orgs, rate limits, redirects
(``/api/resolve-cache``), spaces runtime. ``datasets``/``spaces`` work only because the routes
are the same as for models.

Which upload path the client takes: ``HfApi.upload_folder`` uses ``create_commit`` (a single
``POST .../commit``, never retried) only when Xet is unavailable; when ``hf_xet`` is installed
(a hard dependency of huggingface_hub on x86_64/arm64) it uses ``_upload_pipeline``, which
creates PRs through ``/discussions`` and retries a failed commit POST with backoff (1 s, 2 s,
4 s, 8 s, 8 s). Both paths only ever reach this server. ``local_hub_fixture(..., xet=False)``
(the default) sets ``HF_HUB_DISABLE_XET`` to force the ``create_commit`` path.

Pointing the client at the server: ``huggingface_hub`` copies ``HF_ENDPOINT`` at import time
into ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by
``hf_hub_download`` when no ``endpoint=`` is given) and the module-level ``HfApi`` behind
``huggingface_hub.create_repo``/``upload_folder``/``whoami``/...; and transformers 5.x keeps one
lazily built ``HfApi`` (with the endpoint of that moment) in ``transformers.utils.hub._hf_api``.
``point_client_at`` patches all of these (and the cache/token paths, telemetry, Xet and offline
switches, and opens a fresh HTTP client). Use it through ``local_hub_fixture``::

    # conftest.py (or a test module)
    import pytest
    from hub_server import local_hub_fixture

    @pytest.fixture
    def local_hub(monkeypatch, tmp_path):
        yield from local_hub_fixture(monkeypatch, tmp_path)  # tokens {"hf_good"} -> user "user"

    def test_push(local_hub):
        HfApi(token="hf_good").create_repo("user/x")  # goes to local_hub.endpoint

    # or, inside one test (e.g. two servers in a row): ``with local_hub_env(monkeypatch, tmp_path) as hub:``
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHub", "local_hub_env", "local_hub_fixture", "point_client_at"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Path parts that follow a repo id in /api/{type}/... URLs (used to tell "ns/name" from "name").
_SUBPATHS = {"revision", "preupload", "commit", "branch", "refs", "tree", "commits", "discussions", "resolve"}
_SHA1 = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

# What the Hub puts in a new repo's first commit (abridged: the real file lists more patterns).
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as ``ETag`` and ``oid`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error answer: status, ``X-Error-Code``/``X-Error-Message`` headers and a JSON body."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = dict(headers or {}), dict(body or {})


class _Dropped(Exception):
    """The connection was dropped on purpose (fault injection): send nothing."""


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, str]  # path -> blob oid
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    discussions: dict[int, dict] = field(default_factory=dict)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # handler threads are joined by server_close()
    block_on_close = True
    hub: LocalHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    server_version = "LocalHub/1"
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self.server.hub._handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server.hub._handle(self, "POST")

    def do_DELETE(self) -> None:
        self.server.hub._handle(self, "DELETE")

    def do_PUT(self) -> None:
        self.server.hub._handle(self, "PUT")


class LocalHub:
    """In-memory Hub on ``127.0.0.1``; see the module docstring for what it implements.

    ``tokens``: write tokens, an iterable (all belong to user ``user``) or a ``{token: username}``
    mapping. ``read_tokens``: same, but writes with them get 403. ``gitattributes``: put a
    ``.gitattributes`` in each new repo's first commit, as the Hub does.
    """

    def __init__(
        self,
        tokens: Iterable[str] | Mapping[str, str] = ("hf_good",),
        *,
        read_tokens: Iterable[str] | Mapping[str, str] = (),
        gitattributes: bool = True,
    ) -> None:
        def users(t: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
            return dict(t) if isinstance(t, Mapping) else {tok: "user" for tok in t}

        self.write_tokens = users(tokens)
        self.read_tokens = users(read_tokens)
        self.gitattributes = gitattributes
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server_errors: list[str] = []
        self.dropped_commits = 0
        self._faults: list[int | None] = []
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()  # joins the request threads
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def fail_next_commit(self, after_bytes: int | None = None, times: int = 1) -> None:
        """Drop the connection of the next ``times`` commit requests after reading ``after_bytes``
        bytes of the body (default: half of it), without answering. Nothing is applied."""
        with self._lock:
            self._faults.extend([after_bytes] * times)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Server-side view of a revision: ``{path: content}``."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            commit = repo.commits[self._resolve(repo, revision)[1]]
            return {path: self.blobs[oid] for path, oid in sorted(commit.tree.items())}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        with self._lock:
            repo = self.repo(repo_id, repo_type)
            oid: str | None = self._resolve(repo, revision)[1]
            out = []
            while oid is not None:
                out.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return out

    # ------------------------------------------------------------------ HTTP plumbing

    def _handle(self, h: _Handler, method: str) -> None:
        url = urlsplit(h.path)
        path, query = url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self._lock:
            self.requests.append((method, path))
        try:
            body = self._read_body(h, method, path)
            status, headers, payload = self._route(h, method, path, query, body)
        except _Dropped:
            return
        except HubError as err:
            status, payload = err.status, json.dumps({"error": err.message, **err.body}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
        except Exception:  # noqa: BLE001 - report server bugs to the client and to the test
            tb = traceback.format_exc()
            with self._lock:
                self.server_errors.append(tb)
            status, headers, payload = 500, {"Content-Type": "text/plain"}, tb.encode()
        h.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for key, value in headers.items():  # header values must be latin-1
            h.send_header(key, str(value).encode("ascii", "backslashreplace").decode())
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    def _read_body(self, h: _Handler, method: str, path: str) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HubError(411, "LocalHub needs a Content-Length")
        length = int(h.headers.get("Content-Length") or 0)
        fault = None
        if method == "POST" and re.fullmatch(r"/api/[a-z]+/.+/commit/[^/]+", path):
            with self._lock:
                if self._faults:
                    fault = [self._faults.pop(0)]
        if fault is None:
            return h.rfile.read(length)
        cut = length // 2 if fault[0] is None else min(fault[0], length)
        h.rfile.read(cut)
        with self._lock:
            self.dropped_commits += 1
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _route(self, h: _Handler, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        parts = path.split("/")[1:]
        user, can_write = self._auth(h)
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                if user is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return self._json(self._whoami(user, can_write))
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(self._writer(user, can_write), json.loads(body or b"{}"))
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(self._writer(user, can_write), json.loads(body or b"{}"))
            if rest == ["validate-yaml"] and method == "POST":
                return self._json({"errors": [], "warnings": []})
            if rest and rest[0] in REPO_TYPES and len(rest) >= 2:
                return self._repo_api(method, REPO_TYPES[rest[0]], rest[1:], query, body, user, can_write)
        else:
            repo_type = "model"
            if parts and parts[0] in ("datasets", "spaces"):
                repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
            for i in (1, 2):
                if len(parts) >= i + 3 and parts[i] == "resolve" and method in ("GET", "HEAD"):
                    repo = self._get_repo(repo_type, "/".join(unquote(p) for p in parts[:i]), user)
                    rev, filename = unquote(parts[i + 1]), unquote("/".join(parts[i + 2 :]))
                    return self._resolve_file(h, repo, rev, filename)
        with self._lock:
            self.unhandled.append((method, path))
        raise HubError(404, f"LocalHub does not implement {method} {path}")

    # ------------------------------------------------------------------ auth

    def _auth(self, h: _Handler) -> tuple[str | None, bool]:
        header = h.headers.get("Authorization")
        if header is None:
            return None, False
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if token in self.write_tokens:
            return self.write_tokens[token], True
        if token in self.read_tokens:
            return self.read_tokens[token], False
        raise HubError(401, "Invalid credentials in Authorization header")

    @staticmethod
    def _writer(user: str | None, can_write: bool) -> str:
        if user is None:
            raise HubError(401, "You must be authenticated to access this resource")
        if not can_write:
            raise HubError(403, "You don't have the rights to write with this token (read-only)")
        return user

    def _whoami(self, user: str, can_write: bool) -> dict:
        role = "write" if can_write else "read"
        return {
            "type": "user",
            "id": hashlib.sha1(user.encode()).hexdigest()[:24],
            "name": user,
            "fullname": user,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": role}},
        }

    # ------------------------------------------------------------------ repos

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and user is None:
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _new_commit(
        self, repo: Repo, parent: str | None, tree: dict[str, str], title: str, message: str, author: str
    ) -> str:
        seed = json.dumps([next(self._ids), parent, sorted(tree.items()), title, message])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, tree, title, message, author, _now())
        return oid

    def _create_repo(self, user: str, payload: dict) -> tuple[int, dict, bytes]:
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        with self._lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:  # create_repo(exist_ok=True) reads "url" from this 409 answer
                url = self._repo_url(existing)
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": url})
            repo = Repo(repo_type, repo_id, payload.get("visibility", "public") == "private", _now())
            tree = {}
            if self.gitattributes:
                self.blobs[git_blob_sha1(GITATTRIBUTES)] = GITATTRIBUTES
                tree[".gitattributes"] = git_blob_sha1(GITATTRIBUTES)
            repo.refs["refs/heads/main"] = self._new_commit(repo, None, tree, "initial commit", "", user)
            self.repos[(repo_type, repo_id)] = repo
        return self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, user: str, payload: dict) -> tuple[int, dict, bytes]:
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        with self._lock:
            if self.repos.pop((payload.get("type") or "model", repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        return 200, {}, b""

    def _resolve(self, repo: Repo, rev: str) -> tuple[str | None, str]:
        """(ref name or None for a commit id, commit oid); RevisionNotFound otherwise."""
        for ref in (rev, f"refs/heads/{rev}"):
            if ref.startswith("refs/") and ref in repo.refs:
                return ref, repo.refs[ref]
        if _SHA1.fullmatch(rev) and rev in repo.commits:
            return None, rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _repo_api(
        self, method: str, repo_type: str, rest: list[str], query: dict, body: bytes, user: str | None, can_write: bool
    ) -> tuple[int, dict, bytes]:
        # "ns/name" unless that repo does not exist and "name" does (or the 2nd part is a keyword).
        two, one = "/".join(unquote(p) for p in rest[:2]), unquote(rest[0])
        known = lambda repo_id: (repo_type, repo_id) in self.repos  # noqa: E731
        if len(rest) >= 2 and (known(two) or (rest[1] not in _SUBPATHS and not known(one))):
            repo_id, sub = two, rest[2:]
        else:
            repo_id, sub = one, rest[1:]
        repo = self._get_repo(repo_type, repo_id, user)
        action = sub[0] if sub else ""
        arg = unquote(sub[1]) if len(sub) > 1 else None

        if method == "GET" and action in ("", "revision"):
            return self._json(self._info(repo, arg or "main"))
        if method == "GET" and action == "refs":
            return self._json(self._refs(repo, bool(query.get("include_prs"))))
        if method == "GET" and action == "tree" and arg is not None:
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            return self._json(self._tree(repo, arg, unquote("/".join(sub[2:])), recursive))
        if method == "GET" and action == "commits" and arg is not None:
            return self._json(self._commit_list(repo, arg))
        if method == "GET" and action == "discussions" and arg is not None:
            return self._json(self._discussion(repo, arg))
        if method == "POST" and action == "preupload" and arg is not None:
            self._writer(user, can_write)
            return self._json(self._preupload(repo, arg, json.loads(body)))
        if method == "POST" and action == "commit" and arg is not None:
            author = self._writer(user, can_write)
            return self._json(self._commit(repo, arg, body, bool(query.get("create_pr")), author))
        if action == "branch" and arg is not None and method in ("POST", "DELETE"):
            self._writer(user, can_write)
            branch = unquote("/".join(sub[1:]))
            return self._branch(repo, branch, method, json.loads(body or b"{}"))
        if method == "POST" and action == "discussions" and arg is None:
            return self._json(self._open_pr(repo, json.loads(body), self._writer(user, can_write)))
        with self._lock:
            self.unhandled.append((method, "/".join(["", "api", repo_type + "s", repo_id, *sub])))
        raise HubError(404, f"LocalHub does not implement {method} .../{action}")

    def _info(self, repo: Repo, rev: str) -> dict:
        with self._lock:
            oid = self._resolve(repo, rev)[1]
            commit = repo.commits[oid]
            return {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "siblings": [{"rfilename": path} for path in sorted(commit.tree)],
            }

    def _refs(self, repo: Repo, include_prs: bool) -> dict:
        with self._lock:

            def refs(prefix: str) -> list[dict]:
                return [
                    {"name": ref[len(prefix) :], "ref": ref, "targetCommit": oid}
                    for ref, oid in sorted(repo.refs.items())
                    if ref.startswith(prefix)
                ]

            out = {"branches": refs("refs/heads/"), "converts": [], "tags": []}
            if include_prs:
                out["pullRequests"] = refs("refs/pr/")
            return out

    def _tree(self, repo: Repo, rev: str, path: str, recursive: bool) -> list[dict]:
        with self._lock:
            tree = repo.commits[self._resolve(repo, rev)[1]].tree
            base = path.strip("/")
            prefix = f"{base}/" if base else ""
            below = {p: oid for p, oid in tree.items() if p.startswith(prefix)}
            if base and not below:
                raise HubError(404, f"{path} does not exist on {rev!r}", "EntryNotFound")
            entries: dict[str, dict] = {}
            for p, oid in below.items():
                parts = p[len(prefix) :].split("/")
                for depth in range(1, len(parts)):
                    d = prefix + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        entries.setdefault(d, {"type": "directory", "path": d, "size": 0})
                if recursive or len(parts) == 1:
                    entries[p] = {"type": "file", "oid": oid, "size": len(self.blobs[oid]), "path": p}
            for d, entry in entries.items():
                if entry["type"] == "directory":
                    content = sorted((p, o) for p, o in tree.items() if p.startswith(d + "/"))
                    entry["oid"] = hashlib.sha1(json.dumps(content).encode()).hexdigest()
            return [entries[k] for k in sorted(entries)]

    def _commit_list(self, repo: Repo, rev: str) -> list[dict]:
        with self._lock:
            out, oid = [], self._resolve(repo, rev)[1]
            while oid is not None:
                c = repo.commits[oid]
                authors = [{"user": c.author}]
                out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date, "authors": authors})
                oid = c.parent
            return out

    def _branch(self, repo: Repo, branch: str, method: str, payload: dict) -> tuple[int, dict, bytes]:
        ref = f"refs/heads/{branch}"
        with self._lock:
            if method == "DELETE":
                if ref not in repo.refs:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.refs[ref]
                return 200, {}, b""
            if ref in repo.refs:
                raise HubError(409, f"Reference already exists: {ref}")
            if not branch or branch.startswith(("refs/", "/")) or ".." in branch:
                raise HubError(400, f"Invalid branch name: {branch}")
            start = self._resolve(repo, payload.get("startingPoint") or "main")[1]
            repo.refs[ref] = start
        return 200, {}, b""

    # ------------------------------------------------------------------ uploads

    def _preupload(self, repo: Repo, rev: str, payload: dict) -> dict:
        with self._lock:
            oid = self._resolve(repo, rev)[1]
            tree = repo.commits[oid].tree
            files = []
            for f in payload.get("files", []):
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in tree:
                    entry["oid"] = tree[f["path"]]
                files.append(entry)
            return {"files": files, "commitOid": oid}

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool, author: str) -> dict:
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from None
        if not items or items[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = items[0]["value"]
        title = header.get("summary") or ""
        if not title:
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        with self._lock:
            ref, head = self._resolve(repo, rev)
            if ref is None:
                raise HubError(400, f"Cannot commit to a commit id ({rev}): use a branch")
            if parent_commit is not None:
                matches = [c for c in repo.commits if c.startswith(parent_commit)]
                if len(matches) != 1:
                    raise HubError(404, f"Invalid rev id: {parent_commit}", "RevisionNotFound")
                if not create_pr and matches[0] != head:
                    raise HubError(412, f"A commit has happened since. Please refresh and try again. ({head})")
                base = matches[0]
            else:
                base = head
            tree = dict(repo.commits[base].tree)
            new_blobs: dict[str, bytes] = {}
            for item in items[1:]:
                key, value = item.get("key"), item.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                    if not path or path.startswith("/") or ".." in path.split("/"):
                        raise HubError(400, f"Invalid path: {path!r}")
                    data = base64.b64decode(value["content"], validate=True)
                    oid = git_blob_sha1(data)
                    new_blobs[oid] = data
                    tree[path] = oid
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    folder = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(folder)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
                elif key == "lfsFile":
                    raise HubError(400, "LocalHub has no LFS storage (preupload always answers 'regular')")
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            # Validated: apply everything at once.
            self.blobs.update(new_blobs)
            message = header.get("description") or ""
            pr_url = None
            if create_pr:
                num = self._next_discussion_num(repo)
                repo.discussions[num] = self._pr_record(repo, num, title, message, author, base_ref=ref)
                pr_url = f"{self._repo_url(repo)}/discussions/{num}"
                ref = f"refs/pr/{num}"
            new = self._new_commit(repo, base, tree, title, message, author)
            repo.refs[ref] = new
        return {
            "success": True,
            "commitOid": new,
            "commitUrl": f"{self._repo_url(repo)}/commit/{new}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        }

    # ------------------------------------------------------------------ pull requests

    @staticmethod
    def _next_discussion_num(repo: Repo) -> int:
        return max(repo.discussions, default=0) + 1

    @staticmethod
    def _pr_record(repo: Repo, num: int, title: str, description: str, author: str, base_ref: str) -> dict:
        return {
            "num": num,
            "title": title,
            "description": description,
            "status": "draft",
            "isPullRequest": True,
            "createdAt": _now(),
            "author": {"name": author},
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "events": [],
            "changes": {"base": base_ref},
            "filesWithConflicts": [],
            "diff": "",
        }

    def _open_pr(self, repo: Repo, payload: dict, author: str) -> dict:
        if not payload.get("pullRequest"):
            raise HubError(400, "LocalHub implements pull requests only, not plain discussions")
        with self._lock:
            num = self._next_discussion_num(repo)
            repo.discussions[num] = self._pr_record(
                repo, num, payload.get("title", ""), payload.get("description", ""), author, "refs/heads/main"
            )
            repo.refs[f"refs/pr/{num}"] = repo.refs["refs/heads/main"]
        return {"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}", "pullRequest": True}

    def _discussion(self, repo: Repo, num: str) -> dict:
        with self._lock:
            record = repo.discussions.get(int(num)) if num.isdigit() else None
            if record is None:
                raise HubError(404, f"Discussion {num} not found")
            return dict(record)

    # ------------------------------------------------------------------ downloads

    def _resolve_file(self, h: _Handler, repo: Repo, rev: str, filename: str) -> tuple[int, dict, bytes]:
        with self._lock:
            oid = self._resolve(repo, rev)[1]
            blob = repo.commits[oid].tree.get(filename)
            data = self.blobs[blob] if blob is not None else None
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        status, payload = 200, data
        match = _RANGE.fullmatch((h.headers.get("Range") or "").strip())
        if match and any(match.groups()):
            start_s, end_s = match.groups()
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else len(data) - 1
            else:
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            end = min(end, len(data) - 1)
            if start > end:
                bad = {"Content-Range": f"bytes */{len(data)}"}
                raise HubError(416, "Requested range not satisfiable", headers=bad)
            status, payload = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        headers["Content-Length"] = str(len(payload))
        return status, headers, payload


# ---------------------------------------------------------------------- client side


def point_client_at(hub: LocalHub, monkeypatch: Any, home: str | os.PathLike[str], *, xet: bool = False) -> None:
    """Point an already-imported ``huggingface_hub`` at ``hub``, with its cache and token file under
    ``home`` and no token, via ``monkeypatch`` (a pytest ``MonkeyPatch``: undone at teardown).

    ``xet=False`` sets ``HF_HUB_DISABLE_XET`` so ``upload_folder`` takes the ``create_commit`` path;
    ``xet=True`` leaves the installed behaviour (the pipelined upload when ``hf_xet`` is installed).
    """
    import huggingface_hub.constants as constants
    from huggingface_hub import close_session, hf_api

    home = Path(home)
    hub_cache = home / "hub"
    settings = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_TOKEN_PATH",
    ):
        monkeypatch.delenv(name, raising=False)
    if xet:
        monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")

    # Values huggingface_hub computed from the environment at import time.
    patched = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": not xet,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    # The module-level HfApi behind huggingface_hub.create_repo / upload_folder / whoami / ...
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    # transformers (5.x) keeps one lazily built HfApi in transformers.utils.hub._hf_api, with the
    # endpoint of the moment it was built: drop it so it is rebuilt against this server.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    # A fresh HTTP client (the shared one may carry proxy settings read before NO_PROXY was set).
    close_session()


def _forget_transformers_api(endpoint: str) -> None:
    # If transformers built its shared HfApi during the test, it points at this (now dead) server.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if getattr(getattr(transformers_hub, "_hf_api", None), "endpoint", None) == endpoint:
        transformers_hub._hf_api = None  # type: ignore[union-attr]


def local_hub_fixture(
    monkeypatch: Any,
    tmp_path: str | os.PathLike[str],
    *,
    xet: bool = False,
    strict: bool = True,
    **hub_kwargs: Any,
) -> Iterator[LocalHub]:
    """Generator for a pytest fixture: a started :class:`LocalHub` with the client pointed at it.

    ``yield from local_hub_fixture(monkeypatch, tmp_path)`` inside a ``@pytest.fixture``.
    ``hub_kwargs`` go to :class:`LocalHub` (e.g. ``tokens={"hf_good": "alice"}``). With ``strict``,
    teardown fails if the client called an endpoint this server does not implement, or if the
    server itself crashed (HTTP 500), so gaps in the fake never pass silently.
    """
    from huggingface_hub import close_session

    hub = LocalHub(**hub_kwargs).start()
    try:
        point_client_at(hub, monkeypatch, Path(tmp_path) / "hf-home", xet=xet)
        yield hub
    finally:
        close_session()
        hub.stop()
        _forget_transformers_api(hub.endpoint)
    if strict:
        assert not hub.server_errors, "LocalHub crashed:\n" + "\n".join(hub.server_errors)
        assert not hub.unhandled, f"The client called endpoints LocalHub does not implement: {hub.unhandled}"


#: The same as a context manager, for use inside a test: ``with local_hub_env(monkeypatch, tmp_path) as hub:``.
local_hub_env = contextlib.contextmanager(local_hub_fixture)
