"""Screenshots of a discover report for the README: the whole page and one node's card.

    .venv/bin/python scripts/screenshots.py [featcircuit-out/readme/task-is-not-none] [--node resid2/122]

The card is the drawn feature node whose rule label scores the highest held-out F1 (or
``--node``), so the picture shows a label worth reading next to its score and the evidence of its
edges. Writes ``docs/report.png`` and ``docs/report-card.png`` (headless Chromium through the
tests' selenium helper; needs ``chromium chromium-driver`` and selenium).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best_labelled_node(run: Path) -> str:
    """The feature node drawn in ``run/graph.json`` whose label has the highest held-out F1."""
    nodes = json.loads((run / "graph.json").read_text())["nodes"]
    scored = {n["id"]: n["label_f1"] for n in nodes if n.get("feature") is not None
              and n.get("label_f1") is not None}
    if not scored:
        raise SystemExit(f"screenshots: no drawn node of {run}/graph.json has a scored label "
                         "(discover --label-tokens 0?)")
    return max(scored, key=lambda n: scored[n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=str(ROOT / "featcircuit-out" / "readme" / "task-is-not-none"),
                    help="a discover output folder (report.html, graph.json)")
    ap.add_argument("--node", help="the node whose card is shown (default: the best-labelled node)")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    args = ap.parse_args()
    run = Path(args.run)
    html = run / "report.html"
    if not html.exists():
        raise SystemExit(f"screenshots: no report at {html}: run featcircuit discover first")
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import screenshot_report  # the tests' headless-Chromium helper

    node = args.node or best_labelled_node(run)
    docs = Path(args.docs)
    screenshot_report(html, docs / "report.png", width=1600, height=1000)
    screenshot_report(html, docs / "report-card.png", node=node, width=1600, height=1400)
    print(f"wrote {docs / 'report.png'} and {docs / 'report-card.png'} (card of {node}, from {html})")


if __name__ == "__main__":
    main()
