# Three indexes fewer to write on every enqueue, none fewer to read with: the foreign keys' own
# indexes on job.agent_id and jobevent.job_id (job_agent_latest and jobevent_job_time lead with
# the same column), and the varchar_pattern_ops copy that unique=True adds beside the unique
# index on stripe_event_id (nothing searches it with LIKE). The uniqueness itself moves to a
# named constraint, added before the old one goes.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('provisioning', '0015_finishing_runs'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddConstraint(
            model_name='provisioningjob',
            constraint=models.UniqueConstraint(fields=('stripe_event_id',), name='job_stripe_event_once'),
        ),
        migrations.AlterField(
            model_name='provisioningjob',
            name='stripe_event_id',
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        # The foreign keys lose only their index: a plain AlterField would also drop and re-add
        # each constraint, re-checking every row of both tables under lock.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name='jobevent',
                    name='job',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='events', to='provisioning.provisioningjob'),
                ),
                migrations.AlterField(
                    model_name='provisioningjob',
                    name='agent',
                    field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='jobs', to='provisioning.agent'),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "provisioning_jobevent_job_id_71909e98"',
                    reverse_sql='CREATE INDEX IF NOT EXISTS "provisioning_jobevent_job_id_71909e98" ON "provisioning_jobevent" ("job_id")',
                ),
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "provisioning_provisioningjob_agent_id_5d54b59d"',
                    reverse_sql='CREATE INDEX IF NOT EXISTS "provisioning_provisioningjob_agent_id_5d54b59d" ON "provisioning_provisioningjob" ("agent_id")',
                ),
            ],
        ),
    ]
