from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        from djstripe.event_handlers import handle_other_event
        from djstripe.models import Event
        from djstripe.signals import WEBHOOK_SIGNALS

        from billing import stripe_handlers  # noqa: F401  (connects the receivers)

        # dj-stripe's sync re-fetches the session (and its customer, subscription, invoice…) from
        # the Stripe API inside the webhook transaction; if that fails, our receivers never run.
        # Fulfilment reads the signed payload instead, so it depends only on the signature and
        # the database.
        for name, signal in WEBHOOK_SIGNALS.items():
            if name.startswith("checkout.session."):
                signal.disconnect(receiver=handle_other_event, sender=Event)
