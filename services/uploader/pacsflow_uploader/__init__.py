"""The pacsflow uploader service: file-ready events to C-STORE at one or more PACS."""
