"""Helpers shared by the test modules (imported as ``support.*``; tests/conftest.py holds the fixtures)."""
