""" A stand-in for Google Drive's download endpoint on 127.0.0.1, for the tests of ``timm-san download``

``GET /uc?id=FILE_ID`` answers with the file's bytes (``Content-Disposition: attachment``, as Drive does), with an
error status set for that id, or with a body cut short of the length its headers announce. Every request is
counted by file id, so a test can tell whether a file was downloaded again. ``url_template`` is what
``TIMM_SAN_DRIVE_URL`` is set to.
"""
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Set
from urllib.parse import parse_qs, urlsplit


class DriveStandIn:
    """``with DriveStandIn() as drive:`` serves ``drive.files`` (id -> bytes) on a free port of 127.0.0.1."""

    def __init__(self):
        self.files: Dict[str, bytes] = {}
        self.status: Dict[str, int] = {}  # id -> error status to answer instead of the file
        self.cut: Set[str] = set()  # ids whose body stops halfway while the headers announce it whole
        self.requests: Counter = Counter()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url_template(self) -> str:
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}/uc?id={{id}}&export=download'

    def __enter__(self) -> 'DriveStandIn':
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(drive: DriveStandIn):

    class Handler(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes, headers: Dict[str, str], length: Optional[int] = None) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(body) if length is None else length))
            if length is not None:
                self.send_header('Connection', 'close')
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            if length is not None:
                self.close_connection = True

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            file_id = parse_qs(parts.query).get('id', [''])[0]
            drive.requests[file_id] += 1
            if parts.path != '/uc' or file_id not in drive.files:
                return self._send(404, b'<html>Not Found</html>', {'Content-Type': 'text/html'})
            if file_id in drive.status:
                status = drive.status[file_id]
                return self._send(status, f'<html>Error {status}</html>'.encode(), {'Content-Type': 'text/html'})
            data = drive.files[file_id]
            headers = {'Content-Type': 'application/octet-stream',
                       'Content-Disposition': 'attachment; filename="model_best.pth"'}
            if file_id in drive.cut:
                return self._send(200, data[:len(data) // 2], headers, length=len(data))
            self._send(200, data, headers)

    return Handler
