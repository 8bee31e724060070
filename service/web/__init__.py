"""The HTTP side: thin handlers, routes, the one request middleware."""
