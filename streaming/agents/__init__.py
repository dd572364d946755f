"""Streaming agents: per-user sequences (``sequences``) and the label join (``joiner``).

    lum agents [--runtime worker|faust] [--workers N] [--only sequences|joiner]   # restarted if they die
    python -m streaming.agents.worker sequences --index 0       # one batch worker, what ``lum agents`` starts
    python -m streaming.agents.faust_app sequences --index 0    # one Faust worker (``--runtime faust``)

Layout:
    ``store``       the runtime-neutral contract: ``Store`` (RocksStore / MemoryStore), ``Record``, ``Emit``,
                    ``Logic``; who calls what, when
    ``sequences``   the sequence agent as pure logic (``SequenceLogic``); it exports deltas (``schemas.seqexport``)
    ``join_logic``  the label join as pure logic (``JoinLogic``, key scheme ``JoinKeys``, ``joiner-changelog``)
    ``joiner``      the joiner's runtime adapter (item-embedding side input, high-water marks)
    ``faust_app``   the Faust runtime: one App per agent hosting the same logic over the same stores
    ``worker``      the batch worker, the default runtime: consumer group, one store commit per batch,
                    outputs delivered before offsets are committed, any failure stops it without committing
    ``supervisor``  ``lum agents``: starts the workers, restarts dead ones with back-off
    ``runtime``     logic registry and test-only crash injection (``LUM_AGENT_CRASH_AT``)
    ``backfill``    ``lum backfill sequences``
    ``settings``    ``LUM_AGENT_*``

Delivery guarantees (worker runtime): state updates are exactly-once in effect (each batch's state and
input positions are one atomic, synced RocksDB write; replays are idempotent); outputs are at-least-once
(a crash between delivery and the offset commit re-sends them: readers fold ``sequence-deltas`` by event
key, so a re-sent delta changes nothing; training examples carry ``example_id``, which the trainer dedups). Measured
throughput and the profile of the batch path: ``benchmarks/bench_streaming.py``.
"""
