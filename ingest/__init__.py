"""Ingest side: frame sources, the line simulator and the ingest edge."""
