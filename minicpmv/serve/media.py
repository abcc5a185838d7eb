"""Turn the URL of an OpenAI content part (image_url / video_url) into bytes for the processor.

Supported: ``data:`` URIs (base64 or percent-encoded), local files (``file://`` URLs and plain paths, only under
``MediaPolicy.allowed_local_path``) and ``http(s)://`` URLs. Remote fetches are hardened against SSRF:

* the host is resolved once (with a stubbable resolver) and refused if ANY of its addresses is not public
  (private, loopback, link-local, multicast, reserved, CGNAT, documentation ranges, and IPv6 forms embedding such an
  IPv4 address: IPv4-mapped/-translated, NAT64 64:ff9b::/96, 6to4), unless ``allow_private``;
* the connection goes to the vetted IP address itself (no second resolution, so DNS rebinding cannot swap it), with
  the original host in the Host header and as TLS SNI / certificate hostname;
* the body is streamed and cut off past the byte limit whatever Content-Length says; one total deadline covers
  resolution, connecting, TLS, headers and body of every hop; at most ``max_redirects`` redirects, each re-vetted.

Every failure raises ``MediaError`` (an ``InvalidInputError``, HTTP 400 in the server) whose message names the
problem; ``MediaError.code`` is a short machine-readable reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

from minicpmv.errors import InvalidInputError
from minicpmv.processing.prompt import media_part

MediaKind = Literal["image", "video"]
Resolver = Callable[[str, int], Iterable[str]]

DEFAULT_MAX_IMAGE_BYTES = 50 << 20
DEFAULT_MAX_VIDEO_BYTES = 512 << 20
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_CHUNK = 64 << 10


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        v = version("minicpmv")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        v = "0"
    return f"minicpmv/{v} (media fetcher; +https://github.com/OpenBMB/MiniCPM-V)"


USER_AGENT = _user_agent()


class MediaError(InvalidInputError):
    """A media URL could not be turned into bytes; ``code`` says why (e.g. 'too_large', 'private_address')."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(message)
        self.code = code


@dataclass
class MediaPolicy:
    """What fetch_media may do. The defaults are safe for a server facing untrusted clients."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # limit for images
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES  # limit for videos
    timeout_s: float = 10.0  # total per fetch: DNS + connect + TLS + all redirects + body
    max_redirects: int = 3
    allow_private: bool = False  # allow non-public addresses (loopback, RFC 1918, link-local, ...)
    allowed_local_path: Path | None = None  # file:// and plain paths are served only from under this directory
    allowed_schemes: frozenset[str] = field(default_factory=lambda: frozenset({"http", "https", "data", "file"}))
    user_agent: str = USER_AGENT
    ssl_context: ssl.SSLContext | None = None  # None: ssl.create_default_context() (system CAs, hostname check)

    def limit_for(self, kind: str) -> int:
        if kind == "image":
            return self.max_bytes
        if kind == "video":
            return self.max_video_bytes
        raise ValueError(f"media kind must be 'image' or 'video', got {kind!r}")


# --------------------------------------------------------------------------------------------------------------------
# Address classification

_V4_BLOCKED = [
    (ipaddress.ip_network(n), why)
    for n, why in [
        ("0.0.0.0/8", "'this network' / unspecified"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT shared space (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved / broadcast"),
    ]
]
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_V6_BLOCKED = [
    (ipaddress.ip_network(n), why)
    for n, why in [
        ("::1/128", "loopback"),
        ("::/128", "unspecified"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
        ("2001::/23", "IETF protocol assignments (incl. Teredo)"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
    ]
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated


def _embedded_v4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, "IPv4-mapped"
    if ip in _SIIT:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "IPv4-translated"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "NAT64"
    if ip.sixtofour is not None:
        return ip.sixtofour, "6to4"
    return None


def address_refusal_reason(ip: str) -> str | None:
    """None if ``ip`` is a public unicast address a server may fetch from, else why not (e.g. 'loopback')."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    except ValueError:
        return "not a valid IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = _embedded_v4(addr)
        if embedded is not None:
            v4, form = embedded
            inner = address_refusal_reason(str(v4))
            return None if inner is None else f"{form} IPv6 form of {v4}, which is {inner}"
        for net, why in _V6_BLOCKED:
            if addr in net:
                return why
        if addr not in _V6_GLOBAL_UNICAST:
            return "reserved (outside IPv6 global unicast 2000::/3)"
    else:
        for net, why in _V4_BLOCKED:
            if addr in net:
                return why
    # Belt and braces: whatever this Python's ipaddress tables also know to be special.
    for flag in ("is_loopback", "is_link_local", "is_multicast", "is_unspecified", "is_reserved", "is_private"):
        if getattr(addr, flag):
            return flag[3:].replace("_", "-")
    if getattr(addr, "is_site_local", False):
        return "site-local"
    return None


def is_public_address(ip: str) -> bool:
    return address_refusal_reason(ip) is None


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _short(url: str, n: int = 120) -> str:
    return url if len(url) <= n else url[:n] + "..."


def _mib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 20):.4g} MiB)" if n >= 1 << 20 else f"{n} bytes"


def _too_large(what: str, limit: int, kind: str, size: int | None = None) -> MediaError:
    got = f" ({size} bytes)" if size is not None else ""
    return MediaError(f"{what} is too large{got}: the {kind} size limit is {_mib(limit)}", "too_large")


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (IPv4 and IPv6) from the system resolver, in its preferred order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in out:
            out.append(sockaddr[0])
    return out


class _Deadline:
    def __init__(self, seconds: float, url: str):
        self.seconds, self.url = seconds, url
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def error(self) -> MediaError:
        return MediaError(f"fetching {_short(self.url)} timed out after {self.seconds:g} s", "timeout")


# --------------------------------------------------------------------------------------------------------------------
# data: and local files


def _fetch_data_uri(url: str, limit: int, kind: str) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError("malformed data URI: no ',' separating the header from the data", "bad_data_uri")
    params = [p.strip().lower() for p in header.split(";")]
    if "base64" in params[1:]:
        if "%" in payload:
            payload = urllib.parse.unquote(payload)
        payload = "".join(payload.split())  # line breaks and spaces are tolerated
        if len(payload) // 4 * 3 > limit + 3:
            raise _too_large(f"{kind} data URI", limit, kind)
        payload = payload.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
        if len(payload) % 4:
            payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"{kind} data URI has invalid base64: {e}", "bad_data_uri") from e
    else:
        # percent-decoding shrinks the text at most 3x: refuse clearly oversized payloads before decoding
        if len(payload) > (3 * limit if "%" in payload else limit):
            raise _too_large(f"{kind} data URI", limit, kind)
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise MediaError(f"{kind} data URI is empty", "bad_data_uri")
    if len(data) > limit:
        raise _too_large(f"{kind} data URI", limit, kind, len(data))
    return data


def _local_path_of(url: str, scheme: str) -> str:
    if scheme != "file":
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL {_short(url)} names a remote host; only file:///path is supported", "bad_url")
    if parts.query or parts.fragment:
        raise MediaError(f"file URL {_short(url)} must not have a query or fragment", "bad_url")
    return urllib.request.url2pathname(parts.path)


def _fetch_local(url: str, scheme: str, policy: MediaPolicy, limit: int, kind: str) -> bytes:
    given = _local_path_of(url, scheme)
    if policy.allowed_local_path is None:
        raise MediaError(
            f"local {kind} files are disabled on this server (no allowed media directory is configured): "
            f"{_short(given)}",
            "local_files_disabled",
        )
    if not given or "\x00" in given:
        raise MediaError(f"invalid local {kind} path {_short(given)!r}", "bad_url")
    root = Path(os.path.realpath(policy.allowed_local_path))
    candidate = Path(given) if os.path.isabs(given) else root / given  # relative paths: relative to the root
    target = Path(os.path.realpath(candidate))  # resolves symlinks and '..'
    if target != root and root not in target.parents:
        raise MediaError(f"local {kind} file {_short(given)!r} is outside the allowed media directory", "outside_dir")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError as e:
        raise MediaError(f"local {kind} file not found: {_short(given)!r}", "not_found") from e
    except OSError as e:
        raise MediaError(f"cannot open local {kind} file {_short(given)!r}: {e.strerror}", "not_found") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # directories, FIFOs, devices
            raise MediaError(f"local {kind} path {_short(given)!r} is not a regular file", "not_found")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise _too_large(f"local {kind} file {_short(given)!r}", limit, kind, st.st_size)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _too_large(f"local {kind} file {_short(given)!r}", limit, kind)
    return data


# --------------------------------------------------------------------------------------------------------------------
# http(s)


def _resolve(resolver: Resolver, host: str, port: int, deadline: _Deadline) -> list[str]:
    """Run the resolver in a daemon thread so that a hanging DNS lookup still honours the total deadline."""
    box: dict = {}

    def work() -> None:
        try:
            box["addrs"] = [str(a) for a in resolver(host, port)]
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=work, name="minicpmv-media-resolve", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if thread.is_alive():
        raise deadline.error()
    if "error" in box:
        e = box["error"]
        raise MediaError(f"cannot resolve host {host!r}: {e}", "resolve_failed") from e
    if not box["addrs"]:
        raise MediaError(f"cannot resolve host {host!r}: no addresses", "resolve_failed")
    return box["addrs"]


def _vetted_addresses(host: str, port: int, policy: MediaPolicy, resolver: Resolver, deadline: _Deadline) -> list[str]:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addrs = [host]  # an IP literal: nothing to resolve
    except ValueError:
        addrs = _resolve(resolver, host, port, deadline)
    if not policy.allow_private:
        for a in addrs:
            why = address_refusal_reason(a)
            if why is not None:
                shown = host if host == a else f"{host!r} (resolves to {a})"
                raise MediaError(
                    f"refusing to fetch from {shown}: address {a} is {why}, not a public address", "private_address"
                )
    return addrs


def _split_http_url(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise MediaError(f"malformed URL {_short(url)}: {e}", "bad_url") from e
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        raise MediaError(f"URL {_short(url)} has no host", "bad_url")
    if parts.username is not None or parts.password is not None:
        raise MediaError(f"URLs with credentials (user@host) are not supported: {_short(url)}", "bad_url")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as e:
        raise MediaError(f"invalid host name in {_short(url)}: {e}", "bad_url") from e
    port = port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if any(ord(c) <= 0x20 or c == "\x7f" for c in target):
        raise MediaError(f"URL {_short(url)} contains whitespace or control characters", "bad_url")
    return host, parts.scheme.lower(), port, target


def _connect(addrs: list[str], host: str, port: int, deadline: _Deadline) -> socket.socket:
    errors = []
    for a in addrs:
        try:
            sock = socket.create_connection((a, port), timeout=deadline.remaining())
        except (socket.timeout, TimeoutError):
            raise deadline.error() from None
        except OSError as e:
            errors.append(f"{a}: {e.strerror or e}")
            continue
        return sock
    raise MediaError(f"cannot connect to {host}:{port} ({'; '.join(errors)})", "connect_failed")


class _Watchdog:
    """Shuts the socket down at the deadline, so no slow phase (TLS, headers, trickled body) can outlast it."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.fired = sock, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self.timer.cancel()


def _one_hop(url: str, policy: MediaPolicy, kind: str, resolver: Resolver, deadline: _Deadline, limit: int):
    """GET one URL. Returns ('redirect', location) or ('body', bytes)."""
    host, scheme, port, target = _split_http_url(url)
    addrs = _vetted_addresses(host, port, policy, resolver, deadline)
    sock = _connect(addrs, host, port, deadline)
    watchdog = _Watchdog(sock, deadline.remaining())
    conn = None
    try:
        if scheme == "https":
            context = policy.ssl_context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)  # SNI + certificate checked against the host name
            watchdog.sock = sock
            conn = http.client.HTTPSConnection(host, port, timeout=deadline.remaining(), context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=deadline.remaining())
        conn.sock = sock  # already connected to the vetted address: http.client must not resolve or connect again
        default_port = 443 if scheme == "https" else 80
        host_header = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_header += f":{port}"
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host_header)
        conn.putheader("User-Agent", policy.user_agent)
        conn.putheader("Accept", f"{kind}/*, */*;q=0.8")
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        conn.endheaders()
        resp = conn.getresponse()
        if resp.status in REDIRECT_STATUSES:
            location = resp.getheader("Location")
            if not location:
                raise MediaError(
                    f"HTTP {resp.status} redirect without a Location header from {_short(url)}", "http_status"
                )
            return "redirect", urllib.parse.urljoin(url, location.strip())
        if not 200 <= resp.status < 300:
            raise MediaError(
                f"fetching {_short(url)} failed: HTTP {resp.status} {resp.reason}".rstrip(), "http_status"
            )
        if resp.length is not None and resp.length > limit:  # honest Content-Length: refuse before reading
            raise _too_large(f"{kind} at {_short(url)}", limit, kind, resp.length)
        chunks, total = [], 0
        while True:
            chunk = resp.read1(min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # no / lying Content-Length (or chunked): stop reading past the limit
                raise _too_large(f"{kind} at {_short(url)}", limit, kind)
        if watchdog.fired:  # a close-delimited body cut off by the watchdog looks like a normal end
            raise deadline.error()
        if resp.length:  # the peer hung up before sending all the bytes its Content-Length announced
            raise http.client.IncompleteRead(b"", resp.length)
        if not total:
            raise MediaError(f"{kind} at {_short(url)} is empty", "empty")
        return "body", b"".join(chunks)
    except MediaError:
        if watchdog.fired:
            raise deadline.error() from None
        raise
    except (socket.timeout, TimeoutError):
        raise deadline.error() from None
    except ssl.SSLCertVerificationError as e:
        if watchdog.fired:
            raise deadline.error() from None
        raise MediaError(f"TLS certificate check failed for {host}: {e.verify_message or e}", "tls") from e
    except http.client.IncompleteRead as e:
        if watchdog.fired:
            raise deadline.error() from None
        raise MediaError(f"connection closed before the whole body of {_short(url)} arrived", "protocol_error") from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        if watchdog.fired:
            raise deadline.error() from None
        raise MediaError(f"fetching {_short(url)} failed: {type(e).__name__}: {e}", "protocol_error") from e
    finally:
        watchdog.cancel()
        if conn is not None:
            conn.close()
        try:
            sock.close()
        except OSError:
            pass


def _fetch_http(url: str, policy: MediaPolicy, kind: str, resolver: Resolver, limit: int) -> bytes:
    deadline = _Deadline(policy.timeout_s, url)
    redirects = 0
    while True:
        what, value = _one_hop(url, policy, kind, resolver, deadline, limit)
        if what == "body":
            return value
        redirects += 1
        if redirects > policy.max_redirects:
            raise MediaError(
                f"too many redirects fetching {_short(deadline.url)} (the limit is {policy.max_redirects})",
                "too_many_redirects",
            )
        scheme = urllib.parse.urlsplit(value).scheme.lower()
        if scheme not in ("http", "https") or scheme not in policy.allowed_schemes:
            raise MediaError(
                f"refusing a redirect from {_short(url)} to {scheme or 'a'} URL {_short(value)}", "unsupported_scheme"
            )
        url = value


# --------------------------------------------------------------------------------------------------------------------
# Public API


def _scheme_of(url: str) -> str:
    head, colon, _ = url.partition(":")
    if colon and len(head) > 1 and head[0].isalpha() and all(c.isalnum() or c in "+-." for c in head):
        return head.lower()
    return ""  # a plain path


def fetch_media(url: str, policy: MediaPolicy, kind: MediaKind = "image", resolver: Resolver | None = None) -> bytes:
    """The bytes behind an OpenAI content-part URL (data:, file://, a plain path, http(s)://), per ``policy``.

    Blocking; raises MediaError. ``resolver(host, port) -> addresses`` defaults to the system resolver.
    """
    limit = policy.limit_for(kind)
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"empty {kind} URL", "bad_url")
    url = url.strip()
    scheme = _scheme_of(url)
    effective = scheme or "file"
    if effective not in ("http", "https", "data", "file") or effective not in policy.allowed_schemes:
        shown = f"{scheme}:" if scheme else "local path"
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise MediaError(
            f"unsupported {kind} URL scheme {shown} (allowed: {allowed}): {_short(url)}", "unsupported_scheme"
        )
    if scheme == "data":
        return _fetch_data_uri(url, limit, kind)
    if effective == "file":
        return _fetch_local(url, scheme, policy, limit, kind)
    return _fetch_http(url, policy, kind, resolver or system_resolver, limit)


async def fetch_media_async(
    url: str, policy: MediaPolicy, kind: MediaKind = "image", resolver: Resolver | None = None
) -> bytes:
    """fetch_media in a worker thread, so the event loop is not blocked. Ends within about policy.timeout_s."""
    return await asyncio.to_thread(fetch_media, url, policy, kind, resolver)


async def fetch_message_media(message: dict, policy: MediaPolicy) -> dict:
    """``message`` with each media part's URL fetched under ``policy`` (every spelling the processor reads)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        media = media_part(part)
        if media is not None:
            kind, source = media
            if isinstance(source, str):
                source = await fetch_media_async(source, policy, kind)
            elif not isinstance(source, bytes):
                raise InvalidInputError(f"a {kind} content part needs {{'{kind}_url': {{'url': ...}}}}")
            part = {"type": kind, kind: source}
        parts.append(part)
    return {**message, "content": parts}
