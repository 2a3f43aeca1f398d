"""SQL migrations of the uploader: delivery scheduling and the event outbox."""
