"""Settings for the webhook benchmark: the real ones, tables built from models (no 85 s of
dj-stripe migrations), no dispatch after commit, plus a bare comparison view."""

from config.settings import *  # noqa: F403
from config.settings import INSTALLED_APPS

MIGRATION_MODULES = {app.rsplit(".", 1)[-1]: None for app in INSTALLED_APPS}
ROOT_URLCONF = "bench.webhook.urls"
DISPATCH_ON_COMMIT = False
LOGGING = {"version": 1, "disable_existing_loggers": True, "root": {"level": "ERROR"}}
