"""Command line: parse, load settings, call the one function that does the work.

    llm-streams worker [--pipeline NAME] [--config PATH] [--log-format text|json]
    llm-streams pipeline render NAME --event JSON|@FILE [--call] [--config PATH]
    llm-streams batch REQUESTS.jsonl --save SAVE.jsonl [--errors ERRORS.jsonl] [--config PATH]
    llm-streams mock-llm [--port] [--latency-ms] [--jitter-ms] [--error-rate]
                         [--status-on-error] [--retry-after] [--faults MIX] [--hang-seconds]
                         [--invalid-share] [--embed-input-ms]
    llm-streams dlq inspect [--limit N] [--pipeline NAME] [--config PATH]
    llm-streams dlq replay [--error-type T] [--since TIME] [--dry-run] [--pipeline NAME]
                           [--config PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from streams.config import Settings, load_settings
from streams.errors import ConfigError, StartupError
from streams.logs import setup_logging


def _start(args: argparse.Namespace, level: str | None = "WARNING", check: bool = True,
           ) -> Settings:
    """Settings and logging (``level`` None: the configured one); with ``check``, one Kafka
    connection that stops the command with one line on wrong credentials."""
    settings = load_settings(args.config)
    setup_logging(level or settings.worker.log_level, args.log_format, settings.secret_values())
    if check:
        from streams.kafka_io import check_kafka

        asyncio.run(check_kafka(settings))
    return settings


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _start(args, level=None, check=False)  # the worker checks Kafka and Redis
    from streams.intake.worker import run_worker  # faust is heavy to import: only when needed

    if not settings.pipelines and args.pipeline is None:
        return run_worker(settings)
    from streams.pipelines.compiled import compile_all, find, pipeline_settings
    from streams.pipelines.front import PipelineFront

    pipes = {p.name: p for p in compile_all(settings)}  # a broken one stops every worker: exit 2
    if args.pipeline is None:
        return run_worker(settings)
    pipe = pipes[find(settings, args.pipeline).name]
    wsettings = pipeline_settings(settings, pipe.cfg)
    return run_worker(wsettings, lambda registry: PipelineFront(pipe, wsettings, registry))


def cmd_pipeline_render(args: argparse.Namespace) -> int:
    settings = _start(args, check=False)
    from streams.pipelines.render import read_event, render

    print(asyncio.run(render(settings, args.name, read_event(args.event), args.call)))
    return 0


def _dlq_settings(args: argparse.Namespace) -> Settings:
    """The settings whose topics a dlq command reads: with --pipeline, that pipeline's."""
    settings = _start(args)
    if args.pipeline is None:
        return settings
    from streams.pipelines.compiled import find, pipeline_settings

    return pipeline_settings(settings, find(settings, args.pipeline))


def cmd_batch(args: argparse.Namespace) -> int:
    settings = _start(args)
    from streams.tools.batch import run_batch

    summary = asyncio.run(
        run_batch(settings, Path(args.requests), Path(args.save),
                  Path(args.errors) if args.errors else None, timeout=args.timeout)
    )
    return 3 if summary.missing else (1 if summary.failed else 0)


def cmd_mock(args: argparse.Namespace) -> int:
    from mockllm.server import MockBehaviour, run_mock

    behaviour = MockBehaviour(
        latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, error_rate=args.error_rate,
        status_on_error=args.status_on_error, retry_after=args.retry_after,
        faults=args.faults, hang_seconds=args.hang_seconds, invalid_share=args.invalid_share,
        embed_input_ms=args.embed_input_ms,
    )
    run_mock(args.host, args.port, behaviour)
    return 0


def cmd_dlq_inspect(args: argparse.Namespace) -> int:
    settings = _dlq_settings(args)
    from rich.console import Console

    from streams.tools.dlq import print_inspection, read_dead_letters

    letters = asyncio.run(read_dead_letters(settings, limit=args.limit))
    print_inspection(Console(), settings.topics.dead_letter, letters)
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    settings = _dlq_settings(args)
    from streams.tools.dlq import plan_replay, publish_replay, read_dead_letters, replay_summary

    letters = asyncio.run(read_dead_letters(settings))
    plan = plan_replay(
        letters, settings.topics.dead_letter, settings.worker.dlq_raw_limit_bytes,
        error_type=args.error_type, since_ms=args.since,
    )
    replayed = 0 if args.dry_run else asyncio.run(publish_replay(settings, plan))
    print(replay_summary(plan, replayed, args.dry_run))
    return 0


def _since(text: str) -> int:
    from streams.tools.dlq import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _faults(text: str) -> dict[str, float]:
    from mockllm.server import parse_faults

    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-streams", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config file (default: built-in local defaults)")
        sp.add_argument("--log-format", choices=("text", "json"), default="text")

    w = sub.add_parser("worker", help="run the stream processor until SIGINT/SIGTERM")
    common(w)
    w.add_argument("--pipeline", metavar="NAME", help="run this pipeline (config pipelines:)")
    w.set_defaults(func=cmd_worker)

    pl = sub.add_parser("pipeline", help="work on a configured pipeline")
    plsub = pl.add_subparsers(dest="pipeline_command", required=True)
    pr = plsub.add_parser("render", help="print the request an event renders to (--call: "
                                         "send it and print the validated output)")
    pr.add_argument("name", help="the pipeline's name")
    pr.add_argument("--event", required=True, metavar="JSON|@FILE",
                    help="the event: JSON text or @file (a .jsonl file's first line)")
    pr.add_argument("--call", action="store_true", help="send it and print the output record")
    common(pr)
    pr.set_defaults(func=cmd_pipeline_render)

    b = sub.add_parser("batch", help="publish a JSONL file of requests and collect the answers")
    b.add_argument("requests", help="JSONL file, one request object per line")
    b.add_argument("--save", required=True, help="where to write responses (JSONL)")
    b.add_argument("--errors", help="where to write dead letters (JSONL)")
    b.add_argument("--timeout", type=float, default=3600.0, help="give up after SECONDS")
    common(b)
    b.set_defaults(func=cmd_batch)

    m = sub.add_parser("mock-llm", help="serve an OpenAI-compatible mock endpoint")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8001)
    m.add_argument("--latency-ms", type=float, default=0.0)
    m.add_argument("--jitter-ms", type=float, default=0.0)
    m.add_argument("--error-rate", type=float, default=0.0)
    m.add_argument("--status-on-error", type=int, default=500)
    m.add_argument("--retry-after", type=float, default=None)
    m.add_argument("--faults", type=_faults, default={}, metavar="MIX",
                   help="chaos mix, e.g. 500=0.2,429=0.1,hang=0.05,reset=0.05")
    m.add_argument("--hang-seconds", type=float, default=300.0)
    m.add_argument("--invalid-share", type=float, default=0.0,
                   help="share of structured answers that are invalid (repair tests)")
    m.add_argument("--embed-input-ms", type=float, default=0.0,
                   help="/v1/embeddings: cost per input, on top of --latency-ms per call")
    m.set_defaults(func=cmd_mock)

    d = sub.add_parser("dlq", help="inspect or replay the dead-letter topic")
    dsub = d.add_subparsers(dest="dlq_command", required=True)
    di = dsub.add_parser("inspect", help="dead letters grouped by error type and endpoint")
    di.add_argument("--limit", type=_positive, default=None, help="read at most N records")
    di.add_argument("--pipeline", metavar="NAME", help="that pipeline's dead-letter topic")
    common(di)
    di.set_defaults(func=cmd_dlq_inspect)
    dr = dsub.add_parser("replay", help="republish dead letters' original requests")
    dr.add_argument("--error-type", choices=("validation", "upstream", "exhausted", "expired",
                                             "internal", "template", "invalid_output"),
                    help="only this error type (validation and template are replayed only "
                         "when named)")
    dr.add_argument("--pipeline", metavar="NAME",
                    help="that pipeline's dead letters, republished to its source")
    dr.add_argument("--since", type=_since, default=None, metavar="TIME",
                    help="only dead letters failed at or after TIME (ISO 8601 or epoch ms)")
    dr.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    common(dr)
    dr.set_defaults(func=cmd_dlq_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"llm-streams: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"llm-streams: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
