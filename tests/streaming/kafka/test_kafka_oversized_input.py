"""The issue's scenario, client-layer half: a 2 MB garbage message among valid events on one partition.
Its dead letter is bounded (so it fits the dead-letter topic), the agent stays alive and applies every
valid event, and every bad message reaches dead-letters with its reason, size and hash."""

import hashlib

from schemas.codec import decode
from schemas.deadletter import DeadLetter
from schemas.settings import load
from schemas.topics import BEHAVIORS, DEAD_LETTERS, key_of
from streaming.agents.sequences import expected_sequences, snapshot
from streaming.agents.settings import AgentSettings
from streaming.kafka import Output, read_to_end, reader


def test_agent_survives_an_oversized_bad_message_and_dead_letters_it(kafka, kit, tmp_path):
    valid = [kit.behavior(i, 7, t=i * 100) for i in range(30)]
    bad = [b"\x00" * 2_000_000, b"not json", b"", b"L", b"Lj\x01{}", BEHAVIORS.encode(valid[0])[:-3]]
    out = Output(kafka, **{"message.max.bytes": 3_000_000})  # a producer with a larger limit wrote it
    topic = kafka.topic(BEHAVIORS)
    for i, e in enumerate(valid):
        out.produce(topic, BEHAVIORS.encode(e), key_of(7), partition=0)
        if i % 5 == 0 and i // 5 < len(bad):
            out.produce(topic, bad[i // 5], key_of(7), partition=0)
    out.flush(30)
    cfg = load(AgentSettings, data_dir=tmp_path, batch_size=10, log_interval_s=1)
    with kit.ThreadWorker("sequences", kafka, cfg) as w:
        kit.wait_for(lambda: snapshot(kafka)[0] == expected_sequences(valid), timeout=60, what="30 valid applied")
        kit.wait_for(lambda: w.dead.total == len(bad), timeout=30, what="6 dead letters")
    c = reader(kafka)
    letters = [decode(DeadLetter, m.value()) for m in read_to_end(c, kafka.topic(DEAD_LETTERS))]
    c.close()
    assert len(letters) == len(bad)
    big = letters[0]
    assert big.truncated and big.value_size == 2_000_000 and str(kafka.dead_letter_max_bytes) in big.error
    assert big.value_sha256 == hashlib.sha256(bad[0]).hexdigest()
    assert [x.value_size for x in letters] == [len(b) for b in bad] and all(x.error for x in letters)
