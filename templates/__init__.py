"""Package data: Jinja2 templates (supervisord.conf and exports to other engines)."""
