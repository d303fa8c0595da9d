"""Settings for the heartbeat benchmark: the real ones (same middleware, same database options),
tables built from models, plus a bare comparison view in the URL map."""

from config.settings import *  # noqa: F403
from config.settings import INSTALLED_APPS

MIGRATION_MODULES = {app.rsplit(".", 1)[-1]: None for app in INSTALLED_APPS}
ROOT_URLCONF = "bench.heartbeat.urls"
DISPATCH_ON_COMMIT = False
LOGGING = {"version": 1, "disable_existing_loggers": True, "root": {"level": "ERROR"}}
