"""DPoP (RFC 9449) at the edges of the protocol core: a proof presented with a request, and
its single use recorded across every process.
https://www.rfc-editor.org/rfc/rfc9449#section-11.1"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service import events as ev
from service.domain import dpop, dpop_nonces, streams
from service.domain.credentials import digest
from service.domain.grants import Record
from service.eventlog import ConcurrencyError, Metadata
from service.oauth.errors import OAuthError
from service.oauth.ports import Ledger


class Nonces(Protocol):
    """The server's DPoP nonces, shared by every process (service/storage/dpop_nonces.py)."""

    async def current(self) -> str:
        """The nonce to hand out now."""
        ...

    async def expires_at(self, nonce: str) -> float | None:
        """When a well-formed nonce handed out by any process stops being accepted; None:
        never handed out (or pruned)."""
        ...


@dataclass(frozen=True)
class Presented:
    """A DPoP proof as a request carried it, with what the request was: its method (htm)
    and its public URL (htu). `proof` "": the request carried none. `nonces`: the nonces
    its proof must carry one of (DPOP_NONCE=required), None: no nonce is asked for."""

    proof: str
    htm: str
    htu: str
    nonces: Nonces | None = None


async def nonce_refusal(
    presented: Presented,
    proof: dpop.Proof,
    now: float,
    error: Callable[[str, str], OAuthError] = dpop.UseDpopNonce,
) -> OAuthError | None:
    """When nonces are required, why the valid `proof` is refused for its nonce (`error`,
    with the nonce to use next), None when it is not (RFC 9449 §8, §9). Checked after the
    signature and before the jti is recorded: a proof refused for its nonce is not spent,
    and the client's next proof, by the same key, carries the nonce."""
    nonces = presented.nonces
    if nonces is None:
        return None
    expires_at = None
    if proof.nonce is not None and dpop_nonces.well_formed(proof.nonce):
        expires_at = await nonces.expires_at(proof.nonce)
    why = dpop_nonces.refusal(proof.nonce, expires_at, now)
    if why is None:
        return None
    return error(why, await nonces.current())


async def record_use(
    ledger: Ledger,
    proof: dpop.Proof,
    company_id: str,
    client_id: str,
    endpoint: str,
    meta: Metadata,
    error: type[OAuthError] = dpop.InvalidDpopProof,
) -> None:
    """Accept the proof once across every process (RFC 9449 §11.1): its use is appended at
    version 0 of a stream named after its key and jti, so a second use fails the append
    wherever it happens. The log rather than a table of seen jtis: the same guarantee the
    client assertions have (the stream key is unique under every process and host sharing
    the database), no second store to prune, and an auditable record of each proof. It
    costs one small event per accepted proof; proofs are accepted only for DPoP-bound
    tokens, so Bearer traffic appends nothing. The log keeps the jti's hash, never the
    proof."""
    jti_hash = digest(f"{proof.jkt}\n{proof.jti}")
    event = ev.DpopProofAccepted(
        company_id=company_id,
        client_id=client_id,
        jti_hash=jti_hash,
        jkt=proof.jkt,
        endpoint=endpoint,
        expires_at=proof.iat + dpop.MAX_AGE + dpop.LEEWAY,
    )
    try:
        await ledger.record(Record(streams.dpop_proof(jti_hash), 0, (event,)), meta)
    except ConcurrencyError:
        raise error("this DPoP proof has been used already (its jti)") from None
