"""Run under torchrun by the pre-training tests: several ``pretrain.run`` jobs in one launch (starting torchrun
and importing torch dominate a small job's time).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/trainers/lum/pretrain_ranks.py \
        SOURCE '[["debug", "OUT", 6, false], [null, "OUT2", 9, true]]'     # [preset, out, max_steps, resume]

Settings come from ``LUM_PRETRAIN_*`` (e.g. ``LUM_PRETRAIN_PARALLEL=fsdp``); progress lines go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from schemas.settings import load  # noqa: E402
from trainers.launch import shutdown  # noqa: E402
from trainers.lum.pretrain import PretrainSettings, run  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source, jobs = sys.argv[1], json.loads(sys.argv[2])
    try:
        for preset, out, max_steps, resume in jobs:
            run(preset, source, out, max_steps, load(PretrainSettings), resume=resume)
    finally:
        shutdown()
