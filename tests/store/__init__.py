"""Tests of the state store: one contract, run against PostgreSQL and SQLite."""
