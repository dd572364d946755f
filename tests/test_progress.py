"""schemas.progress: a tqdm bar with rate and ETA on a terminal, periodic log lines otherwise."""

import logging
import re
import time

from schemas.progress import progress


def test_log_lines_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="lum.progress")
    with progress("replay behaviors", total=400, unit="records", every_s=0.01, tty=False) as p:
        for _ in range(4):
            time.sleep(0.02)
            p.update(100)
            p.note(kept=7)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) >= 2  # periodic lines and the final one
    assert lines[-1].startswith("replay behaviors: 400/400 records (100.0%), ")
    assert "/s, ETA 0:00:00, kept 7" in lines[-1]
    assert "ETA" in lines[0]


def test_unknown_total_has_a_rate_but_no_eta(caplog):
    caplog.set_level(logging.INFO, logger="lum.progress")
    with progress("produce", unit="events", tty=False) as p:
        p.update(250)
    assert caplog.records[-1].getMessage().startswith("produce: 250 events, ")
    assert "ETA" not in caplog.records[-1].getMessage()


def test_terminal_gets_a_bar_with_rate_and_eta(capsys):
    with progress("pretrain", total=50, unit="steps", tty=True) as p:
        assert p.bar is not None
        for _ in range(50):
            p.update(1)
        logging.getLogger("lum.test").warning("a line while the bar is drawn")
    err = capsys.readouterr().err
    assert re.search(r"pretrain: 100%.*50(\.0)?/50(\.0)? \[00:00<00:00, [\d.]+k?steps/s\]", err), err  # count, ETA, rate
