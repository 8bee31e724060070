"""Pure rules: what may happen to applications, credentials and tokens. No I/O here."""
