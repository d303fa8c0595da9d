"""Every door into the service: admin, customer accounts, the Stripe and GitHub webhooks, billing's pages, the API and
its schema, monitoring, and the customer dashboard."""

from allauth.account import views as account_views
from csp.constants import UNSAFE_INLINE
from csp.decorators import csp_update
from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.utils.functional import lazy
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from billing import urls as billing_urls
from billing.webhook import StripeWebhookView
from provisioning.api.github_webhook import GitHubWebhookView
from provisioning.web import urls as dashboard_urls

# The dashboard's pages: provisioning's, plus billing's buy page (`dashboard:agent-buy`).
dashboard = (dashboard_urls.urlpatterns + billing_urls.dashboard_urlpatterns, "dashboard")

urlpatterns = [
    # Every browser asks for /favicon.ico whatever the page links: answer it, not a 404. Resolved
    # at request time: the static manifest may not exist when the URLconf is imported.
    path(
        "favicon.ico",
        RedirectView.as_view(url=lazy(static, str)("img/favicon.svg"), permanent=True),
        name="favicon",
    ),
    path("admin/", admin.site.urls),
    # Customers' accounts (django-allauth): sign-up, login, email confirmation, password reset.
    # `login` and `logout` keep naming the login and logout pages as they did before allauth.
    path("accounts/login/", account_views.login, name="login"),
    path("accounts/logout/", account_views.logout, name="logout"),
    path("accounts/", include("allauth.urls")),
    # dj-stripe's webhook view behind a body check (billing/webhook.py); same path and name.
    path("stripe/webhook/<uuid:uuid>/", StripeWebhookView.as_view(), name="stripe-webhook"),
    path("stripe/", include("djstripe.urls", namespace="djstripe")),
    # The GitHub App's deliveries: a workflow run has ended, so its runner slot is free.
    path("github/webhook/", GitHubWebhookView.as_view(), name="github-webhook"),
    path("billing/", include("billing.urls")),
    path("api/v1/", include("provisioning.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves its start-up script as a file, so scripts stay strict; Swagger UI's
    # React components set inline styles, allowed on this page only.
    path(
        "api/docs/",
        csp_update({"style-src": [UNSAFE_INLINE]})(
            SpectacularSwaggerSplitView.as_view(url_name="schema")
        ),
        name="swagger-ui",
    ),
    path("", include("provisioning.ops.urls")),
    path("", include(dashboard)),
]
