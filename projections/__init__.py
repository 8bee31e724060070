"""Read models built from the event log by checkpointed subscriptions."""
