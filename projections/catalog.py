"""The SQL projections that Tollgate runs, by name."""

from __future__ import annotations

from projections.applications import ApplicationsProjection
from projections.base import Projection
from projections.companies import CompaniesProjection
from projections.stats import EventStatsProjection
from projections.tokens import TokensProjection


def sql_projections() -> list[Projection]:
    return [
        ApplicationsProjection(),
        CompaniesProjection(),
        TokensProjection(),
        EventStatsProjection(),
    ]
