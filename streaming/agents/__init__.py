"""Streaming agents: per-user sequences (``sequences``) and the label join (``joiner``).

    lum agents [--workers N] [--only sequences|joiner]     # N worker processes per agent
    python -m streaming.agents.worker sequences --index 0   # one worker, what ``lum agents`` starts

Both agents run on ``streaming.agents.worker.Worker`` (confluent-kafka consumer group, one RocksDB per
partition written once per batch together with the consumed offsets). See ``sequences`` for the
``user-sequences`` export contract the trainers read, and ``joiner`` for the join rules.
"""
