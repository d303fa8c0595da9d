from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "provisioning"
    verbose_name = "Provisioning"

    def ready(self) -> None:
        # Registers the production settings check (manage.py check --deploy).
        from config import checks  # noqa: F401
