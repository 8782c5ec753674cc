"""The health checker (`python -m lbc_workers.health`) and its pure state machine."""
