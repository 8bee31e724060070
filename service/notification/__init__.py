"""IP-violation emails: the notifier that follows the log, and the messages it sends."""
