"""PostgreSQL-only: the agents list's "newest first" (admin), which no index served; does nothing on
SQLite. Built CONCURRENTLY so a live table keeps taking writes."""

from django.db import migrations


def create_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS agent_newest "
        "ON provisioning_agent (created_at DESC)"
    )


def drop_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("DROP INDEX CONCURRENTLY IF EXISTS agent_newest")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("provisioning", "0004_admin_search_indexes")]

    operations = [migrations.RunPython(create_index, drop_index, elidable=False)]
