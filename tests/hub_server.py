""" A small Hugging Face Hub look-alike on 127.0.0.1, for tests that must not touch the internet

It serves model repositories from memory over real HTTP, answering the requests huggingface_hub makes, with the
headers and status codes it reads:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1 of plain
  files), ``X-Linked-Etag``/``X-Linked-Size`` (sha256 and size of LFS files), ``Content-Length``, byte ranges;
  ``404`` with ``X-Error-Code: RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``;
* ``GET /api/models/{repo_id}[/revision/{revision}]`` and ``GET /api/models/{repo_id}/tree/{revision}``: repository
  info and file listing with git oids and LFS sha256;
* the upload protocol without Xet (``HF_HUB_DISABLE_XET=1``): ``POST /api/repos/create``,
  ``POST /api/validate-yaml`` (model card metadata), ``POST /api/models/{repo_id}/preupload/{revision}``,
  the LFS batch API with a basic transfer, ``PUT`` of the LFS object, and
  ``POST /api/models/{repo_id}/commit/{revision}`` (NDJSON).

Every request is counted by method and path, so a test can tell whether a file was downloaded again. A file can
be made to fail once in transfer (``cut_once``: the body stops halfway while the headers announce it whole).
"""
import base64
import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = ('.safetensors', '.bin', '.pth')
_RESOLVE = re.compile(r'^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$')
_API_MODEL = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$')
_API_TREE = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$')
_API_PREUPLOAD = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$')
_API_COMMIT = re.compile(r'^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$')
_LFS_BATCH = re.compile(r'^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$')
_LFS_OBJECT = re.compile(r'^/_lfs/(?P<oid>[0-9a-f]{64})$')
_RANGE = re.compile(r'^bytes=(\d+)-(\d*)$')


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives a file's content."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class Repo:
    """One model repository: its files at its single commit (a new commit replaces them)."""

    def __init__(self):
        self.files: Dict[str, bytes] = {}
        self.commit = self._next_commit(b'')

    def _next_commit(self, salt: bytes) -> str:
        state = b''.join(p.encode() + git_blob_sha1(d).encode() for p, d in sorted(self.files.items()))
        return hashlib.sha1(b'commit' + state + salt).hexdigest()

    def set_files(self, files: Dict[str, bytes], message: str = '') -> None:
        self.files.update(files)
        self.commit = self._next_commit(message.encode())

    def tree_entry(self, path: str) -> dict:
        data = self.files[path]
        if not is_lfs(path):
            return {'type': 'file', 'oid': git_blob_sha1(data), 'size': len(data), 'path': path}
        sha256 = hashlib.sha256(data).hexdigest()
        pointer = f'version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n'.encode()
        return {'type': 'file', 'oid': git_blob_sha1(pointer), 'size': len(data), 'path': path,
                'lfs': {'oid': sha256, 'size': len(data), 'pointerSize': len(pointer)}}


class MockHub:
    """The server and its repositories; ``with MockHub() as hub:`` runs it on a free port of 127.0.0.1."""

    def __init__(self, token: Optional[str] = None):
        """
        Args:
            token: Token write requests must carry (``Authorization: Bearer ...``); None accepts any.
        """
        self.token = token
        self.repos: Dict[str, Repo] = {}
        self.requests: Counter = Counter()
        self.cut_once: set = set()  # (repo_id, path) whose next GET body stops halfway
        self.lfs_objects: Dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def add_folder(self, repo_id: str, folder: Path) -> Repo:
        """Serve the files of ``folder`` (not recursive) as repository ``repo_id``."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.set_files({p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}, 'add folder')
        return repo

    def count(self, method: str, repo_id: str, path: str) -> int:
        """Requests made for one file of a repository (any revision)."""
        return sum(n for (m, p), n in self.requests.items()
                   if m == method and p.startswith(f'/{repo_id}/resolve/') and p.endswith(f'/{path}'))

    def __enter__(self) -> 'MockHub':
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(hub: MockHub):

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        # -- helpers --
        def _send(self, status: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
                  head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
            self._send(status, json.dumps(obj).encode(), {'Content-Type': 'application/json', **(headers or {})})

        def _error(self, status: int, code: Optional[str], message: str, head: bool = False,
                   headers: Optional[Dict[str, str]] = None) -> None:
            extra = {'X-Error-Message': message, **(headers or {})}
            if code:
                extra['X-Error-Code'] = code
            body = json.dumps({'error': message}).encode()
            self._send(status, body, {'Content-Type': 'application/json', **extra}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get('Content-Length') or 0))

        def _authorized(self) -> bool:
            if hub.token is None or self.headers.get('authorization') == f'Bearer {hub.token}':
                return True
            self._error(401, None, 'Invalid credentials in Authorization header')
            return False

        def _repo(self, repo_id: str, rev: Optional[str], head: bool = False) -> Optional[Repo]:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, 'RepoNotFound', 'Repository not found', head=head)
                return None
            if rev is not None and unquote(rev) not in ('main', repo.commit):
                self._error(404, 'RevisionNotFound', f'Invalid rev id: {rev}', head=head)
                return None
            return repo

        def _path(self) -> Tuple[str, dict]:
            parts = urlsplit(self.path)
            with hub._lock:
                hub.requests[(self.command, parts.path)] += 1
            return parts.path, parse_qs(parts.query)

        # -- downloads --
        def _resolve(self, head: bool) -> None:
            path, _ = self._path()
            m = _RESOLVE.match(path)
            if not m:
                return self._error(404, None, 'Not found', head=head)
            repo = self._repo(m['repo'], m['rev'], head)
            if repo is None:
                return
            name = unquote(m['path'])
            if name not in repo.files:
                return self._error(404, 'EntryNotFound', f'{name} does not exist on "main"', head=head,
                                   headers={'X-Repo-Commit': repo.commit})
            data = repo.files[name]
            entry = repo.tree_entry(name)
            headers = {'X-Repo-Commit': repo.commit, 'Accept-Ranges': 'bytes',
                       'Content-Type': 'application/octet-stream'}
            if 'lfs' in entry:
                headers.update({'ETag': f'"{entry["lfs"]["oid"]}"', 'X-Linked-Etag': f'"{entry["lfs"]["oid"]}"',
                                'X-Linked-Size': str(len(data))})
            else:
                headers['ETag'] = f'"{entry["oid"]}"'
            start, status = 0, 200
            r = _RANGE.match(self.headers.get('Range', ''))
            if r:
                start, status = int(r.group(1)), 206
                headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
            body = data[start:]
            if head or (m['repo'], name) not in hub.cut_once:
                return self._send(status, body, headers, head=head)
            hub.cut_once.discard((m['repo'], name))
            # announce the whole body, send half of it, then drop the connection
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(body)))
            self.send_header('Connection', 'close')
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True

        def do_HEAD(self) -> None:
            self._resolve(head=True)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            m = _API_TREE.match(path)
            if m:
                self._path()
                repo = self._repo(m['repo'], m['rev'])
                if repo is not None:
                    self._json(200, [repo.tree_entry(p) for p in sorted(repo.files)])
                return
            m = _API_MODEL.match(path)
            if m:
                self._path()
                repo = self._repo(m['repo'], m['rev'])
                if repo is not None:
                    self._json(200, {'id': m['repo'], 'modelId': m['repo'], 'sha': repo.commit, 'private': False,
                                     'siblings': [{'rfilename': p} for p in sorted(repo.files)]})
                return
            self._resolve(head=False)

        # -- uploads --
        def do_POST(self) -> None:
            path, _ = self._path()
            body = self._body()
            if path == '/api/repos/create':
                return self._create(json.loads(body))
            if path == '/api/validate-yaml':
                return self._validate_yaml(json.loads(body)['content'])
            if not self._authorized():
                return
            m = _API_PREUPLOAD.match(path)
            if m:
                repo = self._repo(m['repo'], m['rev'])
                if repo is not None:
                    files = json.loads(body)['files']
                    self._json(200, {'files': [{
                        'path': f['path'], 'uploadMode': 'lfs' if is_lfs(f['path']) else 'regular',
                        'shouldIgnore': False,
                        'oid': repo.tree_entry(f['path'])['oid'] if f['path'] in repo.files else None,
                    } for f in files]})
                return
            m = _LFS_BATCH.match(path)
            if m:
                request = json.loads(body)
                objects = []
                for obj in request['objects']:
                    entry = {'oid': obj['oid'], 'size': obj['size']}
                    if obj['oid'] not in hub.lfs_objects:
                        entry['actions'] = {'upload': {'href': f'{hub.url}/_lfs/{obj["oid"]}'}}
                    objects.append(entry)
                return self._json(200, {'transfer': 'basic', 'objects': objects})
            m = _API_COMMIT.match(path)
            if m:
                repo = self._repo(m['repo'], m['rev'])
                if repo is not None:
                    self._commit(m['repo'], repo, body)
                return
            self._error(404, None, f'No such endpoint: POST {path}')

        def do_PUT(self) -> None:
            path, _ = self._path()
            body = self._body()
            m = _LFS_OBJECT.match(path)
            if not m:
                return self._error(404, None, f'No such endpoint: PUT {path}')
            if hashlib.sha256(body).hexdigest() != m['oid']:
                return self._error(400, None, 'LFS object does not match its oid')
            hub.lfs_objects[m['oid']] = body
            self._send(200)

        def _create(self, request: dict) -> None:
            if not self._authorized():
                return
            repo_id = f'{request["organization"]}/{request["name"]}' if request.get('organization') \
                else request['name']
            if repo_id in hub.repos:
                return self._json(409, {'error': 'You already created this model repo', 'url': f'{hub.url}/{repo_id}'})
            hub.repos[repo_id] = Repo()
            self._json(200, {'url': f'{hub.url}/{repo_id}', 'name': repo_id})

        def _validate_yaml(self, content: str) -> None:
            # the Hub checks a model card's metadata block before the upload; here, that it is a YAML mapping
            match = re.match(r'^---\n(.*?)\n---\n', content, re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as e:
                metadata = str(e)
            if not isinstance(metadata, dict):
                return self._json(400, {'errors': [{'message': f'No valid YAML metadata block: {metadata!r}'}]})
            self._json(200, {'errors': [], 'warnings': []})

        def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
            files, summary = {}, ''
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item['value']
                if item['key'] == 'header':
                    summary = value.get('summary', '')
                elif item['key'] == 'file':
                    files[value['path']] = base64.b64decode(value['content'])
                elif item['key'] == 'lfsFile':
                    if value['oid'] not in hub.lfs_objects:
                        return self._error(400, None, f'LFS object {value["oid"]} was never uploaded')
                    files[value['path']] = hub.lfs_objects[value['oid']]
                else:
                    return self._error(400, None, f'Operation {item["key"]} is not supported by this test server')
            repo.set_files(files, summary)
            self._json(200, {'success': True, 'commitOid': repo.commit,
                             'commitUrl': f'{hub.url}/{repo_id}/commit/{repo.commit}'})

    return Handler
