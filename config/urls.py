"""Every door into the service: admin, login, the Stripe webhook, billing's pages, the API and
its schema, monitoring, and the customer dashboard."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from billing import urls as billing_urls
from billing.webhook import StripeWebhookView
from provisioning.web import urls as dashboard_urls

# The dashboard's pages: provisioning's, plus billing's buy page (`dashboard:agent-buy`).
dashboard = (dashboard_urls.urlpatterns + billing_urls.dashboard_urlpatterns, "dashboard")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    # dj-stripe's webhook view behind a body check (billing/webhook.py); same path and name.
    path("stripe/webhook/<uuid:uuid>/", StripeWebhookView.as_view(), name="stripe-webhook"),
    path("stripe/", include("djstripe.urls", namespace="djstripe")),
    path("billing/", include("billing.urls")),
    path("api/v1/", include("provisioning.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("provisioning.ops.urls")),
    path("", include(dashboard)),
]
