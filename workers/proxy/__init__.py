"""The proxy worker (`python -m lbc_workers.proxy`). Kept empty: __main__ must
ignore SIGHUP before anything heavy is imported."""
