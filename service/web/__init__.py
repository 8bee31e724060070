"""The HTTP side: thin handlers, routes, and what every request goes through (middleware.py)."""
