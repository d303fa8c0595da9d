"""The one settings module. Everything that differs between machines comes from the environment.

`.env` (copied from `.env.example`) is read if present; real environment variables win. A missing
variable never turns on debug or a guessable secret key: outside DEBUG, DJANGO_SECRET_KEY must be set.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import django_stubs_ext
import environ
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

# Lets classes be subscripted at run time as the type stubs declare them (ModelAdmin[Model], …).
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# Set by the test runner (pyproject's pytest env): fast hashing, no dj-stripe migrations.
TESTING = env.bool("DJANGO_TESTING", default=False)

if DEBUG:
    SECRET_KEY = env.str(
        "DJANGO_SECRET_KEY", default="dev-only-insecure-key-never-use-in-production"
    )
else:
    try:
        SECRET_KEY = env.str("DJANGO_SECRET_KEY")
    except ImproperlyConfigured as exc:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Production needs a real secret; "
            "for local work use `make run`, which sets DJANGO_DEBUG=1 and a throwaway key."
        ) from exc

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1"])
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="http://127.0.0.1:8000").rstrip("/")
CSRF_TRUSTED_ORIGINS = env.list(
    "DJANGO_CSRF_TRUSTED_ORIGINS",
    default=[PUBLIC_BASE_URL] if PUBLIC_BASE_URL.startswith("https://") else [],
)

INSTALLED_APPS = [
    "config.admin.OperatorAdminConfig",  # django.contrib.admin, with the console's app order
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "axes",  # login throttling
    "allauth",  # the customers' sign-up, login, email verification and password reset
    "allauth.account",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served by us (no CDN)
    "django_htmx",
    "djstripe",
    "provisioning",
    "billing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
]

# --- Login throttling (django-axes): /accounts/login/ and /admin/login/ -------------------------
# Axes' backend comes first: it refuses a locked-out login before any password is checked.
# Django's own backend serves the admin's login; allauth's, the customers' (user name or email).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
# The admin's form posts `username`, allauth's posts `login` (a user name or an email address):
# both count against the same lockout (config/accounts.py).
AXES_USERNAME_CALLABLE = "config.accounts.axes_username"
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
# A user name (from any address) or an address (for any user name) with that many failures is
# locked out for the cool-off; a successful login forgets the failures.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
# The client address: REMOTE_ADDR, unless the deployment declares how many proxies it sits behind
# (then the X-Forwarded-For entry those proxies appended). Trusting the header otherwise would let
# anyone pick the address they are throttled by.
TRUSTED_PROXY_COUNT = env.int("DJANGO_TRUSTED_PROXY_COUNT", default=0)
AXES_IPWARE_PROXY_COUNT = TRUSTED_PROXY_COUNT or None
AXES_IPWARE_META_PRECEDENCE_ORDER = (
    ("HTTP_X_FORWARDED_FOR", "REMOTE_ADDR") if TRUSTED_PROXY_COUNT else ("REMOTE_ADDR",)
)

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# Unset DATABASE_URL: an SQLite file, the embedded default that lets `make run` work with no setup.
# The web server and the worker write at the same time, so SQLite runs in WAL mode, takes its
# write lock at BEGIN (IMMEDIATE: no "database is locked" upgrade deadlocks) and waits for it.
DATABASE_URL = env.str("DATABASE_URL", default="")
if DATABASE_URL:
    DATABASES = {"default": env.db_url_config(DATABASE_URL)}
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env.str("SQLITE_PATH", default=str(BASE_DIR / "var" / "db.sqlite3")),
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=20000;"
                ),
            },
        }
    }
# PostgreSQL: the heartbeat's UPDATE (the hottest statement) runs as a prepared statement, planned
# once per connection. Turn off behind a proxy that loses prepared statements between
# transactions (PgBouncer in transaction mode before 1.21).
DATABASE_PREPARED_STATEMENTS = env.bool("DATABASE_PREPARED_STATEMENTS", default=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if TESTING:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/agents/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# --- Customer accounts (django-allauth at /accounts/) ----------------------------------------------
# Anyone can sign up with an email address and a user name; nobody logs in before confirming the
# address (the link in the email). Log in with either. Operators use the admin's own login.
ACCOUNT_LOGIN_METHODS = {"username", "email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "username*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_FORMS = {"login": "config.accounts.LoginForm"}
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Agent Cloud] "
ACCOUNT_DEFAULT_HTTP_PROTOCOL = "https" if PUBLIC_BASE_URL.startswith("https://") else "http"
# django-axes throttles failed logins (above); allauth's own counter of failed logins would answer
# differently (a form error instead of axes' 429). Its other limits (sign-ups, reset emails) stay.
ACCOUNT_RATE_LIMITS = {"login_failed": False}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Locally and under tests WhiteNoise serves straight from the app and project static folders
# (no collectstatic); production serves the hashed, compressed files collectstatic wrote.
WHITENOISE_USE_FINDERS = DEBUG or TESTING
WHITENOISE_AUTOREFRESH = DEBUG or TESTING
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "django.contrib.staticfiles.storage.StaticFilesStorage"
            if DEBUG or TESTING
            else "whitenoise.storage.CompressedManifestStaticFilesStorage"
        )
    },
}

# --- Security (manage.py check --deploy is clean with DEBUG off) -----------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=not DEBUG and not TESTING)
# Load balancers probe /healthz over plain HTTP inside the network. /metrics is not exempt: its
# bearer token must never travel in clear text.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=not DEBUG)
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=0 if DEBUG else 31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=False)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SILENCED_SYSTEM_CHECKS = env.list("DJANGO_SILENCED_SYSTEM_CHECKS", default=[])
if not SECURE_HSTS_PRELOAD:
    # Preloading is a one-way door a deploy must choose deliberately.
    SILENCED_SYSTEM_CHECKS.append("security.W021")

# --- Content Security Policy (django-csp) --------------------------------------------------------
# Every page (dashboard, admin, API docs) loads scripts, styles and images from this origin only:
# no inline scripts or styles anywhere. Forms post here; the buy form's answer may redirect to
# Stripe Checkout, and "Manage subscription"'s to Stripe's customer portal.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "font-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF, "https://checkout.stripe.com", "https://billing.stripe.com"],
        "frame-ancestors": [NONE],
    }
}

# --- REST framework / OpenAPI -----------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["provisioning.api.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "provisioning.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agent provisioning API",
    "DESCRIPTION": "Workflow-run callbacks (OIDC) and the customer's read API (session).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI from drf-spectacular-sidecar's static files: works offline, no CDN to trust.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The schema and Swagger UI describe the contract, not data: readable without a login.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # One name per choice set (`step` and `failed_step` share the runner's steps).
    "ENUM_NAME_OVERRIDES": {
        "RunnerStepEnum": "provisioning.api.fields.RUNNER_STEP_CHOICES",
        "JobStatusEnum": "provisioning.models.JobStatus",
    },
}

# --- The provisioning queue (timeouts, retries, and what dispatch needs) ----------------------
HEARTBEAT_INTERVAL_SECONDS = env.int("HEARTBEAT_INTERVAL_SECONDS", default=60)
JOB_TIMEOUT_SECONDS = env.int("JOB_TIMEOUT_SECONDS", default=900)
MAX_RETRIES = env.int("MAX_RETRIES", default=3)
RETRY_BACKOFF_SECONDS = env.int("RETRY_BACKOFF_SECONDS", default=30)
RETRY_BACKOFF_MAX_SECONDS = env.int("RETRY_BACKOFF_MAX_SECONDS", default=1800)
DISPATCH_CLAIM_TIMEOUT_SECONDS = env.int("DISPATCH_CLAIM_TIMEOUT_SECONDS", default=600)
WORKER_INTERVAL_SECONDS = env.float("WORKER_INTERVAL_SECONDS", default=5.0)
# An attempt's absolute limit, heartbeats or not (a heartbeat thread can hide a hung Ansible run).
JOB_DEADLINE_SECONDS = env.int("JOB_DEADLINE_SECONDS", default=3600)
# How often the worker asks the runner backend (GitHub) about in-flight runs, per job.
RECONCILE_INTERVAL_SECONDS = env.int("RECONCILE_INTERVAL_SECONDS", default=300)
# A customer's "Re-provision" of one agent, at most this often per hour (every try makes a VM).
REPROVISION_LIMIT_PER_HOUR = env.int("REPROVISION_LIMIT_PER_HOUR", default=3)
# The reaper leaves a labelled VM younger than this alone (its job may not be recorded yet).
REAPER_GRACE_SECONDS = env.int("REAPER_GRACE_SECONDS", default=1800)
# The Hetzner project at its server limit: new builds wait this long before one is tried again
# (sooner when a deprovision completes or an operator lifts the hold).
CAPACITY_RETRY_SECONDS = env.int("CAPACITY_RETRY_SECONDS", default=900)
# Launch day: runs (provision, deprovision, cleanup) dispatched and not finished, across every
# worker; the effective limit is the smaller of this and what the Hetzner budget allows
# (provisioning/limits.py).
PROVISIONING_MAX_IN_FLIGHT = env.int("PROVISIONING_MAX_IN_FLIGHT", default=20)
# One GitHub App budget shared by every process (counted in PostgreSQL), and the Hetzner project's
# rate limit, both per API_BUDGET_WINDOW_SECONDS (an hour; tests and `make launch` shrink it).
GITHUB_API_BUDGET_PER_HOUR = env.int("GITHUB_API_BUDGET_PER_HOUR", default=4000)
HETZNER_API_BUDGET_PER_HOUR = env.int("HETZNER_API_BUDGET_PER_HOUR", default=3600)
API_BUDGET_WINDOW_SECONDS = env.int("API_BUDGET_WINDOW_SECONDS", default=3600)
# A run that has reported (complete/fail) keeps its runner slot until GitHub says it ended: its
# `workflow_run` webhook (signed with GITHUB_WEBHOOK_SECRET), else a list call for runs reported
# more than RUN_FINISH_POLL_SECONDS ago; never longer than RUN_FINISH_GRACE_SECONDS.
RUN_FINISH_POLL_SECONDS = env.int("RUN_FINISH_POLL_SECONDS", default=30)
RUN_FINISH_GRACE_SECONDS = env.int("RUN_FINISH_GRACE_SECONDS", default=600)
# How long a process reuses what it read of recent builds (median build time, Hetzner calls per
# build) for the in-flight limit and the queue's estimates; 0 reads them on every use (tests).
LIMITS_REFRESH_SECONDS = env.float(
    "LIMITS_REFRESH_SECONDS", default=0.0 if TESTING else WORKER_INTERVAL_SECONDS
)
# Hetzner API calls one build makes, used until enough builds have reported their own count.
HETZNER_CALLS_PER_BUILD = env.int("HETZNER_CALLS_PER_BUILD", default=7)
# How often the customer's agent page polls its status while work is active.
DASHBOARD_POLL_SECONDS = env.int("DASHBOARD_POLL_SECONDS", default=3)
# The operator console's jobs list and job pages, while jobs are queued or provisioning.
CONSOLE_POLL_SECONDS = env.int("CONSOLE_POLL_SECONDS", default=5)

# Outside DEBUG (and tests) there is no default: a deployment says which runner it dispatches to.
PROVISIONING_RUNNER = env.str("PROVISIONING_RUNNER", default="local" if DEBUG or TESTING else "")
# Lets a production-mode deployment use loopback stand-ins (config/checks.py); tests of deployments.
ALLOW_LOOPBACK_SERVICES = env.bool("DJANGO_ALLOW_LOOPBACK_SERVICES", default=False)
# Dispatch right after an enqueue commits (instead of at the next worker tick). Off in tests, so
# they dispatch explicitly.
DISPATCH_ON_COMMIT = env.bool("DISPATCH_ON_COMMIT", default=not TESTING)

# --- GitHub (dispatch with a GitHub App; callbacks with Actions OIDC tokens) ------------------
GITHUB_API_URL = env.str("GITHUB_API_URL", default="https://api.github.com").rstrip("/")
# Example identities for local work and tests only; production must name its repository.
GITHUB_REPOSITORY = env.str(
    "GITHUB_REPOSITORY", default="example/agent-provisioning" if DEBUG or TESTING else ""
)
GITHUB_REPOSITORY_ID = env.str(
    "GITHUB_REPOSITORY_ID", default="100000001" if DEBUG or TESTING else ""
)
GITHUB_WORKFLOW_FILE = env.str("GITHUB_WORKFLOW_FILE", default="provision.yml")
GITHUB_REF = env.str("GITHUB_REF", default="main")
# Scheduled runs always run the default branch's workflow: the reaper's tokens carry that ref.
GITHUB_REAPER_REF = env.str("GITHUB_REAPER_REF", default=GITHUB_REF)
GITHUB_APP_ID = env.str("GITHUB_APP_ID", default="")
GITHUB_APP_INSTALLATION_ID = env.str("GITHUB_APP_INSTALLATION_ID", default="")
GITHUB_APP_PRIVATE_KEY = env.str("GITHUB_APP_PRIVATE_KEY", default="", multiline=True)
# The GitHub App's webhook secret: POST /webhooks/github/ accepts only deliveries signed with it
# (X-Hub-Signature-256). Unset: the endpoint answers 404 and finished runs are found by listing.
GITHUB_WEBHOOK_SECRET = env.str("GITHUB_WEBHOOK_SECRET", default="")

LOCAL_OIDC_ISSUER_URL = env.str("LOCAL_OIDC_ISSUER_URL", default="http://127.0.0.1:8702").rstrip(
    "/"
)
LOCAL_OIDC_REQUEST_TOKEN = env.str("LOCAL_OIDC_REQUEST_TOKEN", default="local-request-token")
PROVISIONING_OIDC_ISSUER = env.str(
    "PROVISIONING_OIDC_ISSUER",
    default=LOCAL_OIDC_ISSUER_URL
    if PROVISIONING_RUNNER == "local"
    else "https://token.actions.githubusercontent.com",
)
PROVISIONING_OIDC_JWKS_URL = env.str(
    "PROVISIONING_OIDC_JWKS_URL", default=f"{PROVISIONING_OIDC_ISSUER}/.well-known/jwks"
)
PROVISIONING_OIDC_AUDIENCE = env.str("PROVISIONING_OIDC_AUDIENCE", default="agent-provisioning")
PROVISIONING_OIDC_RUNNER_ENVIRONMENTS = env.list(
    "PROVISIONING_OIDC_RUNNER_ENVIRONMENTS", default=["github-hosted"]
)
# How long fetched signing keys are trusted, and the least time between two refetches when a
# token names an unknown key id (so a flood of bad tokens cannot hammer the issuer).
PROVISIONING_OIDC_JWKS_LIFESPAN_SECONDS = env.float(
    "PROVISIONING_OIDC_JWKS_LIFESPAN_SECONDS", default=3600.0
)
PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS = env.float(
    "PROVISIONING_OIDC_JWKS_REFRESH_COOLDOWN_SECONDS", default=30.0
)

# --- The local pipeline (make run): fakes on loopback ----------------------------------------
LOCAL_HETZNER_URL = env.str("LOCAL_HETZNER_URL", default="http://127.0.0.1:8701/v1")
LOCAL_RUNNER_HEARTBEAT_SECONDS = env.float("LOCAL_RUNNER_HEARTBEAT_SECONDS", default=2.0)
LOCAL_RUNNER_STEP_SECONDS = env.float("LOCAL_RUNNER_STEP_SECONDS", default=2.0)
LOCAL_RUNNER_FAIL_STEP = env.str("LOCAL_RUNNER_FAIL_STEP", default="")
LOCAL_RUNNER_KILL_AT_STEP = env.str("LOCAL_RUNNER_KILL_AT_STEP", default="")
LOCAL_RUNNER_LOG_DIR = env.path("LOCAL_RUNNER_LOG_DIR", default=BASE_DIR / "var" / "runner-logs")
# The command the local backend starts per run (default: this interpreter's `-m provisioning.runner`).
LOCAL_RUNNER_COMMAND = env.list("LOCAL_RUNNER_COMMAND", default=[])
# Extra environment for local runs (tests point the runner at their own fakes); not from the env.
LOCAL_RUNNER_EXTRA_ENV: dict[str, str] = {}

# --- Operator alerts: a job failed for good ----------------------------------------------------
# Email goes to these addresses, else to every active staff user with an email address.
OPERATOR_ALERT_EMAILS = env.list("OPERATOR_ALERT_EMAILS", default=[])
# Optional: a JSON POST per failed job (e.g. a Slack incoming webhook URL).
OPERATOR_ALERT_WEBHOOK_URL = env.str("OPERATOR_ALERT_WEBHOOK_URL", default="")
# Mail: EMAIL_URL (smtp://user:password@host:587/?tls=True); `make run` prints mail to its output.
vars().update(
    env.email_url("EMAIL_URL", default="consolemail://" if DEBUG else "smtp://localhost:25")
)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="agent-provisioning@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# --- Monitoring ----------------------------------------------------------------------------------
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")

# --- Stripe / dj-stripe -------------------------------------------------------------------------
STRIPE_LIVE_MODE = env.bool("STRIPE_LIVE_MODE", default=False)
# Local development (DEBUG only) gets fake-format values so `make run` works with no Stripe account;
# production has no defaults: an unset value leaves the integration off.
LOCAL_STRIPE_SECRET_KEY = "sk_test_localDevelopmentOnlyNotAStripeKey0000"  # noqa: S105 (fake format)
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default=LOCAL_STRIPE_SECRET_KEY if DEBUG else "")
STRIPE_TEST_SECRET_KEY = "" if STRIPE_LIVE_MODE else STRIPE_SECRET_KEY
STRIPE_LIVE_SECRET_KEY = STRIPE_SECRET_KEY if STRIPE_LIVE_MODE else ""
STRIPE_API_VERSION = env.str("STRIPE_API_VERSION", default="2025-09-30.clover")
STRIPE_PRICE_ID = env.str("STRIPE_PRICE_ID", default="")
# Our price as the session reports it (amount_total in the smallest unit, lower-case currency).
# Unset: the check is skipped.
STRIPE_PRICE_AMOUNT = env.int("STRIPE_PRICE_AMOUNT", default=None)
STRIPE_PRICE_CURRENCY = env.str("STRIPE_PRICE_CURRENCY", default="").lower()
STRIPE_WEBHOOK_SECRET = env.str(
    "STRIPE_WEBHOOK_SECRET", default="whsec_localDevelopmentOnlyNotSecret" if DEBUG else ""
)
STRIPE_WEBHOOK_UUID = env.str(
    "STRIPE_WEBHOOK_UUID", default="00000000-0000-4000-8000-00000000beef" if DEBUG else ""
)
# The "Buy" form goes to a local stand-in checkout page instead of Stripe (DEBUG, no real key).
BILLING_LOCAL_CHECKOUT = env.bool(
    "BILLING_LOCAL_CHECKOUT",
    default=DEBUG and STRIPE_SECRET_KEY in ("", LOCAL_STRIPE_SECRET_KEY),
)
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")
if STRIPE_API_BASE:
    STRIPE_API_HOST = STRIPE_API_BASE
# How often the worker lists Stripe's events and paid Checkout sessions to catch up on missed
# webhook deliveries (billing.reconcile); 0 turns the duty off (`manage.py stripe_reconcile` still
# works). How many days of completed sessions the audit compares with agents: longer than the 30
# days Stripe keeps events, so a purchase whose event is gone is still found.
STRIPE_RECONCILE_INTERVAL_SECONDS = env.int("STRIPE_RECONCILE_INTERVAL_SECONDS", default=900)
STRIPE_SESSION_AUDIT_DAYS = env.int("STRIPE_SESSION_AUDIT_DAYS", default=35)
DJSTRIPE_FOREIGN_KEY_TO_FIELD = "id"
DJSTRIPE_USE_NATIVE_JSONFIELD = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
