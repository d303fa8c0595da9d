"""The reliability suite (`make reliability`): storms, kills and restarts against the real stack."""
