"""The pacsflow harvester service: bulk retrieval from a PACS, rate-limited and resumable."""
