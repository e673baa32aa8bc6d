"""Command-line entry points of nearid-reward."""
