"""DPoP (RFC 9449) at the edges of the protocol core: a proof presented with a request, and
its single use recorded across every process.
https://www.rfc-editor.org/rfc/rfc9449#section-11.1"""

from __future__ import annotations

from dataclasses import dataclass

from service import events as ev
from service.domain import dpop, streams
from service.domain.credentials import digest
from service.domain.grants import Record
from service.eventlog import ConcurrencyError, Metadata
from service.oauth.errors import OAuthError
from service.oauth.ports import Ledger


@dataclass(frozen=True)
class Presented:
    """A DPoP proof as a request carried it, with what the request was: its method (htm)
    and its public URL (htu). `proof` "": the request carried none."""

    proof: str
    htm: str
    htu: str


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
