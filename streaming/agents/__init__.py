"""Streaming agents: per-user sequences (``sequences``) and the label join (``joiner``).

    lum agents [--workers N] [--only sequences|joiner]     # N worker processes per agent, restarted if they die
    python -m streaming.agents.worker sequences --index 0   # one worker, what ``lum agents`` starts

Layout:
    ``store``       the runtime-neutral contract: ``Store`` (RocksStore / MemoryStore), ``Record``, ``Emit``,
                    ``Logic``; who calls what, when
    ``sequences``   the sequence agent as pure logic (``SequenceLogic``) and the ``user-sequences`` contract
    ``joiner``      the label join (its own RocksDB, hosted through an adapter until it is pure logic)
    ``worker``      the batch worker, the default runtime: consumer group, one store commit per batch,
                    outputs delivered before offsets are committed, any failure stops it without committing
    ``supervisor``  ``lum agents``: starts the workers, restarts dead ones with back-off
    ``runtime``     logic registry and test-only crash injection (``LUM_AGENT_CRASH_AT``)
    ``backfill``    ``lum backfill sequences``
    ``settings``    ``LUM_AGENT_*``

Delivery guarantees (worker runtime): state updates are exactly-once in effect (each batch's state and
input positions are one atomic, synced RocksDB write; replays are idempotent); outputs are at-least-once
(a crash between delivery and the offset commit re-sends them: ``user-sequences`` values are full
sequences, so a re-send changes nothing for readers; training examples carry ``example_id``). Measured
throughput and the profile of the batch path: ``benchmarks/bench_streaming.py``.
"""
