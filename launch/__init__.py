"""Launchers: one process (local.py), several processes or hosts (multihost.py)."""
