"""Schema migrations of the notifier (the outbox and the incidents it reports)."""
