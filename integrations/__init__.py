"""Adapters that plug nearid-reward into host training code, unforked: the diffusers DreamBooth family (launcher and
hooks), Flow-Factory (a reward class named in its YAML), and RL frameworks in their own environments (the reward server
and its client)."""
