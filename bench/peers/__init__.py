"""Peer systems streamd is compared with."""
