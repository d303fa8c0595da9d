from django.urls import path

from billing import views

app_name = "billing"

urlpatterns = [
    path("local-checkout/", views.LocalCheckoutView.as_view(), name="local-checkout"),
]
