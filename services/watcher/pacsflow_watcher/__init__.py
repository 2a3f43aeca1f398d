"""The pacsflow watcher service: import folders to validated, debounced file-ready events."""
