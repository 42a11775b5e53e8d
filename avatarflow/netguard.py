"""The network guard: every fetch of user media and calendars over http(s) goes through here.

- http(s) only (plain http only when the policy allows it, or to an allowed host);
- the host is resolved and EVERY address checked: loopback, private, link-local, CGNAT,
  multicast, unspecified, reserved and the cloud metadata address are refused (IPv4-mapped,
  NAT64, 6to4 and Teredo IPv6 forms included); a host that resolves to any refused address is
  refused;
- the connection goes to the address that was checked (no second resolution: the URL's host is
  replaced by the IP, the Host header and the TLS SNI/certificate check keep the name);
- redirects are followed by hand, at most `max_redirects`, each hop checked again;
- one total deadline for the whole fetch (DNS, connect, every hop, the body), not per read;
- the size cap enforced while streaming.

The exceptions are explicit: `service_hosts` (the local backend's own services on loopback,
exact host:port) and the operator's `allow_hosts`. Refusals are MediaErrors that name the field
and the rule, never what a server answered beyond its HTTP status, nor any OS error text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpx

from avatarflow.media.errors import MediaError, human_size as _size

METADATA_ADDRESSES = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
CHUNK = 64 * 1024
URL_ALLOWED = "an https:// URL of a public host"


@dataclass(frozen=True)
class Guard:
    """What the guard lets through (built from a SourcePolicy)."""

    allow_http: bool = False
    allow_hosts: tuple[str, ...] = ()      # 'host' (any port) or 'host:port', operator-trusted
    service_hosts: tuple[str, ...] = ()    # exact 'host:port' of the local services on loopback
    max_redirects: int = 5
    timeout_s: float = 30.0

    def exempt(self, host: str, port: int) -> bool:
        """True when host:port is an allowed host or a local service (then private and loopback
        addresses are accepted for it)."""
        h = host.lower().rstrip(".")
        hp = f"[{h}]:{port}" if ":" in h else f"{h}:{port}"
        return hp in self.service_hosts or hp in self.allow_hosts or h in self.allow_hosts


def address_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` may not be fetched from (None: a public address)."""
    if ip in METADATA_ADDRESSES:
        return "the cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and (ip in _NAT64 or ip in _NAT64_LOCAL):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_refused(embedded)
            if why:
                return why
        if ip.ipv4_mapped is not None:
            return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (CGNAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


def _fail(field: str, ref: str, problem: str, *, allowed: str | None = URL_ALLOWED,
          transient: bool = False) -> MediaError:
    return MediaError(field, problem, value=_display(ref), allowed=allowed, transient=transient)


def _display(ref: str) -> str:
    """A URL as shown in errors and records: no credentials, query string or fragment (they may
    hold a password or a signature)."""
    try:
        u = httpx.URL(ref)
        shown = str(u.copy_with(query=None, fragment=None, userinfo=b""))
        return shown + ("?..." if u.query else "")
    except Exception:
        head = ref.split("?", 1)[0].split("#", 1)[0]
        scheme, sep, rest = head.partition("://")
        return scheme + sep + rest.rsplit("@", 1)[-1] if sep else head


_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="netguard-dns")


async def _resolve(host: str, port: int, remaining: float) -> list[Any]:
    """Every address `host` resolves to (a literal IP, in any spelling getaddrinfo accepts, as
    itself), within the fetch's remaining time."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_RESOLVER, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    infos = await asyncio.wait_for(fut, timeout=max(remaining, 0.001))
    addrs = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if ip not in addrs:
            addrs.append(ip)
    return addrs


async def _check_hop(url: httpx.URL, ref: str, field: str, guard: Guard, deadline: float) -> Any:
    """The address to connect to for `url`, after the scheme and address checks."""
    if url.scheme not in ("http", "https"):
        raise _fail(field, ref, f"unsupported scheme '{url.scheme}:' (only http(s) is fetched)")
    host = url.host
    if not host:
        raise _fail(field, ref, "has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    exempt = guard.exempt(host, port)
    if url.scheme == "http" and not (guard.allow_http or exempt):
        raise _fail(field, ref, "plain http:// is not allowed (only https://)")
    name = host.lower().rstrip(".")
    if not exempt and (name == "localhost" or name.endswith(".localhost")):
        raise _fail(field, ref, "resolves to a loopback address, which is never fetched")
    try:
        addrs = await _resolve(host, port, deadline - time.monotonic())
    except asyncio.TimeoutError:
        raise _fail(field, ref, "timed out (name resolution)", transient=True) from None
    except (OSError, UnicodeError, ValueError):
        raise _fail(field, ref, "host name does not resolve") from None
    if not addrs:
        raise _fail(field, ref, "host name does not resolve")
    if not exempt:
        for ip in addrs:
            why = address_refused(ip)
            if why:
                raise _fail(field, ref, f"resolves to {why}, which is never fetched")
    return addrs[0]


def _pinned(url: httpx.URL, ip: Any) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The request for `url` sent to `ip`: Host header and TLS SNI keep the name (the
    certificate is checked against the name)."""
    host = url.host
    port = url.port
    netloc_host = f"[{host}]" if ":" in host else host
    headers = {"Host": f"{netloc_host}:{port}" if port else netloc_host, "Accept": "*/*"}
    pinned = url.copy_with(host=str(ip))
    ext: dict[str, Any] = {"sni_hostname": host} if url.scheme == "https" else {}
    return pinned, headers, ext


async def afetch(ref: str, *, field: str, guard: Guard, max_bytes: int) -> bytes:
    """The body at `ref` (an http(s) URL), at most `max_bytes`, within `guard.timeout_s` in total."""
    try:
        return await asyncio.wait_for(_fetch(ref, field, guard, max_bytes), timeout=guard.timeout_s)
    except asyncio.TimeoutError:
        raise _fail(field, ref, f"timed out (the whole fetch may take at most {guard.timeout_s:g} s)",
                    allowed=None, transient=True) from None


async def _fetch(ref: str, field: str, guard: Guard, max_bytes: int) -> bytes:
    deadline = time.monotonic() + guard.timeout_s
    try:
        url = httpx.URL(ref)
    except Exception:
        raise _fail(field, ref, "is not a valid URL") from None
    if url.userinfo:
        raise _fail(field, ref, "credentials in the URL are not allowed")
    timeout = httpx.Timeout(guard.timeout_s)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for hop in range(guard.max_redirects + 1):
            ip = await _check_hop(url, ref, field, guard, deadline)
            pinned, headers, ext = _pinned(url, ip)
            request = client.build_request("GET", pinned, headers=headers, extensions=ext)
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise _fail(field, ref, "timed out", allowed=None, transient=True) from None
            except httpx.HTTPError:
                raise _fail(field, ref, "could not be fetched (connection failed)", allowed=None,
                            transient=True) from None
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    if not location:
                        raise _fail(field, ref, f"redirect (HTTP {response.status_code}) without a location",
                                    allowed=None)
                    if hop >= guard.max_redirects:
                        raise _fail(field, ref, f"too many redirects (more than {guard.max_redirects})",
                                    allowed=None)
                    try:
                        url = url.join(location)
                    except Exception:
                        raise _fail(field, ref, "redirect to an invalid URL", allowed=None) from None
                    continue
                code = response.status_code
                if code in (404, 410):
                    raise _fail(field, ref, f"not found (HTTP {code})", allowed=None)
                if code >= 400 or code < 200:
                    transient = code >= 500 or code in (408, 429)
                    raise _fail(field, ref, f"could not be fetched (HTTP {code})", allowed=None,
                                transient=transient)
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > max_bytes:
                    raise _fail(field, ref, f"is too large ({_size(int(length))})",
                                allowed=f"at most {_size(max_bytes)}")
                buf = bytearray()
                try:
                    async for chunk in response.aiter_raw(CHUNK):
                        buf += chunk
                        if len(buf) > max_bytes:
                            raise _fail(field, ref, "is too large", allowed=f"at most {_size(max_bytes)}")
                except httpx.TimeoutException:
                    raise _fail(field, ref, "timed out", allowed=None, transient=True) from None
                except httpx.HTTPError:
                    raise _fail(field, ref, "could not be fetched (connection broken)", allowed=None,
                                transient=True) from None
                return bytes(buf)
            finally:
                await response.aclose()
    raise _fail(field, ref, "too many redirects", allowed=None)  # pragma: no cover


def fetch(ref: str, *, field: str, guard: Guard, max_bytes: int) -> bytes:
    """`afetch` for sync callers (in a worker thread, or in a thread of its own when this thread
    runs an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(afetch(ref, field=field, guard=guard, max_bytes=max_bytes))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, afetch(ref, field=field, guard=guard, max_bytes=max_bytes)).result()
