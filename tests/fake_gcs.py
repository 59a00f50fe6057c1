"""A Google Cloud Storage server in this process (JSON API, objects in memory), for tests.

A `gs://` workdir meets three clients, and all three talk HTTP to GCS, so pointing
them at one local server (`FakeGcs.environment()`) tests the real code paths:
- gcsfs, etils.epath's backend for gs:// when TensorFlow is absent (metrics,
  config.json, the lock file, Orbax's directories and commit files);
- TensorStore's `gcs` driver, through which Orbax writes and reads the arrays;
- google-cloud-storage, with which Orbax looks up the bucket and tensorboardX
  uploads its event files.

What it serves: buckets (get, create), objects with generations and the
preconditions clients send (ifGenerationMatch / ifGenerationNotMatch, 0 = "must
not exist"), byte ranges, listing (prefix, delimiter, startOffset, endOffset,
pages), media / multipart / resumable uploads, rewrite (copy), move and delete. No
authentication, ACLs, batch requests or object versions.

  python -m tests.fake_gcs   # serves until interrupted; prints the variables to set
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import itertools
import json
import re
import threading
import urllib.parse

try:
  import google_crc32c  # comes with google-cloud-storage
except ImportError:  # clients then see no crc32c, and check none
  google_crc32c = None

_BUCKET = re.compile(r"^/storage/v1/b/([^/]+)$")
_LIST = re.compile(r"^/storage/v1/b/([^/]+)/o/?$")
_REWRITE = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/(?:rewriteTo|copyTo)/b/([^/]+)/o/(.+)$")
_MOVE = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/moveTo/o/(.+)$")
_OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/(.+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o/?$")


class _Error(Exception):

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


class FakeGcs:
  """`with FakeGcs(["bkt"]) as gcs: os.environ.update(gcs.environment())`."""

  def __init__(self, buckets=("bkt",)):
    self.buckets = {b: self._bucket(b) for b in buckets}
    self.objects: dict[tuple[str, str], tuple[bytes, int]] = {}  # -> (data, generation)
    self.user_agents: set[str] = set()  # who called, for tests that check who wrote
    self.errors: list[str] = []  # requests the fake could not read (a test asserts none)
    self._lock = threading.Lock()
    self._generations = itertools.count(1)
    self._uploads: dict[str, dict] = {}
    self._server = _Server(("127.0.0.1", 0), _handler(self))
    self._server.daemon_threads = True
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_address[1]}"

  def environment(self) -> dict[str, str]:
    """What points gcsfs, TensorStore and google-cloud-storage at this server."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GOOGLE_CLOUD_PROJECT": "fake",
            "EPATH_USE_TF": "0"}

  def __enter__(self) -> FakeGcs:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._server.shutdown()
    self._server.server_close()

  def names(self, bucket: str, prefix: str = "") -> list[str]:
    with self._lock:
      return sorted(n for b, n in self.objects if b == bucket and n.startswith(prefix))

  def read(self, bucket: str, name: str) -> bytes:
    return self.objects[(bucket, name)][0]

  # -- objects ---------------------------------------------------------------------

  def _bucket(self, name: str) -> dict:
    return {"kind": "storage#bucket", "name": name, "id": name, "location": "US",
            "storageClass": "STANDARD", "metageneration": "1", "projectNumber": "0",
            "timeCreated": _now(), "updated": _now()}

  def _resource(self, bucket: str, name: str) -> dict:
    data, generation = self.objects[(bucket, name)]
    resource = {"kind": "storage#object", "bucket": bucket, "name": name,
                "id": f"{bucket}/{name}/{generation}", "generation": str(generation),
                "metageneration": "1", "size": str(len(data)),
                "contentType": "application/octet-stream", "storageClass": "STANDARD",
                "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
                "timeCreated": _now(), "updated": _now(),
                "mediaLink": f"{self.url}/download/storage/v1/b/{bucket}/o/"
                             f"{urllib.parse.quote(name, safe='')}?alt=media"}
    if google_crc32c is not None:
      resource["crc32c"] = base64.b64encode(
          google_crc32c.value(data).to_bytes(4, "big")).decode()
    return resource

  def _check(self, bucket: str, name: str, query: dict, *, write: bool) -> int:
    """The object's generation (0: none) after the request's preconditions."""
    if bucket not in self.buckets:
      raise _Error(404, f"no such bucket: {bucket}")
    current = self.objects.get((bucket, name), (b"", 0))[1]
    match, not_match = query.get("ifGenerationMatch"), query.get("ifGenerationNotMatch")
    if match is not None and int(match) != current:
      raise _Error(412, f"{bucket}/{name}: generation {current}, not {match}")
    if not_match is not None and int(not_match) == current:
      raise _Error(412 if write else 304, f"{bucket}/{name}: generation is {current}")
    return current

  def _store(self, bucket: str, name: str, data: bytes, query: dict) -> dict:
    with self._lock:
      self._check(bucket, name, query, write=True)
      self.objects[(bucket, name)] = (bytes(data), next(self._generations))
      return self._resource(bucket, name)

  def _list(self, bucket: str, query: dict) -> dict:
    if bucket not in self.buckets:
      raise _Error(404, f"no such bucket: {bucket}")
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
    start, end = query.get("startOffset", ""), query.get("endOffset")
    after = query.get("pageToken", "")
    limit = int(query.get("maxResults", 1000))
    entries = []  # (sort key, object name or None, prefix or None)
    seen = set()
    with self._lock:
      for name in sorted(n for b, n in self.objects if b == bucket):
        if not name.startswith(prefix) or name < start or (end and name >= end):
          continue
        cut = name.find(delimiter, len(prefix)) if delimiter else -1
        if cut >= 0:
          sub = name[:cut + len(delimiter)]
          if sub not in seen:
            seen.add(sub)
            entries.append((sub, None, sub))
        else:
          entries.append((name, name, None))
      entries = [e for e in entries if e[0] > after][:limit + 1]
      more = len(entries) > limit
      entries = entries[:limit]
      result = {"kind": "storage#objects",
                "items": [self._resource(bucket, n) for _, n, _ in entries if n],
                "prefixes": [p for _, _, p in entries if p]}
    if more:
      result["nextPageToken"] = entries[-1][0]
    return result

  # -- requests ----------------------------------------------------------------------

  def handle(self, method: str, target: str, headers, body: bytes):
    """(status, headers, body) for one request."""
    self.user_agents.add(headers.get("User-Agent", ""))
    split = urllib.parse.urlsplit(target)
    path, query = split.path, dict(urllib.parse.parse_qsl(split.query))
    try:
      if method == "POST" and path == "/storage/v1/b":
        name = json.loads(body)["name"]
        self.buckets.setdefault(name, self._bucket(name))
        return _json(200, self.buckets[name])
      if m := _BUCKET.match(path):
        if m.group(1) not in self.buckets:
          raise _Error(404, f"no such bucket: {m.group(1)}")
        return _json(200, self.buckets[m.group(1)])
      if m := _UPLOAD.match(path):
        return self._upload(method, m.group(1), query, headers, body)
      if m := _LIST.match(path):
        return _json(200, self._list(m.group(1), query))
      if method == "POST" and (m := _REWRITE.match(path)):
        source = (m.group(1), urllib.parse.unquote(m.group(2)))
        if source not in self.objects:
          raise _Error(404, f"no such object: {'/'.join(source)}")
        resource = self._store(m.group(3), urllib.parse.unquote(m.group(4)),
                               self.objects[source][0], query)
        return _json(200, {"kind": "storage#rewriteResponse", "done": True,
                           "totalBytesRewritten": resource["size"],
                           "objectSize": resource["size"], "resource": resource})
      if method == "POST" and (m := _MOVE.match(path)):  # an atomic rename in one bucket
        bucket = m.group(1)
        source, target = (urllib.parse.unquote(m.group(i)) for i in (2, 3))
        with self._lock:
          if (bucket, source) not in self.objects:
            raise _Error(404, f"no such object: {bucket}/{source}")
          self._check(bucket, target, query, write=True)
          data = self.objects.pop((bucket, source))[0]
          self.objects[(bucket, target)] = (data, next(self._generations))
          return _json(200, self._resource(bucket, target))
      if m := _OBJECT.match(path):
        bucket, name = m.group(1), urllib.parse.unquote(m.group(2))
        if method == "DELETE":
          with self._lock:
            if self._check(bucket, name, query, write=True) == 0:
              raise _Error(404, f"no such object: {bucket}/{name}")
            del self.objects[(bucket, name)]
          return 204, {}, b""
        if method in ("GET", "HEAD"):
          media = query.get("alt") == "media" or path.startswith("/download/")
          return self._read(bucket, name, query, headers, media=media)
      raise _Error(400, f"not served by the fake: {method} {path}")
    except (KeyError, ValueError, AttributeError) as e:  # a request the fake misreads
      self.errors.append(f"{method} {target}: {type(e).__name__}: {e}")
      return _json(400, {"error": {"code": 400, "message": self.errors[-1]}})
    except _Error as e:
      if e.code == 304:
        return 304, {}, b""
      return _json(e.code, {"error": {"code": e.code, "message": str(e),
                                      "errors": [{"message": str(e)}]}})

  def _read(self, bucket: str, name: str, query: dict, headers, *, media: bool):
    with self._lock:
      if self._check(bucket, name, query, write=False) == 0:
        raise _Error(404, f"no such object: {bucket}/{name}")
      resource = self._resource(bucket, name)
      data = self.objects[(bucket, name)][0]
    if not media:
      return _json(200, resource)
    out = {"x-goog-generation": resource["generation"], "x-goog-metageneration": "1",
           "x-goog-stored-content-length": str(len(data)),
           "Content-Type": "application/octet-stream"}
    if "crc32c" in resource:
      out["x-goog-hash"] = f"crc32c={resource['crc32c']},md5={resource['md5Hash']}"
    found = re.match(r"bytes=(\d*)-(\d*)$", headers.get("Range", ""))
    if not found or not data:
      return 200, out, data
    first, last = found.groups()
    if not first:  # the last n bytes
      first, last = max(0, len(data) - int(last)), len(data) - 1
    else:
      first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
    if first >= len(data):
      out["Content-Range"] = f"bytes */{len(data)}"
      return 416, out, b""
    out["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
    return 206, out, data[first:last + 1]

  def _upload(self, method: str, bucket: str, query: dict, headers, body: bytes):
    kind = query.get("uploadType", "media")
    if method == "POST" and kind == "media":
      return _json(200, self._store(bucket, query["name"], body, query))
    if method == "POST" and kind == "multipart":
      metadata, data = _multipart(headers.get("Content-Type", ""), body)
      return _json(200, self._store(bucket, metadata.get("name") or query["name"], data,
                                    query))
    if kind == "resumable" and "upload_id" not in query:  # a new session
      name = (json.loads(body) if body.strip() else {}).get("name") or query["name"]
      upload_id = f"u{next(self._generations)}"
      self._uploads[upload_id] = {"bucket": bucket, "name": name, "data": bytearray(),
                                  "query": dict(query)}
      location = (f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
                  f"&upload_id={upload_id}")
      return 200, {"Location": location, "Content-Type": "application/json"}, b"{}"
    if kind == "resumable":  # a chunk of a session (PUT; gcsfs POSTs)
      upload = self._uploads[query["upload_id"]]
      upload["data"] += body
      total = re.search(r"/(\d+|\*)$", headers.get("Content-Range", "bytes */*"))
      if total and total.group(1) != "*" and len(upload["data"]) >= int(total.group(1)):
        del self._uploads[query["upload_id"]]
        return _json(200, self._store(upload["bucket"], upload["name"], upload["data"],
                                      upload["query"]))
      received = {"Range": f"bytes=0-{len(upload['data']) - 1}"} if upload["data"] else {}
      return 308, received, b""
    raise _Error(400, f"upload type {kind!r} by {method} is not served by the fake")


def _multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
  """(metadata, data) of a multipart/related upload."""
  boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
  parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
  payloads = []
  for part in parts[:2]:
    part = part.removeprefix(b"\r\n").removeprefix(b"\n")
    _, _, payload = part.partition(b"\r\n\r\n") if b"\r\n\r\n" in part else \
        part.partition(b"\n\n")
    payloads.append(payload.removesuffix(b"\r\n").removesuffix(b"\n"))
  return json.loads(payloads[0]), payloads[1]


def _json(code: int, value: dict):
  return code, {"Content-Type": "application/json; charset=UTF-8"}, json.dumps(value).encode()


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Server(http.server.ThreadingHTTPServer):

  def handle_error(self, request, client_address):  # a client that hung up: not news
    del request, client_address


def _handler(gcs: FakeGcs):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, 100-continue, as the clients expect

    def _serve(self):
      if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
          body += self.rfile.read(size)
          self.rfile.readline()
        self.rfile.readline()
      else:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
      code, headers, data = gcs.handle(self.command, self.path, self.headers, bytes(body))
      try:
        self.send_response(code)
        for key, value in headers.items():
          self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)
      except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled read)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _serve

    def log_message(self, *args):  # quiet
      del args

  return Handler


if __name__ == "__main__":
  with FakeGcs(["bkt"]) as server:
    print("\n".join(f"export {k}={v}" for k, v in server.environment().items()), flush=True)
    threading.Event().wait()
