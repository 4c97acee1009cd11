"""Placeholder: built by a later issue (see docs/architecture.md)."""
