"""Flows and pages driven in real headless Chromium."""
