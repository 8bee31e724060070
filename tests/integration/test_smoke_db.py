from service import events as ev
from service.eventlog import Metadata


async def test_append_and_read_back(eventlog):
    positions = await eventlog.append(
        "company-c1", 0, [ev.CompanyCreated(company_id="c1", name="Acme")], Metadata(actor="system")
    )
    assert positions == [1]
    events = await eventlog.read_all()
    assert [e.event for e in events] == [ev.CompanyCreated(company_id="c1", name="Acme")]
