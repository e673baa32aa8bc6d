"""Adapters that plug nearid-reward into host training scripts (the diffusers DreamBooth family), unforked."""
