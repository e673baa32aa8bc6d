"""Test stand-in for Flow-Factory: only what a reward model meets (see tests/stubs/README.md)."""
