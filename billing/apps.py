from django.apps import AppConfig


class BillingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "billing"
    verbose_name = "Billing"

    def ready(self) -> None:
        from djstripe.event_handlers import (
            handle_charge_dispute_event,
            handle_charge_event,
            handle_customer_subscription_event,
            handle_other_event,
        )
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
        # The same for the events that end an agent (and the charge events remembered for
        # disputes): dj-stripe's sync would retrieve the subscription, charge or dispute.
        for name, handler in (
            ("customer.subscription.deleted", handle_customer_subscription_event),
            ("charge.succeeded", handle_charge_event),
            ("charge.refunded", handle_charge_event),
            ("charge.dispute.created", handle_charge_dispute_event),
        ):
            WEBHOOK_SIGNALS[name].disconnect(receiver=handler, sender=Event)
