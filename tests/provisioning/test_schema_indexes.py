"""The job and event tables carry no index that another index already serves: each one is a write
on every enqueue and every event, so a redundant one costs the hottest writes and reads nothing.
PostgreSQL only (it reads the catalog)."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, connection, transaction

from provisioning.models import JobEvent, ProvisioningJob
from tests.factories import AgentFactory, JobFactory

pytestmark = [pytest.mark.postgres_only, pytest.mark.django_db]

TABLES = (ProvisioningJob._meta.db_table, JobEvent._meta.db_table)


def indexes(table: str) -> list[dict[str, object]]:
    """Every index of `table`: name, key columns in order, operator classes, unique, partial."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT i.relname,
                   array(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(attnum, n)
                         JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                         ORDER BY k.n),
                   array(SELECT o.opcname FROM unnest(x.indclass) WITH ORDINALITY c(oid, n)
                         JOIN pg_opclass o ON o.oid = c.oid ORDER BY c.n),
                   x.indisunique,
                   x.indpred IS NOT NULL
            FROM pg_index x
            JOIN pg_class i ON i.oid = x.indexrelid
            WHERE x.indrelid = %s::regclass
            """,
            [table],
        )
        return [
            {"name": n, "columns": list(c), "opclasses": list(o), "unique": u, "partial": p}
            for n, c, o, u, p in cursor.fetchall()
        ]


@pytest.mark.parametrize("table", TABLES)
def test_no_plain_index_is_a_leading_part_of_another(table):
    found = indexes(table)
    assert len(found) > 3, found  # the catalog query found the table's indexes
    redundant = [
        (small["name"], big["name"])
        for small in found
        for big in found
        if small is not big
        and not small["unique"]
        and not small["partial"]
        and not big["partial"]
        and big["columns"][: len(small["columns"])] == small["columns"]
    ]
    assert redundant == []


def test_stripe_event_id_has_one_index_and_it_is_unique():
    on_event_id = [
        i for i in indexes(TABLES[0]) if i["columns"] and i["columns"][0] == "stripe_event_id"
    ]
    assert [(i["unique"], i["opclasses"]) for i in on_event_id] == [(True, ["text_ops"])]
    job = JobFactory(stripe_event_id="evt_once")
    with pytest.raises(IntegrityError), transaction.atomic():
        JobFactory(stripe_event_id=job.stripe_event_id, agent=AgentFactory())
    assert ProvisioningJob.objects.filter(stripe_event_id="evt_once").count() == 1


def test_look_ups_by_agent_and_by_job_still_use_an_index():
    """The foreign keys lost their own indexes; the composite ones lead with the same column."""
    job = JobFactory()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plans = []
        for sql in (
            f"SELECT 1 FROM {TABLES[0]} WHERE agent_id = %s",  # noqa: S608 (table names)
            f"SELECT 1 FROM {TABLES[1]} WHERE job_id = %s",  # noqa: S608
        ):
            cursor.execute("EXPLAIN " + sql, [job.agent_id if "agent" in sql else job.pk])
            plans.append("\n".join(row[0] for row in cursor.fetchall()))
    assert "job_agent_latest" in plans[0], plans[0]
    assert "jobevent_job_time" in plans[1] or "jobevent_job_run" in plans[1], plans[1]
