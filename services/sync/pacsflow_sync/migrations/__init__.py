"""Schema migrations of the sync service: its cycles (runs) and series transfers."""
