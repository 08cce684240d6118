"""Integrations that other tools load through their plugin mechanisms (they use the `dvlm.load` facade)."""
