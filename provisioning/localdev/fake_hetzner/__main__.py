"""``python -m provisioning.localdev.fake_hetzner``: how `run_local_stack` starts the fake."""

from provisioning.localdev.fake_hetzner.cli import main

raise SystemExit(main())
