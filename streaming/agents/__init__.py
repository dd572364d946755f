"""Streaming agents: per-user sequences (``sequences``) and the label join (``joiner``).

    lum agents [--workers N] [--only sequences|joiner]     # N worker processes per agent
    python -m streaming.agents.worker sequences --index 0   # one worker, what ``lum agents`` starts

Both agents run on ``streaming.agents.worker.Worker``: a confluent-kafka consumer group, batches of
``LUM_AGENT_BATCH_SIZE`` messages, one RocksDB (rocksdict) per partition written once per batch together
with the consumed offsets, outputs flushed before offsets are committed. ``sequences`` documents the
``user-sequences`` export contract the trainers read; ``joiner`` the join rules.

Why a plain consumer and not a Faust agent (``benchmarks/bench_streaming.py``, 200,000 events over
110,478 users, one run; 2 cores shared with the broker and other jobs, so figures move +-30% between
runs: the Faust no-op measured 2,970-6,375 and the 1-worker sequence agent 21,300-30,100 events/s):

    plain confluent-kafka consumer (no work)           112,168 events/s
    Faust no-op agent (Faust's own ceiling)              6,375 events/s
    sequence agent code hosted in Faust (take_events)    4,601 events/s   (72% of the no-op; 62-93% over runs)
    sequence agent, this worker, 1 worker               30,093 events/s   (4.7x the Faust no-op)
    sequence agent, 2 workers (total)                   39,124 events/s   (1.30x; ~42,000 events per CPU-second
                                                                           per worker vs 32,000 for 1 worker)
    joiner, 1 worker                                    25,665 events/s

Faust's per-event machinery costs more than all of the sequence agent's work, its table writes cost
~0.6 ms each, its exactly_once mode does not work on the embedded broker and its offsets are committed
apart from table state. The worker here batches the same way with state and offsets in one atomic write.
With 2 workers on 2 cores that the broker also uses, total throughput cannot double; events per
CPU-second per worker do not fall, so throughput scales with the cores given to the workers.
What bounds one worker (profile): Python work per event and per changed user, none dominant: JSON
decode+validate 12%, tokenize 10%, numpy merge 11%, encoding the sequence 17%, produce 7%, RocksDB 8%.
"""
