"""The customer dashboard (session login; each customer sees only their own agents)."""

from django.urls import path

from provisioning import views

app_name = "dashboard"

urlpatterns = [
    path("", views.home, name="home"),
    path("agents/", views.agent_list, name="agent-list"),
    path("agents/buy/", views.agent_buy, name="agent-buy"),
    path("agents/<uuid:agent_id>/", views.agent_detail, name="agent-detail"),
    path("agents/<uuid:agent_id>/status/", views.agent_status_partial, name="agent-status"),
    path("agents/<uuid:agent_id>/reprovision/", views.agent_reprovision, name="agent-reprovision"),
]
