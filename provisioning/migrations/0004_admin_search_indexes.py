"""PostgreSQL-only indexes for the operator console's search and filters; does nothing on SQLite.

The admin's free-text search is Django's `icontains`, which PostgreSQL runs as
`UPPER(col::text) LIKE UPPER('%term%')`: only a trigram GIN index on that very expression serves it
(a plain btree cannot, a trigram index on the bare column is not used). The others serve the
console's exact-id search and its filters on rare values, so a 1M-row jobs table answers from an
index instead of a sequential scan:

- job_workflow_run       search by workflow run id (exact)
- job_failed_step_newest "failed step" filter, newest first (only rows that ever failed)
- job_deprovision_newest "kind = deprovision" filter, newest first (rare kind)
- agent_name_trgm        search by agent name
- user_email_trgm        search by customer email (an index on auth_user, named for this app)

Built CONCURRENTLY (non-atomic migration) so a live table keeps taking writes.
"""

from django.db import migrations

INDEXES = [
    (
        "job_workflow_run",
        "provisioning_provisioningjob (workflow_run_id) WHERE workflow_run_id IS NOT NULL",
    ),
    (
        "job_failed_step_newest",
        "provisioning_provisioningjob (failed_step, created_at DESC) WHERE failed_step <> ''",
    ),
    (
        "job_deprovision_newest",
        "provisioning_provisioningjob (created_at DESC) WHERE kind = 'deprovision'",
    ),
    ("agent_name_trgm", "provisioning_agent USING gin ((UPPER(name::text)) gin_trgm_ops)"),
    ("provisioning_user_email_trgm", "auth_user USING gin ((UPPER(email::text)) gin_trgm_ops)"),
]


def create_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, definition in INDEXES:
        schema_editor.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}")


def drop_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, _definition in INDEXES:
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("provisioning", "0003_job_operator_permissions"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(create_indexes, drop_indexes, elidable=False)]
