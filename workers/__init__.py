"""lbc's data plane: the processes supervisord runs (installed as lbc_workers)."""
