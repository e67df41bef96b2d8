"""Test helpers for the training tests (synthetic datasets)."""
