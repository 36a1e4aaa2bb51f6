"""Webhooks: when a job with a `callback_url` ends, the server POSTs the job to it, signed with HMAC-SHA256 under
the calling API key's secret, and retries with exponential back-off a bounded number of times.

Only http(s) URLs without credentials are accepted; hosts that resolve to private, loopback, link-local or other
non-public addresses are refused (at submission and again before each delivery, which then connects to the address
it checked: a second DNS answer cannot redirect it) unless the allow-list names them. Redirects are not followed.
A receiver verifies `X-Synthgen-Signature: t=<unix>,v1=<hex>` where hex = HMAC-SHA256(secret, f"{t}.{raw body}"),
and may drop repeats by `X-Synthgen-Delivery`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.errors import InvalidInputError

log = logging.getLogger("synthgen.webhooks")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def load_master_secret(configured: str | None, data_dir: Path) -> bytes:
    """The server's webhook master secret: the setting, else a random one kept in `data_dir/webhook.key` (so
    replicas sharing the data directory and restarts sign alike)."""
    if configured:
        return configured.encode()
    path = data_dir / "webhook.key"
    try:
        with path.open("x") as handle:  # created once, readable by this user only
            path.chmod(0o600)
            handle.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    return path.read_text().strip().encode()


def key_secret(master: bytes, owner: str) -> str:
    """The webhook secret of the API key with this fingerprint ("" in open mode)."""
    return hmac.new(master, f"webhook:{owner}".encode(), hashlib.sha256).hexdigest()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class UrlPolicy:
    """Which callback URLs are allowed: http(s), no credentials, and every address the host resolves to public
    unless `allow` (host names, addresses or networks such as 10.0.0.0/8) lists it."""

    def __init__(self, allow: list[str]) -> None:
        self.hosts = {entry.lower() for entry in allow if not _is_network(entry)}
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in allow if _is_network(entry)]

    def check_syntax(self, url: str) -> tuple[str, int]:
        """Host and port of a well-formed callback URL; InvalidInputError says what is wrong."""
        try:
            parts = urlsplit(url)
            parts.hostname  # noqa: B018 (parses the host: a malformed IPv6 literal raises here)
        except ValueError as exc:
            raise InvalidInputError(f"callback_url {url!r} is not a well-formed URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInputError(f"callback_url {url!r} must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise InvalidInputError("callback_url must not carry credentials; verify deliveries by their signature")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InvalidInputError(f"callback_url {url!r} has an invalid port") from None
        return parts.hostname.lower(), port

    def check(self, url: str) -> Address | None:
        """Blocking (resolves the host): InvalidInputError unless `url` may be called; else the address to connect to
        (None for a host the allow-list names, which is trusted as it resolves)."""
        host, port = self.check_syntax(url)
        if host in self.hosts:
            return None
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except (socket.gaierror, UnicodeError):
            raise InvalidInputError(f"callback_url host {host!r} does not resolve; use a host this server can "
                                    "reach") from None
        refused = sorted(str(address) for address in addresses if not self._allowed(address))
        if refused:
            raise InvalidInputError(f"callback_url host {host!r} resolves to a non-public address ({refused[0]}); "
                                    "an operator may allow it with SYNTHGEN_WEBHOOK_ALLOW_HOSTS")
        return min(addresses, key=lambda address: (address.version, int(address)))

    def _allowed(self, address: Address) -> bool:
        if any(address in network for network in self.networks):
            return True
        return address.is_global and not address.is_multicast


def pinned(url: str, address: Address | None) -> tuple[str, dict[str, str], dict[str, str]]:
    """`url` with its host replaced by the checked `address` (so a second DNS answer cannot redirect the request),
    the Host header, and the TLS server name (SNI and certificate check) to use: (url, headers, httpx extensions)."""
    parts = urlsplit(url)
    if address is None:
        return url, {}, {}
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" and parts.hostname else {}
    return parts._replace(netloc=netloc).geturl(), {"Host": parts.netloc}, extensions


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


class WebhookSender:
    """Delivers signed POSTs in the background: at most `concurrency` at once, `max_pending` waiting (more are
    dropped with a warning), each tried up to `max_attempts` times with back-off doubling from `backoff_s`."""

    def __init__(self, master: bytes, policy: UrlPolicy, max_attempts: int = 5, backoff_s: float = 1.0,
                 timeout_s: float = 10.0, concurrency: int = 4, max_pending: int = 1000) -> None:
        self.master, self.policy = master, policy
        self.max_attempts, self.backoff_s, self.max_pending = max_attempts, backoff_s, max_pending
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False)

    def send(self, url: str, owner: str, event: str, data: dict[str, Any]) -> None:
        if len(self._tasks) >= self.max_pending:
            log.warning("webhook to %s dropped: %d deliveries are pending", url, len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._deliver(url, key_secret(self.master, owner), event, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, secret: str, event: str, data: dict[str, Any]) -> None:
        body = json.dumps({"event": event, "data": data}, sort_keys=True).encode()
        delivery = uuid.uuid4().hex
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(min(self.backoff_s * 2 ** (attempt - 1), 600))
            try:
                target, host, extensions = pinned(url, await asyncio.to_thread(self.policy.check, url))
            except InvalidInputError as exc:
                log.warning("webhook %s not sent: %s", delivery, exc)
                return
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": "synthgen-webhooks",
                       "X-Synthgen-Event": event, "X-Synthgen-Delivery": delivery,
                       "X-Synthgen-Signature": signature(secret, timestamp, body), **host}
            try:
                async with self._slots:
                    response = await self._http.post(target, content=body, headers=headers, extensions=extensions)
            except httpx.HTTPError as exc:
                log.info("webhook %s attempt %d to %s failed: %s", delivery, attempt + 1, url, exc)
                continue
            if response.is_success:
                return
            log.info("webhook %s attempt %d to %s: HTTP %d", delivery, attempt + 1, url, response.status_code)
            if response.status_code < 500 and response.status_code not in (408, 429):
                return  # the receiver refuses it: trying again would not help
        log.warning("webhook %s to %s gave up after %d attempts", delivery, url, self.max_attempts)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()
