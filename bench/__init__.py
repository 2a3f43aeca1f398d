"""Benchmarks: scripts that measure pacsflow against DCMTK on this machine (not tests)."""
