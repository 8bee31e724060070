"""Auditing the log: verify the hash chain, replay the state as of a moment, and read a
company's history."""
