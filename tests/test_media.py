"""minicpmv.serve.media: data URIs, local files, the address classifier and hardened http(s) fetches.

Network rule: nothing here connects anywhere but 127.0.0.1. Remote-looking hosts go through a stub resolver, private
ranges are tested by classifying strings, and an autouse guard fails the test on any other connection attempt or any
use of the system resolver.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import PIL.Image
import pytest

from minicpmv.errors import InvalidInputError
from minicpmv.serve import media
from minicpmv.serve.media import MediaError, MediaPolicy, address_refusal_reason, fetch_media, fetch_media_async

LOOPBACK = ("127.0.0.1", "::1")


def _png() -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (4, 3), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


# ---------------------------------------------------------------------------------------------------------------------
# Guards and stubs


@pytest.fixture(autouse=True)
def network_guard(monkeypatch):
    """Record every outgoing connection; anything not to loopback (or any system-resolver use) fails the test."""
    connections: list[tuple[str, int]] = []
    violations: list[str] = []
    real_create_connection = socket.create_connection

    def guarded_create_connection(address, *args, **kwargs):
        connections.append(tuple(address[:2]))
        if address[0] not in LOOPBACK:
            violations.append(f"connection attempt to {address!r}")
            raise AssertionError(f"test tried to connect to {address!r}")
        return real_create_connection(address, *args, **kwargs)

    def forbidden_resolver(host, port):
        violations.append(f"system resolver used for {host!r}")
        raise AssertionError("tests must stub the resolver")

    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setattr(media, "system_resolver", forbidden_resolver)
    yield connections
    assert not violations, violations


class StubResolver:
    def __init__(self, mapping: dict[str, list[str]]):
        self.mapping, self.calls = mapping, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.mapping:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.mapping[host])


# ---------------------------------------------------------------------------------------------------------------------
# A local test server (127.0.0.1 only); every handler is bounded in time and stops when the fixture ends.

STOP = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, n: int, chunked: bool = False) -> None:
        sent = 0
        while sent < n and not STOP.is_set():
            block = b"x" * min(16384, n - sent)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            sent += len(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass  # the client hung up (limit reached, timeout): expected

    def _route(self):
        parts = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(parts.query))
        path = parts.path
        if path == "/image.png":
            self._send(200, PNG, {"Content-Type": "image/png"})
        elif path == "/echo":
            body = "|".join([self.headers.get("Host", ""), self.headers.get("User-Agent", ""),
                             self.headers.get("Accept-Encoding", "")])
            self._send(200, body.encode())
        elif path == "/bytes":
            n, mode = int(q["n"]), q.get("mode", "honest")
            self.send_response(200)
            if mode == "honest":
                self.send_header("Content-Length", str(n))
            elif mode == "short-cl":  # declares fewer bytes than it sends
                self.send_header("Content-Length", "100")
            elif mode == "long-cl":  # declares more bytes than it sends, then hangs up
                self.send_header("Content-Length", str(n))
                n //= 2
            elif mode == "chunked-lying":  # a small Content-Length that Transfer-Encoding overrides
                self.send_header("Content-Length", "10")
                self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self._stream(n, chunked=mode == "chunked-lying")
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(30):  # at most ~3 s, then give up on its own
                if STOP.is_set():
                    break
                self.wfile.write(b"0123456789")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/slow-headers":
            for _ in range(60):  # at most ~3 s
                if STOP.is_set():
                    break
                time.sleep(0.05)
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            if n == 0:
                self._send(200, PNG, {"Content-Type": "image/png"})
            elif "abs" in q:
                port = self.server.server_address[1]
                self._send(302, b"", {"Location": f"http://hop{n}.test:{port}/redirect/{n - 1}?abs=1"})
            else:
                self._send(302, b"", {"Location": f"/redirect/{n - 1}"})
        elif path == "/to":
            self._send(int(q.get("status", "302")), b"", {"Location": q["url"]})
        else:
            self._send(404, b"not found")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def _start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    STOP.set()
    server.shutdown()
    server.server_close()
    thread.join(5)
    STOP.clear()


@pytest.fixture(scope="module")
def server():
    srv = QuietServer(("127.0.0.1", 0), Handler)
    thread = _start(srv)
    try:
        yield srv.server_address[1]
    finally:
        _stop(srv, thread)


def _policy(**kw) -> MediaPolicy:
    kw.setdefault("allow_private", True)
    kw.setdefault("timeout_s", 5.0)
    return MediaPolicy(**kw)


def _resolver(**extra) -> StubResolver:
    return StubResolver({"media.test": ["127.0.0.1"], **{k.replace("_", "."): v for k, v in extra.items()}})


# ---------------------------------------------------------------------------------------------------------------------
# data: URIs


def test_data_uri_base64():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetch_media(uri, MediaPolicy()) == PNG
    wrapped = "data:image/png;base64," + "\n".join(base64.b64encode(PNG).decode()[i:i + 20] for i in range(0, 200, 20))
    assert fetch_media(wrapped + base64.b64encode(PNG).decode()[200:], MediaPolicy()) == PNG
    unpadded = "data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert fetch_media(unpadded, MediaPolicy()) == PNG
    assert fetch_media("data:;BASE64," + base64.b64encode(b"abc").decode(), MediaPolicy()) == b"abc"


def test_data_uri_percent_encoded():
    assert fetch_media("data:text/plain,hello%20world%00%FF", MediaPolicy()) == b"hello world\x00\xff"


def test_data_uri_bad_base64():
    with pytest.raises(MediaError, match="invalid base64") as e:
        fetch_media("data:image/png;base64,abc$def", MediaPolicy())
    assert e.value.code == "bad_data_uri"
    assert isinstance(e.value, InvalidInputError)
    with pytest.raises(MediaError, match="invalid base64"):
        fetch_media("data:image/png;base64,abcde", MediaPolicy())  # 5 chars cannot be base64
    with pytest.raises(MediaError, match="no ','"):
        fetch_media("data:image/png;base64", MediaPolicy())
    with pytest.raises(MediaError, match="empty"):
        fetch_media("data:image/png;base64,", MediaPolicy())


def test_data_uri_size_limit():
    policy = MediaPolicy(max_bytes=1000, max_video_bytes=3000)
    at_limit = "data:image/png;base64," + base64.b64encode(b"\x01" * 1000).decode()
    assert len(fetch_media(at_limit, policy)) == 1000
    over = "data:image/png;base64," + base64.b64encode(b"\x01" * 1001).decode()
    with pytest.raises(MediaError, match="limit is 1000 bytes") as e:
        fetch_media(over, policy)
    assert e.value.code == "too_large"
    assert len(fetch_media(over, policy, "video")) == 1001  # videos have their own limit
    huge = "data:video/mp4;base64," + "A" * 8000
    with pytest.raises(MediaError, match="video size limit is 3000 bytes"):
        fetch_media(huge, policy, "video")
    with pytest.raises(MediaError, match="too large"):
        fetch_media("data:text/plain," + "a" * 1001, policy)
    with pytest.raises(MediaError, match="too large"):
        fetch_media("data:text/plain," + "%41" * 1001, policy)


def test_bad_kind_and_empty_url():
    with pytest.raises(ValueError):
        fetch_media("data:,x", MediaPolicy(), "audio")
    with pytest.raises(MediaError, match="empty"):
        fetch_media("  ", MediaPolicy())


# ---------------------------------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def media_dirs(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a b.png").write_bytes(PNG)
    (allowed / "img.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    return allowed, tmp_path


def test_local_files_inside(media_dirs):
    allowed, _ = media_dirs
    policy = MediaPolicy(allowed_local_path=allowed)
    assert fetch_media(str(allowed / "img.png"), policy) == PNG
    assert fetch_media((allowed / "sub" / "a b.png").as_uri(), policy) == PNG  # percent-encoded space
    assert fetch_media("file://localhost" + str(allowed / "img.png"), policy) == PNG
    assert fetch_media("sub/a b.png", policy) == PNG  # relative paths are relative to the allowed directory
    assert fetch_media(str(allowed / "sub" / ".." / "img.png"), policy) == PNG
    os.symlink(allowed / "img.png", allowed / "link-inside.png")
    assert fetch_media(str(allowed / "link-inside.png"), policy) == PNG


def test_local_files_outside(media_dirs):
    allowed, tmp = media_dirs
    policy = MediaPolicy(allowed_local_path=allowed)
    for path in [
        str(tmp / "secret.png"),
        (tmp / "secret.png").as_uri(),
        str(allowed / ".." / "secret.png"),
        "../secret.png",
        "file://" + str(allowed) + "/../secret.png",
        "/etc/passwd",
        str(tmp / "does-not-exist.png"),  # outside: refused the same way whether or not it exists
    ]:
        with pytest.raises(MediaError, match="outside the allowed media directory") as e:
            fetch_media(path, policy)
        assert e.value.code == "outside_dir", path
    os.symlink(tmp / "secret.png", allowed / "escape.png")
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        fetch_media(str(allowed / "escape.png"), policy)
    os.symlink(tmp, allowed / "escape-dir")
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        fetch_media(str(allowed / "escape-dir" / "secret.png"), policy)
    # a sibling directory whose name merely starts with the allowed one's
    sibling = tmp / "allowed-evil"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="outside"):
        fetch_media(str(sibling / "x.png"), policy)


def test_local_files_errors(media_dirs):
    allowed, _ = media_dirs
    with pytest.raises(MediaError, match="local image files are disabled") as e:
        fetch_media(str(allowed / "img.png"), MediaPolicy())
    assert e.value.code == "local_files_disabled"
    with pytest.raises(MediaError, match="disabled"):
        fetch_media((allowed / "img.png").as_uri(), MediaPolicy(allowed_local_path=None))
    policy = MediaPolicy(allowed_local_path=allowed, max_bytes=10)
    with pytest.raises(MediaError, match="not found") as e:
        fetch_media(str(allowed / "nope.png"), policy)
    assert e.value.code == "not_found"
    with pytest.raises(MediaError, match="not a regular file"):
        fetch_media(str(allowed / "sub"), policy)
    with pytest.raises(MediaError, match="limit is 10 bytes"):
        fetch_media(str(allowed / "img.png"), policy)
    with pytest.raises(MediaError, match="remote host"):
        fetch_media("file://otherhost" + str(allowed / "img.png"), policy)
    no_file = MediaPolicy(allowed_local_path=allowed, allowed_schemes=frozenset({"http", "https", "data"}))
    with pytest.raises(MediaError, match="unsupported"):
        fetch_media(str(allowed / "img.png"), no_file)


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "localhost:80/a"])
def test_unsupported_schemes(url):
    with pytest.raises(MediaError, match="unsupported image URL scheme") as e:
        fetch_media(url, MediaPolicy())
    assert e.value.code == "unsupported_scheme"


# ---------------------------------------------------------------------------------------------------------------------
# Address classification (strings only: none of these is ever connected to)

REFUSED = [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1", "127.0.0.1", "127.1.2.3",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250",
    "233.252.0.1", "240.0.0.1", "255.255.255.255", "192.0.0.8", "192.0.2.1", "198.18.0.1", "198.51.100.7",
    "203.0.113.9", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:0:10.0.0.1", "64:ff9b::a00:1",
    "64:ff9b::7f00:1", "64:ff9b:1::1", "2002:a00:1::1", "2002:7f00:1::", "2001:db8::1", "2001::1", "::10.0.0.1",
    "::8.8.8.8", "100::1", "5f00::1", "not-an-ip", "",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.32.0.1", "172.15.255.255", "100.128.0.1", "192.169.0.1",
    "2606:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
]


@pytest.mark.parametrize("ip", REFUSED)
def test_classifier_refuses(ip):
    assert address_refusal_reason(ip) is not None
    assert not media.is_public_address(ip)


@pytest.mark.parametrize("ip", PUBLIC)
def test_classifier_allows(ip):
    assert address_refusal_reason(ip) is None
    assert media.is_public_address(ip)


def test_classifier_reasons():
    assert "carrier-grade NAT" in address_refusal_reason("100.64.0.1")
    assert "loopback" in address_refusal_reason("::ffff:127.0.0.1")
    assert "NAT64" in address_refusal_reason("64:ff9b::a00:1")
    assert "link-local" in address_refusal_reason("169.254.169.254")


# ---------------------------------------------------------------------------------------------------------------------
# http(s): refusals that must happen before any connection


def test_private_resolution_refused_without_connecting(network_guard):
    resolver = StubResolver({"images.example.com": ["10.0.0.5"]})
    with pytest.raises(MediaError) as e:
        fetch_media("http://images.example.com/cat.png", MediaPolicy(), resolver=resolver)
    assert e.value.code == "private_address"
    assert "images.example.com" in str(e.value) and "10.0.0.5" in str(e.value)
    assert resolver.calls == ["images.example.com"]
    assert network_guard == []


def test_any_private_address_refuses(network_guard):
    # one public and one private answer (a classic rebinding setup): refused, nothing connected
    resolver = StubResolver({"mixed.example.com": ["8.8.8.8", "192.168.0.10"]})
    with pytest.raises(MediaError, match="192.168.0.10"):
        fetch_media("https://mixed.example.com/a.png", MediaPolicy(), resolver=resolver)
    assert network_guard == []


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5/a.png", "http://127.0.0.1:1/a.png", "http://[::1]/a", "http://[::ffff:127.0.0.1]/",
            "https://169.254.169.254/latest/meta-data/", "http://[fe80::1%25eth0]/"]
)
def test_private_literal_refused_without_resolving(url, network_guard):
    resolver = StubResolver({})
    with pytest.raises(MediaError, match="not a public address") as e:
        fetch_media(url, MediaPolicy(), resolver=resolver)
    assert e.value.code == "private_address"
    assert resolver.calls == [] and network_guard == []


def test_resolution_failure_and_bad_urls(network_guard):
    with pytest.raises(MediaError, match="cannot resolve host 'nowhere.test'") as e:
        fetch_media("http://nowhere.test/a.png", MediaPolicy(), resolver=StubResolver({}))
    assert e.value.code == "resolve_failed"
    with pytest.raises(MediaError, match="credentials"):
        fetch_media("http://user:pw@media.test/a.png", MediaPolicy(), resolver=_resolver())
    with pytest.raises(MediaError, match="no host"):
        fetch_media("http:///a.png", MediaPolicy(), resolver=_resolver())
    with pytest.raises(MediaError, match="malformed"):
        fetch_media("http://media.test:99999/a.png", MediaPolicy(), resolver=_resolver())
    assert network_guard == []


# ---------------------------------------------------------------------------------------------------------------------
# http: real fetches against the local server only


def test_fetch_image(server, network_guard):
    resolver = _resolver()
    assert fetch_media(f"http://media.test:{server}/image.png", _policy(), resolver=resolver) == PNG
    assert resolver.calls == ["media.test"]
    assert network_guard == [("127.0.0.1", server)]  # the vetted address, not the host name
    assert fetch_media(f"http://127.0.0.1:{server}/image.png", _policy()) == PNG  # IP literal: no resolver needed


def test_host_header_and_user_agent(server):
    body = fetch_media(f"http://media.test:{server}/echo", _policy(), resolver=_resolver()).decode()
    host, agent, encoding = body.split("|")
    assert host == f"media.test:{server}"
    assert agent.startswith("minicpmv/")
    assert encoding == "identity"


def test_async_wrapper(server):
    data = asyncio.run(fetch_media_async(f"http://media.test:{server}/image.png", _policy(), "image", _resolver()))
    assert data == PNG
    with pytest.raises(MediaError):
        asyncio.run(fetch_media_async("data:;base64,@@", _policy()))


@pytest.mark.parametrize("mode", ["honest", "none", "chunked-lying"])
def test_body_over_limit(server, mode):
    policy = _policy(max_bytes=1000)
    ok = fetch_media(f"http://media.test:{server}/bytes?n=1000&mode={mode}", policy, resolver=_resolver())
    assert ok == b"x" * 1000
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="limit is 1000 bytes") as e:
        fetch_media(f"http://media.test:{server}/bytes?n=5000000&mode={mode}", policy, resolver=_resolver())
    assert e.value.code == "too_large"
    assert time.monotonic() - t0 < 2  # stopped early, did not download 5 MB slowly


def test_content_length_mismatch(server):
    policy = _policy(max_bytes=1000)
    # a Content-Length smaller than what is sent: only the declared bytes are read
    url = f"http://media.test:{server}/bytes?n=5000&mode=short-cl"
    assert fetch_media(url, policy, resolver=_resolver()) == b"x" * 100
    # a Content-Length larger than what is sent: a truncated body is an error, not silently short data
    with pytest.raises(MediaError, match="before the whole body"):
        fetch_media(f"http://media.test:{server}/bytes?n=800&mode=long-cl", policy, resolver=_resolver())


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_timeout(server, path):
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="timed out after 0.6 s") as e:
        fetch_media(f"http://media.test:{server}{path}", _policy(timeout_s=0.6), resolver=_resolver())
    elapsed = time.monotonic() - t0
    assert e.value.code == "timeout"
    assert 0.5 <= elapsed < 1.5, elapsed


def test_redirects(server, network_guard):
    policy = _policy(max_redirects=3)
    assert fetch_media(f"http://media.test:{server}/redirect/3", policy, resolver=_resolver()) == PNG
    resolver = _resolver(hop3_test=["127.0.0.1"], hop2_test=["127.0.0.1"], hop1_test=["127.0.0.1"])
    assert fetch_media(f"http://media.test:{server}/redirect/3?abs=1", policy, resolver=resolver) == PNG
    assert resolver.calls == ["media.test", "hop3.test", "hop2.test", "hop1.test"]  # every hop resolved and vetted
    with pytest.raises(MediaError, match=r"too many redirects .*limit is 3") as e:
        fetch_media(f"http://media.test:{server}/redirect/4", policy, resolver=_resolver())
    assert e.value.code == "too_many_redirects"
    with pytest.raises(MediaError, match="too many redirects"):
        fetch_media(f"http://media.test:{server}/redirect/1", _policy(max_redirects=0), resolver=_resolver())
    assert all(c == ("127.0.0.1", server) for c in network_guard)


def test_redirect_to_private_refused(server, network_guard, monkeypatch):
    # Pretend 127.0.0.1 is public so the first hop is allowed with allow_private=False; the redirect target
    # resolves to 10.0.0.5 and must be refused before any connection to it.
    real = media.address_refusal_reason
    monkeypatch.setattr(media, "address_refusal_reason", lambda ip: None if ip == "127.0.0.1" else real(ip))
    resolver = _resolver(internal_test=["10.0.0.5"])
    policy = _policy(allow_private=False)
    target = urllib.parse.quote("http://internal.test/secret", safe="")
    with pytest.raises(MediaError, match="10.0.0.5") as e:
        fetch_media(f"http://media.test:{server}/to?url={target}", policy, resolver=resolver)
    assert e.value.code == "private_address" and "internal.test" in str(e.value)
    assert resolver.calls == ["media.test", "internal.test"]
    assert network_guard == [("127.0.0.1", server)]
    target = urllib.parse.quote("http://[::ffff:a00:5]:8080/", safe="")
    with pytest.raises(MediaError, match="not a public address"):
        fetch_media(f"http://media.test:{server}/to?url={target}&status=307", policy, resolver=resolver)
    assert network_guard == [("127.0.0.1", server)] * 2


def test_redirect_to_other_scheme_refused(server, tmp_path):
    policy = _policy(allowed_local_path=tmp_path)
    (tmp_path / "x.png").write_bytes(PNG)
    for target in [(tmp_path / "x.png").as_uri(), "data:image/png;base64,AAAA", "ftp://media.test/x"]:
        url = f"http://media.test:{server}/to?url={urllib.parse.quote(target, safe='')}"
        with pytest.raises(MediaError, match="refusing a redirect") as e:
            fetch_media(url, policy, resolver=_resolver())
        assert e.value.code == "unsupported_scheme"


def test_http_error_status(server):
    with pytest.raises(MediaError, match="HTTP 404") as e:
        fetch_media(f"http://media.test:{server}/missing.png", _policy(), resolver=_resolver())
    assert e.value.code == "http_status"
    with pytest.raises(MediaError, match="connect"):
        # a closed port on loopback: connection refused, reported clearly
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        fetch_media(f"http://media.test:{port}/x", _policy(), resolver=_resolver())


# ---------------------------------------------------------------------------------------------------------------------
# https against a local server with a throwaway certificate: SNI and hostname checks use the URL's host name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=media.test",
         "-addext", "subjectAltName=DNS:media.test"],
        check=True, capture_output=True, timeout=30,
    )
    sni: list[str | None] = []
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.sni_callback = lambda sslsock, name, ctx: sni.append(name)
    srv = QuietServer(("127.0.0.1", 0), Handler)
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    thread = _start(srv)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    try:
        yield srv.server_address[1], client_ctx, sni
    finally:
        _stop(srv, thread)


def test_https_sni_and_hostname(tls_server, network_guard):
    port, ctx, sni = tls_server
    body = fetch_media(f"https://media.test:{port}/echo", _policy(ssl_context=ctx), resolver=_resolver()).decode()
    assert body.split("|")[0] == f"media.test:{port}"
    assert sni[-1] == "media.test"
    assert network_guard == [("127.0.0.1", port)]
    with pytest.raises(MediaError, match="TLS certificate check failed") as e:
        fetch_media(f"https://other.test:{port}/echo", _policy(ssl_context=ctx),
                    resolver=StubResolver({"other.test": ["127.0.0.1"]}))
    assert e.value.code == "tls"
