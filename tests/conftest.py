"""Shared by every suite; deliberately service-free so unit tests never start PostgreSQL or MinIO.

Services live in tests/support/stack.py; tests/integration and tests/chaos import its fixtures.
"""
