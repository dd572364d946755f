"""The streaming side of lum-stream: embedded broker, topic admin, producers, the agents (sequences, joiner),
replay and backfill, and ``lum status``."""
