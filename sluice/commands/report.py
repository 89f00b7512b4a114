"""Rebuild a run's report from its files: RUN_DIR/report/{summary.json, report.md, *.png}.

Reads RUN_DIR/metrics.jsonl (the trainer's: one object per step, plus eval event lines),
RUN_DIR/config.yaml (written by the trainer, or the demo) and, when present, progress.jsonl,
workers.json and events.jsonl (written by sluice demo).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.add_argument("--eta", type=int, default=None, help="eta to report (default: config.yaml's)")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout")


def run(args: argparse.Namespace) -> int:
    from sluice.report import ReportError, build_report

    try:
        s = build_report(args.run_dir, out_dir=args.out, eta=args.eta)
    except ReportError as e:
        print(f"sluice report: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
    else:
        out = args.out or f"{args.run_dir}/report"
        print(
            f"reward {s['initial_reward']} -> {s['final_reward']} in {s['steps']} steps; "
            f"wrote {out}/report.md, summary.json and {len(s['plots'])} plots"
        )
    return 0
