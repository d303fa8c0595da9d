"""Billing's pages: the local checkout stand-in under /billing/, and the dashboard's buy page.

`dashboard_urlpatterns` joins the dashboard's namespace (`dashboard:agent-buy` at /agents/buy/):
config/urls.py includes it together with provisioning.web.urls.
"""

from django.urls import URLPattern, path

from billing import views

app_name = "billing"

urlpatterns: list[URLPattern] = [
    path("local-checkout/", views.LocalCheckoutView.as_view(), name="local-checkout"),
]

dashboard_urlpatterns: list[URLPattern] = [
    path("agents/buy/", views.agent_buy, name="agent-buy"),
]
