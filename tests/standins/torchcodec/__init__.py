"""Test-only stand-in; see tests/standins/README.md."""
