"""The admin API: a supervised process beside the workers (see app.py)."""
