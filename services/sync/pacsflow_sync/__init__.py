"""The pacsflow sync service: keeps a local PACS up to date with a remote one."""
