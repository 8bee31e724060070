"""The HTTP side: thin handlers, routes, the one error middleware."""
