"""One eviction pass, and the loop that runs a pass every interval.

A pass does three things, each in pages of pipelined Redis work, never a key scan:

1. **Idle connections.** Ids come from the stale end of ``websocket:connections:last_seen``
   (``ZRANGEBYSCORE -inf cutoff LIMIT``), a page at a time. Each page is one pipeline of
   :meth:`shared.registry.Registry.unregister_many` scripts (split over ``concurrency``
   connections). The script is the claim: it re-checks the score, removes the record and its
   index entries, announces ``evicted`` on ``websocket:events`` and tells the holding gateway
   to close the socket with 1008 ``idle`` — all atomically, and only for the one caller that
   removed the record, so several workers can run at once and each eviction happens once.
   Ids without a record only lose their last-seen entry.
2. **Dead gateways.** Members of ``websocket:gateways`` whose liveness key is gone: every
   connection in the instance's set is unregistered (``gateway_lost``, only if the record still
   names that instance, and only while the liveness key is still absent: the script re-checks
   it, so an instance that restarted with the same id keeps its new connections), then the
   instance is forgotten, unless its key came back meanwhile.
3. **Streams.** :mod:`services.eviction_worker.reclaim`: unacked messages past
   ``ACK_TIMEOUT_SECONDS`` are handed to another live consumer of their group, those past
   ``MAX_DELIVERIES`` go to the dead letters, stale consumers are removed and the acked history
   is trimmed. It runs during the recovery grace too: it depends on no gateway's writes.

After a failed pass (Redis unreachable) idle eviction waits ``recovery_grace_seconds`` from the
moment Redis answers again: while Redis was away the gateways could not write last-seen times,
so every connection would look idle until their next flush. The same grace starts when Redis
lost its data (:meth:`Evictor.redis_lost_data`, called by the app's epoch watch): until the
gateways have re-asserted their instance keys, records and last-seen times, every live
connection would look idle or orphaned by a dead gateway.

Evicted ids go to the :class:`~services.eviction_worker.reporter.TrafficCopReporter`, which
tells Traffic Cop in the background so an unreachable Traffic Cop never holds a pass up.

A stop request (SIGTERM) is honoured between pages: the page in flight finishes (its scripts
are atomic anyway), the rest waits for the next worker's pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.eviction_worker import metrics
from services.eviction_worker.reclaim import Reclaimer
from services.eviction_worker.reporter import TrafficCopReporter
from services.eviction_worker.settings import EvictionSettings
from shared.backoff import backoff
from shared.protocol import CloseCode
from shared.registry import Registry, UnregisterResult

__all__ = ["Evictor", "PassSummary"]

log = logging.getLogger(__name__)

IDLE = "idle"
GATEWAY_LOST = "gateway_lost"
#: Below this many ids a page is not split over several connections: the split costs more
#: round trips than it saves.
_MIN_CHUNK = 64


@dataclass
class PassSummary:
    """What one pass did; printed by run-once mode and served on ``/status``."""

    started_at: float
    cutoff: float
    duration_seconds: float = 0.0
    complete: bool = True
    stale_found: int = 0
    evicted: dict[str, int] = field(default_factory=lambda: {IDLE: 0, GATEWAY_LOST: 0})
    still_alive: int = 0
    already_gone: int = 0
    held_elsewhere: int = 0
    gateway_back: int = 0
    idle_deferred: bool = False
    errors: int = 0
    dead_gateways: list[str] = field(default_factory=list)
    reclaimed: dict[str, int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    trimmed: dict[str, int] = field(default_factory=dict)
    consumers_removed: int = 0
    round_trips: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def eventful(self) -> bool:
        return bool(
            sum(self.evicted.values())
            or self.dead_gateways
            or sum(self.reclaimed.values())
            or sum(self.dead_lettered.values())
            or self.consumers_removed
            or self.errors
            or not self.complete
        )


class Evictor:
    """Runs passes against one Redis client. Safe to run in several processes at once."""

    def __init__(
        self,
        redis: Redis,
        *,
        max_idle_seconds: float,
        batch_size: int = 1000,
        pass_limit: int = 100_000,
        concurrency: int = 4,
        channels: Sequence[str] = (),
        ack_timeout_seconds: float = 30.0,
        max_deliveries: int = 5,
        consumer_live_seconds: float = 15.0,
        consumer_stale_seconds: float = 3600.0,
        reclaim_batch: int = 100,
        reclaim_limit: int = 10_000,
        recovery_grace_seconds: float = 15.0,
        reporter: TrafficCopReporter | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.redis = redis
        self.registry = Registry(redis)  # the worker removes records, never writes one
        self.max_idle_seconds = max_idle_seconds
        self.batch_size = batch_size
        self.pass_limit = pass_limit
        self.concurrency = concurrency
        self.channels = tuple(channels)
        self.reclaimer = Reclaimer(
            redis,
            self.channels,
            ack_timeout_seconds=ack_timeout_seconds,
            max_deliveries=max_deliveries,
            consumer_live_seconds=consumer_live_seconds,
            consumer_stale_seconds=consumer_stale_seconds,
            reclaim_batch=reclaim_batch,
            reclaim_limit=reclaim_limit,
        )
        self.recovery_grace_seconds = recovery_grace_seconds
        self.reporter = reporter
        self.stop = stop or asyncio.Event()
        self.last_summary: PassSummary | None = None
        self.last_error: str | None = None
        #: Passes failed in a row (reset by a good one): the exponent of the retry delay.
        self.failures = 0
        # Set by a pass that failed on Redis; the next pass that reaches Redis starts the grace.
        self._recovering = False
        self._idle_paused_until = 0.0

    @classmethod
    def from_settings(
        cls,
        redis: Redis,
        settings: EvictionSettings,
        reporter: TrafficCopReporter | None = None,
        stop: asyncio.Event | None = None,
    ) -> Evictor:
        return cls(
            redis,
            max_idle_seconds=settings.max_idle_seconds,
            batch_size=settings.batch_size,
            pass_limit=settings.pass_limit,
            concurrency=settings.concurrency,
            channels=settings.channels,
            ack_timeout_seconds=settings.ack_timeout_seconds,
            max_deliveries=settings.max_deliveries,
            consumer_live_seconds=settings.consumer_live_seconds,
            consumer_stale_seconds=settings.consumer_stale_seconds,
            reclaim_batch=settings.reclaim_batch,
            reclaim_limit=settings.reclaim_limit,
            recovery_grace_seconds=settings.recovery_grace_seconds,
            reporter=reporter,
            stop=stop,
        )

    # -- the loop ------------------------------------------------------------------------

    def redis_lost_data(self) -> None:
        """Redis lost its data (:mod:`shared.epoch`): the next pass starts the recovery grace,
        as after an outage, so nothing is evicted before the gateways re-assert."""
        self._recovering = True
        log.warning(
            "Redis lost its data: idle and dead-gateway cleanup pause for %.1fs from the next "
            "pass while the gateways re-assert their connections",
            self.recovery_grace_seconds,
        )

    async def run(self, interval: float, error_backoff_cap: float = 5.0) -> None:
        """A pass every ``interval`` seconds until :attr:`stop` is set. A failing pass (Redis
        down) is logged and retried with capped, jittered backoff; nothing here crashes the
        process, and cancellation propagates."""
        cap = max(interval, error_backoff_cap)
        while not self.stop.is_set():
            try:
                await self.run_pass()
            except RedisError as exc:
                self.failures += 1
                self._recovering = True
                self._failed(exc)
                log.warning("pass failed (%d in a row): %r", self.failures, exc)
            except Exception as exc:  # a bug must not end eviction for good: log, retry
                self.failures += 1
                self._failed(exc)
                log.exception("pass failed unexpectedly (%d in a row)", self.failures)
            else:
                self.failures = 0
            delay = backoff(self.failures, interval, cap) if self.failures else interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    def _failed(self, exc: BaseException) -> None:
        metrics.PASS_ERRORS.inc()
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]

    async def run_pass(self, now: float | None = None) -> PassSummary:
        """One pass; raises :class:`redis.exceptions.RedisError` when Redis fails mid-way
        (whatever was done stays done: each step is atomic per connection)."""
        started = time.time() if now is None else now
        clock = time.perf_counter()
        summary = PassSummary(started_at=started, cutoff=started - self.max_idle_seconds)
        with metrics.PASS_DURATION.time():
            if self._recovering:
                # Redis answers again: the gateways get the grace to flush last-seen times
                # they could not write while it was away before anything counts as idle.
                await self.redis.ping()
                summary.round_trips += 1
                self._recovering = False
                self._idle_paused_until = time.monotonic() + self.recovery_grace_seconds
                if self.recovery_grace_seconds > 0:
                    log.info(
                        "redis is back: idle eviction resumes in %.1fs",
                        self.recovery_grace_seconds,
                    )
            if time.monotonic() < self._idle_paused_until:
                # Gateways' liveness keys may have expired while Redis was away, too: cleaning
                # "dead" gateways now would evict every live connection after a Redis blip.
                summary.idle_deferred = True
            else:
                await self._evict_stale(summary)
                await self._clean_dead_gateways(summary)
            await self._streams(summary)
        summary.duration_seconds = round(time.perf_counter() - clock, 6)
        self.last_summary = summary
        self.last_error = None
        metrics.LAST_PASS.set(time.time())
        level = logging.INFO if summary.eventful else logging.DEBUG
        log.log(
            level,
            "pass: %d stale, evicted %r, %d dead gateways, reclaimed %r, dead-lettered %r "
            "in %.3fs (%d round trips)",
            summary.stale_found,
            summary.evicted,
            len(summary.dead_gateways),
            summary.reclaimed,
            summary.dead_lettered,
            summary.duration_seconds,
            summary.round_trips,
        )
        return summary

    # -- step 1: idle connections ---------------------------------------------------------

    async def _evict_stale(self, summary: PassSummary) -> None:
        cutoff = summary.cutoff
        looked = 0
        # Ids whose script failed keep their place at the very front of the stale range (all
        # others of their page left it), so the next page starts after them.
        skip = 0
        while True:
            if looked >= self.pass_limit or self.stop.is_set():
                summary.complete = False
                return
            want = min(self.batch_size, self.pass_limit - looked)
            ids = await self.registry.stale(cutoff, want, offset=skip)
            summary.round_trips += 1
            looked += len(ids)
            summary.stale_found += len(ids)
            metrics.STALE_FOUND.inc(len(ids))
            if ids:
                results = await self._unregister(
                    summary,
                    ids,
                    reason=IDLE,
                    stale_before=cutoff,
                    close_code=int(CloseCode.POLICY_VIOLATION),
                )
                skip += self._tally(summary, ids, results, IDLE)
            if len(ids) < want:
                return

    # -- step 2: dead gateways ------------------------------------------------------------

    async def _clean_dead_gateways(self, summary: PassSummary) -> None:
        members = await self.registry.gateways()
        summary.round_trips += 1
        if not members:
            return
        alive = await self.registry.alive(members)
        summary.round_trips += 1
        budget = self.pass_limit
        for instance, is_alive in zip(members, alive, strict=True):
            if is_alive:
                continue
            if self.stop.is_set() or budget <= 0:
                summary.complete = False
                return
            cursor: int = 0
            while True:
                cursor, ids = await self.registry.gateway_connections(
                    instance, cursor, self.batch_size
                )
                summary.round_trips += 1
                budget -= len(ids)
                back = False
                if ids:
                    results = await self._unregister(
                        summary,
                        ids,
                        reason=GATEWAY_LOST,
                        expected_gateway=instance,
                        unless_gateway_alive=True,
                    )
                    self._tally(summary, ids, results, GATEWAY_LOST)
                    back = UnregisterResult.GATEWAY_BACK in results
                if back:
                    log.info("gateway %s came back while its records were being removed", instance)
                    break
                if cursor == 0:
                    break
                if self.stop.is_set() or budget <= 0:
                    # Not forgotten yet: the next pass picks this instance up again.
                    summary.complete = False
                    return
            forgotten = await self.registry.forget_gateway(instance)
            summary.round_trips += 1
            if forgotten:
                summary.dead_gateways.append(instance)
                metrics.DEAD_GATEWAYS.inc()
                log.info("gateway %s is gone: its records were removed", instance)

    # -- step 3: streams ------------------------------------------------------------------

    async def _streams(self, summary: PassSummary) -> None:
        done = await self.reclaimer.run(stop_requested=self.stop.is_set())
        summary.reclaimed = done.reclaimed
        summary.dead_lettered = done.dead_lettered
        summary.trimmed = done.trimmed
        summary.consumers_removed = done.consumers_removed
        summary.round_trips += done.round_trips

    # -- plumbing -------------------------------------------------------------------------

    async def _unregister(
        self,
        summary: PassSummary,
        ids: list[str],
        *,
        reason: str,
        stale_before: float | None = None,
        expected_gateway: str | None = None,
        close_code: int | None = None,
        unless_gateway_alive: bool = False,
    ) -> list[UnregisterResult | Exception]:
        """The page's scripts, pipelined over up to ``concurrency`` connections at once."""
        parts = max(1, min(self.concurrency, len(ids) // _MIN_CHUNK))
        size = -(-len(ids) // parts)
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        answers = await asyncio.gather(
            *(
                self.registry.unregister_many(
                    chunk,
                    event="evicted",
                    reason=reason,
                    stale_before=stale_before,
                    expected_gateway=expected_gateway,
                    close_code=close_code,
                    unless_gateway_alive=unless_gateway_alive,
                )
                for chunk in chunks
            )
        )
        summary.round_trips += len(chunks)
        return [result for answer in answers for result in answer]

    def _tally(
        self,
        summary: PassSummary,
        ids: list[str],
        results: list[UnregisterResult | Exception],
        reason: str,
    ) -> int:
        """Count the outcomes, hand the evicted ids to the reporter; return the failures."""
        evicted: list[str] = []
        failed = gone = 0
        for cid, result in zip(ids, results, strict=True):
            match result:
                case Exception():
                    failed += 1
                    log.error("could not unregister: %r", result, extra={"connection_id": cid})
                case UnregisterResult.REMOVED:
                    evicted.append(cid)
                case UnregisterResult.NOT_FOUND:
                    gone += 1
                case UnregisterResult.SEEN_SINCE:
                    summary.still_alive += 1
                case UnregisterResult.GATEWAY_BACK:
                    summary.gateway_back += 1
                case UnregisterResult.HELD_ELSEWHERE:
                    summary.held_elsewhere += 1
        summary.errors += failed
        summary.already_gone += gone
        metrics.ALREADY_GONE.inc(gone)
        summary.evicted[reason] += len(evicted)
        if failed:
            metrics.UNREGISTER_ERRORS.inc(failed)
        if evicted:
            metrics.EVICTIONS.labels(reason).inc(len(evicted))
            if log.isEnabledFor(logging.DEBUG):
                for cid in evicted:
                    log.debug("evicted (%s)", reason, extra={"connection_id": cid})
            if self.reporter is not None:
                self.reporter.submit(evicted)
        return failed
