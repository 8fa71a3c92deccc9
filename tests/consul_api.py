"""A stand-in for the Consul agent's HTTP API, for tests.

No Consul binary can be installed on the development and CI machines (the package registries we
reach carry none), so the discovery tests run against this server instead. The compose stack
(``compose/docker-compose.yml``) runs the real Consul; this module exists so that what
``shared/discovery.py`` sends and expects is checked against a faithful model of the documented
API rather than against mocks.

Implemented, as the Consul docs describe them:

* ``PUT /v1/agent/service/register`` (``?replace-existing-checks``): the service definition with
  ``Check`` or ``Checks``. Keys are matched case-insensitively (Go's ``encoding/json`` does) and
  snake_case spellings are accepted. HTTP and TCP checks are run on their ``Interval`` with
  ``Timeout`` (default 10s), after a random initial stagger within the interval, as the agent
  does; a new check starts ``critical`` unless ``Status`` says otherwise. HTTP: any 2xx is
  ``passing``, 429 is ``warning``, anything else or no answer is ``critical``.
  ``SuccessBeforePassing`` and ``FailuresBeforeCritical`` are honoured.
  ``DeregisterCriticalServiceAfter``: a service whose check has been critical for longer than
  that is removed by the reaper.
* ``PUT /v1/agent/service/deregister/<service_id>``: 404 for an unknown id.
* ``GET /v1/agent/services``, ``GET /v1/agent/service/<service_id>``, ``GET /v1/agent/checks``.
* ``GET /v1/health/service/<name>`` with ``passing`` and ``tag`` filters; the node's
  ``serfHealth`` check is part of every entry, as in Consul.

Post Office names (``plan_names=True``): the agent then also checks what the services send
against the one table of service names (``shared/service_names.py``): a registration under
another name, with other tags or with an HTTP check on another path is refused with 400, and
so is a lookup (``/v1/health/service/<name>``) of a name outside the table. A real Consul
takes any name; this check is how the tests see that every service registers, and every
caller looks up, the names the plan gives (``websocket-gateway`` with its tags and its check
on ``/health/websocket-gateway``, realms finding gateways by that name).

Differences, on purpose: blocking queries (``index``/``wait``) answer at once; ``filter``
expressions are refused with 400 rather than ignored; TTL, script, gRPC and alias checks are
refused with 400. Consul's own floors (1s minimum check interval, 1 minute minimum
``DeregisterCriticalServiceAfter``, reaper every 30s) are the defaults and can be lowered by
tests, so a test of "a dead instance disappears" takes milliseconds, not minutes.

Run by hand: ``python -m tests.consul_api --port 8500``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from shared.service_names import SERVICES

__all__ = ["ConsulAgent", "ConsulServer", "parse_duration"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_STATUSES = ("passing", "warning", "critical")
_OUTPUT_LIMIT = 4096  # Consul keeps the first 4k of a check's output


def parse_duration(value: Any, name: str) -> float:
    """A Go duration (``"10s"``, ``"1m30s"``, ``"250ms"``) or nanoseconds, in seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value) * 1e-9
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a duration, got {value!r}")
    text = value.strip()
    if text in ("0", ""):
        return 0.0
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"time: invalid duration {value!r}")
    return sign * total


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _get(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """Case-insensitive, snake_case-tolerant field lookup, as Consul decodes request bodies."""
    wanted = _norm(name)
    for key, value in obj.items():
        if isinstance(key, str) and _norm(key) == wanted:
            return value
    return default


class _BadRequest(Exception):
    pass


@dataclass
class Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    kind: str  # "http" or "tcp"
    target: str
    interval: float
    timeout: float
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    deregister_after: float | None = None
    success_before_passing: int = 0
    failures_before_critical: int = 0
    status: str = "critical"
    output: str = ""
    notes: str = ""
    critical_since: float | None = None
    successes: int = 0
    failures: int = 0
    create_index: int = 0
    modify_index: int = 0
    task: asyncio.Task[None] | None = None

    def as_json(self, node: str) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.kind,
            "Interval": _format_duration(self.interval),
            "Timeout": _format_duration(self.timeout),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Service:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    enable_tag_override: bool
    weights: dict[str, int]
    check_ids: list[str] = field(default_factory=list)
    create_index: int = 0
    modify_index: int = 0

    def as_json(self, datacenter: str) -> dict[str, Any]:
        return {
            "ID": self.service_id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Port": self.port,
            "Address": self.address,
            "TaggedAddresses": {},
            "Weights": dict(self.weights),
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": datacenter,
        }


def _format_duration(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"


class ConsulAgent:
    """One Consul agent's state and HTTP API. All state lives on the event loop serving it."""

    def __init__(
        self,
        *,
        node: str = "po-test-node",
        datacenter: str = "dc1",
        address: str = "127.0.0.1",
        min_interval: float = 1.0,
        min_deregister_after: float = 60.0,
        reap_interval: float = 30.0,
        stagger: bool = True,
        plan_names: bool = False,
    ) -> None:
        self.node = node
        self.node_id = str(uuid.uuid4())
        self.datacenter = datacenter
        self.address = address
        self.min_interval = min_interval
        self.min_deregister_after = min_deregister_after
        self.reap_interval = reap_interval
        self.stagger = stagger
        self.plan_names = plan_names
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.index = 1
        self.check_runs = 0
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- app

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/v1/agent/service/register", self.register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self.deregister)
        app.router.add_get("/v1/agent/services", self.agent_services)
        app.router.add_get("/v1/agent/service/{service_id}", self.agent_service)
        app.router.add_get("/v1/agent/checks", self.agent_checks)
        app.router.add_get("/v1/health/service/{service}", self.health_service)
        app.router.add_get("/v1/status/leader", self.status_leader)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application) -> Any:
        # Consul's HTTP checks do not reuse connections: each check is a fresh request.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        reaper = asyncio.create_task(self._reap_forever(), name="consul-reaper")
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            for check in list(self.checks.values()):
                await self._stop_check(check)
            await self._session.close()

    def _json(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(
            body=orjson.dumps(data),
            status=status,
            content_type="application/json",
            headers={
                "X-Consul-Index": str(self.index),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            },
        )

    @staticmethod
    def _text(text: str, status: int) -> web.Response:
        return web.Response(text=text, status=status)

    def _bump(self) -> int:
        self.index += 1
        return self.index

    # ----------------------------------------------------------- register

    async def register(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return self._text(f"Request decode failed: {exc}", 400)
        if not isinstance(body, dict):
            return self._text("Request decode failed: body is not a JSON object", 400)
        replace_checks = _flag(request.query.get("replace-existing-checks"))
        try:
            service, checks = self._parse_service(body)
            if self.plan_names:
                self._check_plan_names(service, checks)
        except _BadRequest as exc:
            return self._text(str(exc), 400)
        existing = self.services.get(service.service_id)
        index = self._bump()
        service.create_index = existing.create_index if existing else index
        service.modify_index = index
        kept: list[str] = []
        if existing is not None:
            new_ids = {c.check_id for c in checks}
            for check_id in existing.check_ids:
                if check_id in new_ids or replace_checks:
                    old = self.checks.pop(check_id, None)
                    if old is not None:
                        await self._stop_check(old)
                else:
                    kept.append(check_id)
        self.services[service.service_id] = service
        service.check_ids = kept
        for check in checks:
            check.create_index = check.modify_index = index
            if check.status == "critical":
                check.critical_since = time.monotonic()
            self.checks[check.check_id] = check
            service.check_ids.append(check.check_id)
            check.task = asyncio.create_task(self._run_check(check), name=f"check {check.check_id}")
        return web.Response(status=200)

    @staticmethod
    def _check_plan_names(service: Service, checks: list[Check]) -> None:
        """Refuse a registration that does not match ``shared/service_names.py``."""
        entry = SERVICES.get(service.name)
        if entry is None:
            raise _BadRequest(
                f"not a Post Office service name: {service.name!r} (expected one of "
                f"{', '.join(sorted(SERVICES))})"
            )
        if sorted(service.tags) != sorted(entry.tags):
            raise _BadRequest(
                f"{service.name}: tags {service.tags!r}, the plan's are {list(entry.tags)!r}"
            )
        paths = [URL(c.target).path for c in checks if c.kind == "http"]
        if paths != [entry.check_path]:
            raise _BadRequest(
                f"{service.name}: HTTP check path(s) {paths!r}, expected [{entry.check_path!r}]"
            )

    def _parse_service(self, body: dict[str, Any]) -> tuple[Service, list[Check]]:
        name = _get(body, "Name")
        if not name or not isinstance(name, str):
            raise _BadRequest("Missing service name")
        service_id = _get(body, "ID") or name
        port = _get(body, "Port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise _BadRequest(f"Request decode failed: invalid Port {port!r}")
        tags = _get(body, "Tags") or []
        meta = _get(body, "Meta") or {}
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _BadRequest("Request decode failed: Tags must be a list of strings")
        if not isinstance(meta, dict):
            raise _BadRequest("Request decode failed: Meta must be an object")
        weights_in = _get(body, "Weights") or {}
        weights = {
            "Passing": int(_get(weights_in, "Passing", 1)),
            "Warning": int(_get(weights_in, "Warning", 1)),
        }
        service = Service(
            service_id=str(service_id),
            name=name,
            address=str(_get(body, "Address") or ""),
            port=port,
            tags=tags,
            meta={str(k): str(v) for k, v in meta.items()},
            enable_tag_override=bool(_get(body, "EnableTagOverride", False)),
            weights=weights,
        )
        definitions: list[dict[str, Any]] = []
        single = _get(body, "Check")
        if single:
            definitions.append(single)
        many = _get(body, "Checks") or []
        if not isinstance(many, list):
            raise _BadRequest("Request decode failed: Checks must be a list")
        definitions.extend(many)
        checks = []
        for n, definition in enumerate(definitions, start=1):
            if not isinstance(definition, dict):
                raise _BadRequest("Request decode failed: a check must be an object")
            default_id = f"service:{service.service_id}"
            if len(definitions) > 1:
                default_id += f":{n}"
            checks.append(self._parse_check(definition, service, default_id))
        return service, checks

    def _parse_check(self, d: dict[str, Any], service: Service, default_id: str) -> Check:
        try:
            interval = parse_duration(_get(d, "Interval", 0), "Interval")
            timeout = parse_duration(_get(d, "Timeout", 0), "Timeout")
            ttl = parse_duration(_get(d, "TTL", 0), "TTL")
            dereg_raw = _get(d, "DeregisterCriticalServiceAfter")
            deregister = (
                parse_duration(dereg_raw, "DeregisterCriticalServiceAfter") if dereg_raw else None
            )
        except ValueError as exc:
            raise _BadRequest(f"Request decode failed: {exc}") from None
        http, tcp = _get(d, "HTTP"), _get(d, "TCP")
        unsupported = [
            k for k in ("Args", "ScriptArgs", "GRPC", "H2PING", "UDP", "AliasService") if _get(d, k)
        ]
        if interval > 0 and ttl > 0:
            raise _BadRequest("Invalid check: Interval and TTL cannot both be specified")
        if (http or tcp) and interval <= 0:
            raise _BadRequest(
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks"
            )
        if unsupported or ttl > 0 or not (http or tcp):
            raise _BadRequest(
                "this Consul stand-in runs HTTP and TCP checks only (unsupported: "
                f"{', '.join(unsupported) or ('TTL' if ttl > 0 else 'no check type')})"
            )
        status = _get(d, "Status") or "critical"
        if status not in _STATUSES:
            raise _BadRequest("Status for checks must 'passing', 'warning', 'critical'")
        if deregister is not None and deregister > 0:
            deregister = max(deregister, self.min_deregister_after)
        else:
            deregister = None
        header = _get(d, "Header") or {}
        return Check(
            check_id=str(_get(d, "CheckID") or _get(d, "ID") or default_id),
            name=str(_get(d, "Name") or f"Service '{service.name}' check"),
            service_id=service.service_id,
            service_name=service.name,
            service_tags=list(service.tags),
            kind="http" if http else "tcp",
            target=str(http or tcp),
            interval=max(interval, self.min_interval),
            timeout=timeout if timeout > 0 else 10.0,
            method=str(_get(d, "Method") or "GET").upper(),
            header={
                str(k): [str(x) for x in (v if isinstance(v, list) else [v])]
                for k, v in header.items()
            },
            body=str(_get(d, "Body") or ""),
            deregister_after=deregister,
            success_before_passing=int(_get(d, "SuccessBeforePassing", 0) or 0),
            failures_before_critical=int(_get(d, "FailuresBeforeCritical", 0) or 0),
            status=status,
            notes=str(_get(d, "Notes") or ""),
        )

    async def deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        if service_id not in self.services:
            return self._text(
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
                404,
            )
        await self._remove_service(service_id)
        return web.Response(status=200)

    async def _remove_service(self, service_id: str) -> None:
        service = self.services.pop(service_id, None)
        if service is None:
            return
        self._bump()
        for check_id in service.check_ids:
            check = self.checks.pop(check_id, None)
            if check is not None:
                await self._stop_check(check)

    @staticmethod
    async def _stop_check(check: Check) -> None:
        task, check.task = check.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------- checks

    async def _run_check(self, check: Check) -> None:
        if self.stagger:
            await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            status, output = await self._probe(check)
            self.check_runs += 1
            self._update(check, status, output)
            await asyncio.sleep(check.interval)

    async def _probe(self, check: Check) -> tuple[str, str]:
        if check.kind == "tcp":
            host, _, port = check.target.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host.strip("[]"), int(port)), check.timeout
                )
            except (OSError, TimeoutError, ValueError) as exc:
                return "critical", f"dial tcp {check.target}: {exc}"
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return "passing", f"TCP connect {check.target}: Success"
        if self._session is None:
            return "critical", "agent is shutting down"
        headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
        for key, values in check.header.items():
            headers[key] = ", ".join(values)
        try:
            async with self._session.request(
                check.method,
                check.target,
                headers=headers,
                data=check.body.encode() or None,
                timeout=aiohttp.ClientTimeout(total=check.timeout),
                allow_redirects=True,
            ) as resp:
                text = (await resp.content.read(_OUTPUT_LIMIT)).decode(errors="replace")
                line = f"HTTP {check.method} {check.target}: {resp.status} {resp.reason}"
                line += f" Output: {text}"
                if 200 <= resp.status < 300:
                    return "passing", line
                if resp.status == 429:
                    return "warning", line
                return "critical", line
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return "critical", f'Get "{check.target}": {exc!r}'

    def _update(self, check: Check, status: str, output: str) -> None:
        # Consul's StatusHandler: a run of successes (failures) must reach the threshold before
        # the status flips to passing (critical); until then the previous status stands.
        if status == "passing":
            check.successes += 1
            check.failures = 0
            if check.successes <= check.success_before_passing:
                status = check.status
        else:
            check.failures += 1
            check.successes = 0
            if status == "critical" and check.failures <= check.failures_before_critical:
                status = check.status
        check.output = output[:_OUTPUT_LIMIT]
        if status != check.status:
            check.status = status
            check.modify_index = self._bump()
            check.critical_since = time.monotonic() if status == "critical" else None

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.reap()

    async def reap(self) -> list[str]:
        """Deregister services whose check has been critical longer than its
        ``DeregisterCriticalServiceAfter``; returns their ids."""
        now = time.monotonic()
        doomed = {
            c.service_id
            for c in self.checks.values()
            if c.deregister_after is not None
            and c.status == "critical"
            and c.critical_since is not None
            and now - c.critical_since > c.deregister_after
        }
        for service_id in doomed:
            await self._remove_service(service_id)
        return sorted(doomed)

    # -------------------------------------------------------------- reads

    async def agent_services(self, request: web.Request) -> web.Response:
        if "filter" in request.query:
            return self._text("this Consul stand-in does not implement filter expressions", 400)
        return self._json({sid: s.as_json(self.datacenter) for sid, s in self.services.items()})

    async def agent_service(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        service = self.services.get(service_id)
        if service is None:
            return self._text(f"unknown service ID: {service_id}", 404)
        data = service.as_json(self.datacenter)
        data["ContentHash"] = (
            f"{hash((service.service_id, service.modify_index)) & 0xFFFFFFFFFFFFFFFF:016x}"
        )
        return self._json(data)

    async def agent_checks(self, request: web.Request) -> web.Response:
        return self._json({cid: c.as_json(self.node) for cid, c in self.checks.items()})

    async def status_leader(self, request: web.Request) -> web.Response:
        return self._json(f"{self.address}:8300")

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.address, "wan": self.address},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _serf_check(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    async def health_service(self, request: web.Request) -> web.Response:
        if "filter" in request.query:
            return self._text("this Consul stand-in does not implement filter expressions", 400)
        name = request.match_info["service"]
        if self.plan_names and name not in SERVICES:
            return self._text(f"lookup of a name outside the table of service names: {name!r}", 400)
        passing_only = "passing" in request.query and _flag(request.query.get("passing"))
        tags = request.query.getall("tag", [])
        entries = []
        for service in self.services.values():
            if service.name != name or not all(t in service.tags for t in tags):
                continue
            checks = [self._serf_check()] + [
                self.checks[c].as_json(self.node) for c in service.check_ids if c in self.checks
            ]
            if passing_only and any(c["Status"] != "passing" for c in checks):
                continue
            svc = service.as_json(self.datacenter)
            svc.pop("Datacenter")
            svc["CreateIndex"], svc["ModifyIndex"] = service.create_index, service.modify_index
            entries.append({"Node": self._node_json(), "Service": svc, "Checks": checks})
        return self._json(entries)


def _flag(raw: str | None) -> bool:
    """Consul's query flags: present and empty means true, else Go's ParseBool."""
    if raw is None:
        return False
    return raw.strip().lower() in ("", "1", "t", "true")


class ConsulServer:
    """A :class:`ConsulAgent` served on 127.0.0.1 from its own thread and event loop, so a test
    can block (``subprocess``, ``time``) without freezing Consul, and can stop it and start it
    again on the same port to play an outage (a restarted agent has lost every registration,
    as a Consul dev agent does)."""

    def __init__(self, port: int | None = None, **agent_options: Any) -> None:
        self.port = port or _free_port()
        self.agent_options = agent_options
        self.agent: ConsulAgent | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConsulServer:
        if self._thread is not None:
            raise RuntimeError("ConsulServer is already running")
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_site())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._stop_site())
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"consul-{self.port}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    async def _start_site(self) -> None:
        self.agent = ConsulAgent(**self.agent_options)
        self._runner = web.AppRunner(self.agent.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop_site(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        self._loop = None

    def call(self, fn: Any, timeout: float = 10.0) -> Any:
        """Run ``await fn(agent)`` on the server's loop (e.g. ``lambda a: a.reap()``)."""
        if self._loop is None or self.agent is None:
            raise RuntimeError("ConsulServer is not running")
        agent = self.agent
        return asyncio.run_coroutine_threadsafe(fn(agent), self._loop).result(timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Consul agent HTTP API stand-in (see module docstring)"
    )
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--min-interval", type=float, default=1.0)
    parser.add_argument("--reap-interval", type=float, default=30.0)
    args = parser.parse_args()
    agent = ConsulAgent(min_interval=args.min_interval, reap_interval=args.reap_interval)
    web.run_app(agent.make_app(), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
