"""A small fake of the Hugging Face hub endpoints that ``HfApi.create_repo`` and ``HfApi.upload_folder`` call
(huggingface_hub 2.x), on 127.0.0.1, for testing uploads offline. Point a process at it with HF_ENDPOINT.

Routes, as the library calls them (huggingface_hub/hf_api.py, _commit_api.py, lfs.py, _upload_pipeline.py):

- ``POST /api/validate-yaml``: ``{"content", "repoType"}`` of README.md, parsed with ``ModelCard`` -> errors
- ``POST /api/repos/create``: JSON ``{"name", "organization", "visibility", "type"}`` -> ``{"url"}``
- ``POST /api/models/{repo}/preupload/{rev}``: ``{"files": [{"path", "sample", "size"}]}`` -> each file's
  ``uploadMode`` ("lfs" for *.safetensors and *.bin unless ``all_regular``, else "regular")
- ``POST /{repo}.git/info/lfs/objects/batch``: git-lfs batch API -> a basic-transfer ``upload`` href here
- ``PUT /lfs-upload/{oid}``: the file's bytes (their sha256 is checked against the oid)
- ``POST /api/models/{repo}/commit/{rev}``: ndjson (a header line, then ``file`` with base64 content or
  ``lfsFile`` with its oid) -> ``{"commitUrl", "commitOid"}``

With hf_xet installed (the default), LFS files would go through the Xet storage protocol, which this fake does not
speak: run the client with HF_HUB_DISABLE_XET=1 to exercise the LFS path, or use ``all_regular``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Hub:
    token: str = "hf_test_token"
    user: str = "alice"
    all_regular: bool = False
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> {"private", "files": {path: bytes}}
    requests: list[tuple[str, str]] = field(default_factory=list)
    lfs: dict[str, bytes] = field(default_factory=dict)  # oid -> uploaded bytes
    creates: list[dict[str, Any]] = field(default_factory=list)
    commits: list[list[dict[str, Any]]] = field(default_factory=list)
    validated: list[dict[str, Any]] = field(default_factory=list)  # README.md contents sent to /api/validate-yaml
    url: str = ""

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id]["files"]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._send(401, {"error": "Invalid credentials in Authorization header"},
                       {"X-Error-Message": "Invalid credentials in Authorization header"})
            return False

        def do_PUT(self) -> None:
            hub.requests.append(("PUT", self.path))
            body = self._body()
            if self.path.startswith("/lfs-upload/"):
                oid = self.path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    self._send(400, {"error": "sha256 mismatch"})
                    return
                hub.lfs[oid] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send(404, {"error": f"no route PUT {self.path}"})

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            self._body()
            self._send(404, {"error": f"no route GET {self.path}"})

        def do_POST(self) -> None:
            hub.requests.append(("POST", self.path))
            body = self._body()
            path = self.path.split("?", 1)[0]
            if path.endswith(".git/info/lfs/objects/batch"):
                if not self._authorized():
                    return
                req = json.loads(body)
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                           for o in req["objects"]]
                self._send(200, {"transfer": "basic", "objects": objects})
                return
            if not self._authorized():
                return
            if path == "/api/validate-yaml":  # create_commit validates README.md's metadata first
                req = json.loads(body)
                hub.validated.append(req)
                try:
                    from huggingface_hub import ModelCard

                    ModelCard(req["content"], ignore_metadata_errors=False)
                except Exception as exc:
                    self._send(400, {"errors": [{"message": str(exc)}]})
                    return
                self._send(200, {"errors": [], "warnings": []})
                return
            if path == "/api/repos/create":
                req = json.loads(body)
                hub.creates.append(req)
                repo_id = f"{req.get('organization') or hub.user}/{req['name']}"
                if repo_id in hub.repos:
                    self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                               {"X-Error-Message": "You already created this model repo"})
                    return
                hub.repos[repo_id] = {"private": req.get("visibility") == "private", "files": {}}
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                return
            parts = path.split("/")
            # /api/models/{ns}/{name}/{preupload|commit}/{rev}
            if len(parts) == 7 and parts[1:3] == ["api", "models"] and parts[5] in ("preupload", "commit"):
                repo_id = f"{parts[3]}/{parts[4]}"
                if repo_id not in hub.repos:
                    self._send(404, {"error": "Repository not found"},
                               {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
                    return
                if parts[5] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "shouldIgnore": False,
                              "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".bin"))
                              and not hub.all_regular else "regular"} for f in files]
                    self._send(200, {"files": modes})
                    return
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                hub.commits.append(lines)
                store = hub.repos[repo_id]["files"]
                for item in lines:
                    value = item["value"]
                    if item["key"] == "file":
                        store[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                            return
                        store[value["path"]] = hub.lfs[value["oid"]]
                oid = hashlib.sha1(body).hexdigest()
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                 "success": True})
                return
            self._send(404, {"error": f"no route POST {self.path}"})

    return Handler


class FakeHub:
    """``with FakeHub() as hub:`` serves on 127.0.0.1 (a free port) until the block ends; ``hub.url``."""

    def __init__(self, **kwargs: Any):
        self.hub = Hub(**kwargs)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
