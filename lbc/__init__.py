"""lbc: a load balancer driven like a compiler."""

__version__ = "0.1.0"
