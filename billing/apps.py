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

        # The Stripe catch-up: a worker duty, its figures on /metrics and the admin overview.
        # Handed to provisioning here because provisioning never imports billing.
        from billing import ops, reconcile
        from provisioning import worker
        from provisioning.admin import jobs as jobs_admin
        from provisioning.ops import metrics

        reconcile.connect_signals()
        worker.duty_register("stripe_reconcile", reconcile.reconcile_duty)
        metrics.collector_register("stripe_reconcile", ops.reconcile_metrics)
        jobs_admin.overview_card_register("stripe_reconcile", ops.reconcile_cards)
