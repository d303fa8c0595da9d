"""PostgreSQL-only storage tuning; does nothing on SQLite.

Heartbeats rewrite a provisioning row every minute. With free space left on each page (fillfactor)
and no index on the columns a heartbeat changes, PostgreSQL can update the row in place (a HOT
update): no index writes, little bloat, however many jobs the table holds.
"""

from django.db import migrations


def set_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("ALTER TABLE provisioning_provisioningjob SET (fillfactor = 80)")


def reset_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("ALTER TABLE provisioning_provisioningjob RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [("provisioning", "0001_initial")]

    operations = [migrations.RunPython(set_fillfactor, reset_fillfactor)]
