"""Serialisation: protocol messages to frames, payloads to bytes (in the sender's thread)."""
