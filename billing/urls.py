"""Billing's pages: the local checkout and portal stand-ins under /billing/, and the dashboard's
buy page and "Manage subscription" button.

`dashboard_urlpatterns` joins the dashboard's namespace (`dashboard:agent-buy` at /agents/buy/,
`dashboard:agent-subscription`):
config/urls.py includes it together with provisioning.web.urls.
"""

from django.urls import URLPattern, path

from billing import views

app_name = "billing"

urlpatterns: list[URLPattern] = [
    path("local-checkout/", views.LocalCheckoutView.as_view(), name="local-checkout"),
    path("local-portal/<uuid:agent_id>/", views.LocalPortalView.as_view(), name="local-portal"),
]

dashboard_urlpatterns: list[URLPattern] = [
    path("agents/buy/", views.agent_buy, name="agent-buy"),
    path(
        "agents/<uuid:agent_id>/subscription/",
        views.agent_subscription,
        name="agent-subscription",
    ),
]
