"""The pacsflow notifier service: e-mail on study completion and on failures, exactly once."""
