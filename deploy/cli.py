"""``lum``: the one command for users. Subcommands are contributed by each package's ``cli`` module.

    lum --help
    lum broker --port 9092
    LUM_KAFKA_BOOTSTRAP=kafka:9092 lum topics create

Each contributing module has ``register(subparsers, common)``; ``common`` is a parent parser holding the
options every command takes (``--bootstrap``, ``--log-level``). Handlers import heavy libraries (torch,
torchrec, confluent-kafka) lazily, so ``lum --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from schemas.logs import setup_logging

COMMAND_MODULES = ("streaming.cli", "streaming.ops_cli", "streaming.status", "trainers.lum.cli", "trainers.dlrm.cli",
                   "deploy.demo")


# Every settings class, for ``lum config`` (module, class): what each process reads from the environment.
SETTINGS_CLASSES = (("schemas.settings", "KafkaSettings"), ("streaming.agents.settings", "AgentSettings"),
                    ("trainers.lum.pretrain", "PretrainSettings"), ("trainers.lum.refresh", "RefreshSettings"),
                    ("trainers.dlrm.cli", "DLRMSettings"), ("deploy.demo", "DemoSettings"),
                    ("schemas.metrics", "MetricsSettings"), ("schemas.logs", "LogSettings"))


def _config(args: argparse.Namespace) -> int:
    """Print every setting: environment variable, default, meaning (Markdown, as in the README)."""
    from schemas.settings import settings_help

    for module, name in SETTINGS_CLASSES:
        cls = getattr(importlib.import_module(module), name)
        print(f"\n#### {name} ({module})\n\n| variable | default | meaning |\n|---|---|---|")
        for env, default, doc in settings_help(cls):
            print(f"| `{env}` | `{default}` | {doc} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bootstrap", help="Kafka bootstrap servers (default: $LUM_KAFKA_BOOTSTRAP or 127.0.0.1:9092)")
    # SUPPRESS: a subcommand's copy of the option must not reset `lum --log-level X COMMAND` to its default.
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        help="logging level (default: $LUM_LOG_LEVEL or INFO)")
    parser = argparse.ArgumentParser(prog="lum", description="lum-stream: streaming continuous training with a "
                                     "Large User Model on Kafka.", parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("config", parents=[common], help="list every setting with its environment variable and default"
                   ).set_defaults(handler=_config)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bootstrap:
        os.environ["LUM_KAFKA_BOOTSTRAP"] = args.bootstrap  # every settings class reads it from here
    args.log_level = logging.getLevelName(setup_logging(getattr(args, "log_level", None)))  # a name again, for child commands
    from pydantic import ValidationError
    from pydantic_settings import SettingsError as SourceError

    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValidationError, SourceError) as e:
        # Settings built without schemas.settings.load: still one readable line, never a traceback. The
        # error's title says which settings class; inputs are not echoed (they may hold secrets).
        title = getattr(e, "title", type(e).__name__)
        if isinstance(e, ValidationError) and not title.endswith("Settings"):
            raise  # a bug's validation error, not configuration
        fields = ", ".join(".".join(str(p) for p in err["loc"]) for err in e.errors(include_url=False)) \
            if isinstance(e, ValidationError) else str(e)
        print(f"lum: invalid configuration ({title}): {fields}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
