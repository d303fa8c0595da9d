"""When the worker last asked GitHub about a job's run (no index: provisioning rows are few and
the heartbeat updates stay HOT); the operators' "end agent" permission."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('provisioning', '0005_admin_agent_newest'),
    ]

    operations = [
        migrations.AlterModelOptions(
            name='agent',
            options={'ordering': ['-created_at'], 'permissions': [('end_agent', 'Can end agents (deprovision their VM)')]},
        ),
        migrations.AddField(
            model_name='provisioningjob',
            name='reconciled_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
