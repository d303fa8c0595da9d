"""The customer dashboard (session login; each customer sees only their own agents).

config/urls.py includes these in the `dashboard` namespace, together with billing's buy page
(`dashboard:agent-buy`), so provisioning never imports billing.
"""

from django.urls import URLPattern, path

from provisioning.web import views

app_name = "dashboard"

urlpatterns: list[URLPattern] = [
    path("", views.home, name="home"),
    path("agents/", views.agent_list, name="agent-list"),
    path("agents/<uuid:agent_id>/", views.agent_detail, name="agent-detail"),
    path("agents/<uuid:agent_id>/status/", views.agent_status_partial, name="agent-status"),
    path("agents/<uuid:agent_id>/reprovision/", views.agent_reprovision, name="agent-reprovision"),
]
