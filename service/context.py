"""What command handlers and web handlers work with: the log, the read models, the ports
of the protocol core over them, and the configuration."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from projections.directory import DirectoryModel
from projections.feed import MemoryFeed
from projections.memory import PolicyModel
from service.adapters import LogLedger, ModelLookups, Observer
from service.domain import streams
from service.domain.grants import Record
from service.errors import Unauthorized
from service.eventlog import ConcurrencyError, EventLog, Metadata
from service.events import Event
from service.metrics import Metrics
from service.oauth import assertions
from service.oauth.introspection import Introspection
from service.oauth.policy import PolicyPoint
from service.oauth.token_endpoint import Limits, TokenEndpoint
from service.settings import Settings
from service.storage.dpop_nonces import DpopNonces


@dataclass
class Context:
    settings: Settings
    pool: asyncpg.Pool
    eventlog: EventLog
    feed: MemoryFeed
    policy: PolicyModel
    directory: DirectoryModel
    catalogue: Mapping[str, str]
    #: this process's counters (None outside the web server)
    metrics: Metrics | None = None
    #: what else watches every record (the security log lines)
    observers: Sequence[Observer] = ()
    lookups: ModelLookups = field(init=False)
    ledger: LogLedger = field(init=False)
    token_endpoint: TokenEndpoint = field(init=False)
    introspection: Introspection = field(init=False)
    policy_point: PolicyPoint = field(init=False)
    #: DPOP_NONCE=required: the nonces DPoP proofs must carry; None: none asked for
    dpop_nonces: DpopNonces | None = field(init=False)

    def __post_init__(self) -> None:
        staleness = self.settings.policy_max_staleness or None  # 0: no bound
        self.lookups = ModelLookups(self.feed, self.policy, self.directory, staleness)
        observers = [*self.observers]
        if self.metrics is not None:
            observers.append(self.metrics.observe_recorded)
        self.ledger = LogLedger(self.eventlog, self.feed, observers)
        self.token_endpoint = TokenEndpoint(
            self.lookups,
            self.ledger,
            time.time,
            limits=Limits.of(self.settings),
            live_tokens=self.policy,
            audiences=assertions.audiences(
                self.settings.issuer, accepted=self.settings.assertion_audience
            ),
        )
        self.introspection = Introspection(self.lookups, time.time)
        self.policy_point = PolicyPoint(self.lookups, self.ledger, time.time)
        self.dpop_nonces = None
        if self.settings.dpop_nonce == "required":
            self.dpop_nonces = DpopNonces(self.pool, self.settings.dpop_nonce_lifetime)

    async def record(
        self,
        stream_id: str,
        expected_version: int | None,
        events: Sequence[Event],
        metadata: Metadata,
        *,
        conditions: Sequence[tuple[str, int]] = (),
    ) -> list[int]:
        """Append, then wait until this process's models have applied it, so the next
        request here sees the change (read-your-writes).

        A change made with an admin key holds only while the key does: the append is
        conditional on the key's stream being at version 1 (issued, not revoked), so a
        revocation that committed first, in any process, refuses it however stale this
        process's view of the keys is."""
        key_stream = streams.admin_key_of(metadata.actor)
        if key_stream is not None:
            conditions = [*conditions, (key_stream, 1)]
        record = Record(stream_id, expected_version, tuple(events), tuple(conditions))
        try:
            return await self.ledger.record(record, metadata, visible=True)
        except ConcurrencyError as exc:
            if key_stream is not None and exc.stream_id == key_stream:
                raise Unauthorized("unknown or revoked admin key", realm="tollgate-admin") from None
            raise

    async def refresh(self) -> None:
        """Catch up with what other processes wrote (a lookup missed; look again)."""
        await self.feed.catch_up()

    def count(self, name: str) -> None:
        """The notifier's email counters (everything recorded is counted by the ledger)."""
        if self.metrics is not None:
            if name == "email_sent":
                self.metrics.email_sent()
            elif name == "email_failed":
                self.metrics.email_failed()
