"""Shared test helpers, imported as `tests.helpers.<module>` (pytest.ini puts the repository root on sys.path)."""
