"""What holds client_credentials applications to their rate (TOKEN_RATE_PER_CLIENT) and their
number of live tokens (CC_TOKEN_LIMIT) across every process on one log.

These tokens never expire: a client that asks for one per call is held to a rate, and the
oldest past the limit are superseded. Each process decides from its read model, which
hears of other processes' tokens within milliseconds, and of its own a moment after it
records them. So each process also keeps what its model does not hold yet: the tokens it
has granted and not seen applied, and the tokens it is superseding. Tokens decided at once
in one process are then decided as one, each superseding its own oldest, instead of each
on the same view (the same oldest, five times over); and what several processes decided
at once is counted again once applied, and the excess superseded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog

from service.domain import grants
from service.domain.rate import CLOCKS_APART, RateLimit
from service.domain.state import AppState
from service.eventlog import Metadata
from service.logs import error_text
from service.oauth.errors import SlowDown
from service.oauth.ports import Ledger, Lookups

if TYPE_CHECKING:
    from service.oauth.token_endpoint import Limits

log = structlog.get_logger(__name__)

#: seconds after this process's own client_credentials token is applied that its client's
#: live tokens are counted again (`_supersede_excess`): long enough for the tokens of a
#: burst, and the supersessions recorded with them, to be applied here
EXCESS_CHECK_DELAY = 0.25


class LiveTokens(Protocol):
    """Each client_credentials application's live tokens, oldest first (the read model),
    and whom it tells of each one it applies, whichever process granted it."""

    on_client_token: Callable[[str, str, int], None] | None

    def client_tokens_since(self, since: float) -> Iterator[tuple[str, int]]:
        """(client_id, issued_at) of the live client_credentials tokens issued since."""
        ...

    def lone_tokens_past(self, client_id: str, count: int) -> Sequence[bytes]:
        """The client's live tokens, oldest first, when it may hold more than `count`."""
        ...


class ClientTokenBounds:
    """The rate and the live-token limit of client_credentials applications, in one
    process, kept with every other process's (see the module's docstring)."""

    def __init__(
        self,
        limits: Limits,
        lookups: Lookups,
        ledger: Ledger,
        clock: Callable[[], float],
        live_tokens: LiveTokens | None,
    ) -> None:
        self.limits = limits
        self.lookups = lookups
        self.ledger = ledger
        self.clock = clock
        self.live_tokens = live_tokens
        self.rate = RateLimit(limits.rate, limits.burst)
        self._granted: dict[str, str] = {}  # token hash → client: granted here, not applied
        self._pending: dict[str, int] = {}  # client → how many of those
        self._going: dict[str, set[bytes]] = {}  # client → tokens being superseded here
        self._excess_due: set[str] = set()  # clients whose live tokens are to be counted again
        self._checks: set[asyncio.Future[None]] = set()
        if live_tokens is not None:
            # What the model applied before (a process starting up catches up first) is
            # counted too: a new process gave every client a full burst more, however many
            # tokens it had just been granted elsewhere.
            if limits.rate > 0:
                now = clock()
                since = now - limits.burst / limits.rate - 1  # whole seconds
                for client_id, issued_at in live_tokens.client_tokens_since(since):
                    self.rate.taken(client_id, min(issued_at + 1, now))
            live_tokens.on_client_token = self.applied

    # --- the rate ----------------------------------------------------------------------

    def within_rate(self, client_id: str) -> None:
        wait = self.rate.take(client_id, self.clock())
        if wait:
            raise SlowDown(wait)

    # --- tokens granted here, until the model applies them -----------------------------

    def granting(self, app: AppState, token_hash: str) -> None:
        """A token this process is about to record for `app`: counted as the client's until
        the model applies it (`applied`), or it is not recorded (`not_granted`); not at all
        when nothing holds the application (no rate, no limit: nothing to count)."""
        limited = self.live_tokens is not None and self.limits.live_tokens_of(app)
        if self.limits.rate > 0 or limited:
            self._granted[token_hash] = app.client_id
            self._pending[app.client_id] = self._pending.get(app.client_id, 0) + 1

    def not_granted(self, token_hash: str) -> None:
        """Not recorded (or not known to be: then, if it was, it is counted twice)."""
        self._forget(token_hash)

    def applied(self, client_id: str, token_hash: str, issued_at: int) -> None:
        """The read model applied a client_credentials token (PolicyModel.on_client_token).
        One this process granted: the client's live tokens are counted again shortly. One
        another process granted: taken from this process's rate too, as of now (it is
        announced within milliseconds; its `issued_at` is whole seconds, on another host's
        clock); one older than a full refill, by more than clocks may be apart, changes
        nothing (a process catching up on old history)."""
        if self._forget(token_hash):
            if self.live_tokens is not None and client_id not in self._excess_due:
                self._excess_due.add(client_id)
                loop = asyncio.get_running_loop()
                loop.call_later(EXCESS_CHECK_DELAY, self._check_excess, client_id)
        elif self.limits.rate > 0:
            now = self.clock()
            if issued_at + 1 + self.limits.burst / self.limits.rate + CLOCKS_APART > now:
                self.rate.taken(client_id, now)

    def _forget(self, token_hash: str) -> bool:
        client_id = self._granted.pop(token_hash, None)
        if client_id is None:
            return False
        self._pending[client_id] -= 1
        if not self._pending[client_id]:
            del self._pending[client_id]
        return True

    # --- the limit ---------------------------------------------------------------------

    def to_supersede(self, app: AppState, reserved: list[bytes]) -> tuple[str, ...]:
        """The hashes of the application's oldest live tokens that must go for it to stay
        within its limit: counting the tokens this process has granted and its model does
        not hold yet (the one being decided among them), and leaving out those it is
        superseding already. Each is reserved (added to `reserved`) until `release`."""
        limit = self.limits.live_tokens_of(app)
        if not limit or self.live_tokens is None:
            return ()
        client_id = app.client_id
        pending = self._pending.get(client_id, 0)
        keys = self.live_tokens.lone_tokens_past(client_id, limit - pending)
        if not keys:
            return ()
        going = self._going.setdefault(client_id, set())
        free = [key for key in keys if key not in going]
        over = len(free) + pending - limit  # those in `going` leave on their own
        chosen = free[: max(0, over)]
        going.update(chosen)
        reserved.extend(chosen)
        return tuple(key.hex() for key in chosen)

    def release(self, client_id: str, reserved: list[bytes]) -> None:
        """Superseded (the revocations recorded, and applied here), or not to be."""
        going = self._going.get(client_id)
        if going is not None:
            going.difference_update(reserved)
            if not going:
                del self._going[client_id]

    def _check_excess(self, client_id: str) -> None:
        check = asyncio.ensure_future(self._supersede_excess(client_id))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _supersede_excess(self, client_id: str) -> None:
        """Tokens granted at once in several processes were each decided without the
        others in view: together they passed the limit, and nothing brought it back until
        the client asked again (the excess never expires). Counted again once applied here
        (the others', announced within milliseconds, with them), the excess is superseded."""
        self._excess_due.discard(client_id)
        app = self.lookups.application_now(client_id)
        if app is None:
            return
        reserved: list[bytes] = []
        try:
            excess = self.to_supersede(app, reserved)
            for record in grants.supersede(app, excess):
                await self.ledger.record(
                    record, Metadata(actor=f"client:{client_id}"), visible=True
                )
        except Exception as exc:  # a task of its own: what failed is said, and left
            log.warning("token.supersede_failed", client_id=client_id, error=error_text(exc))
        else:
            if excess:
                log.info("token.excess_superseded", client_id=client_id, count=len(excess))
        finally:
            self.release(client_id, reserved)
