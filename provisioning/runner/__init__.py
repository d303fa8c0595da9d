"""The code the provisioning workflow runs: claim → create or adopt a VM → SSH → Ansible →
health check → complete, with heartbeats throughout.

It talks to our service only over HTTP (the workflow callbacks) and imports nothing from Django
or from the rest of `provisioning`, so the GitHub runner needs just `requirements.txt` beside it.
Entry point: `python -m provisioning.runner --help`.
"""
