"""The customer dashboard: pages, the htmx status partial, and the presenter they share with the
customer API."""
