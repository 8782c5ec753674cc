"""Package data: the JSON Schema of the config language and the admin API spec."""
