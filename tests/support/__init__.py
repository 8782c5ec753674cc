"""Helpers the tests share: an origin server process and an lbc node."""
