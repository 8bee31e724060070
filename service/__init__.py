"""Tollgate: an event-sourced OAuth 2.0 token and policy service."""
