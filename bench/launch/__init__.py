"""Launch day, simulated (`make launch`): see bench/launch/sim.py."""
