"""The HTTP API under /api/v1/: the workflow run's callbacks, the reaper's verdicts, and the
customer's read API. Each surface is one module; `urls.py` wires them."""
