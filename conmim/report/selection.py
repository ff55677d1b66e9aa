"""The selection stage of a two-stage sweep (:mod:`conmim.run.selection`) in the comparison's
report: each arm's chosen setting and the table it was chosen from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SELECTION_FILE = "selection.json"  # in the comparison's sweep folder, written by conmim.run.selection


def read_choice(sweep_dir: Path) -> Optional[dict]:
    p = Path(sweep_dir) / SELECTION_FILE
    return json.loads(p.read_text()) if p.exists() else None


def selection_markdown(choice: dict) -> str:
    """Each arm's chosen setting and the selection table (for the comparison's report)."""
    pct = 100 if choice["metric"].endswith("_top1") else 1
    lines = ["## Selection: each arm at its own best setting", "",
             f"Every arm was tried at every setting of the same budget on selection seeds {choice['seeds']} (not "
             f"used by the comparison); its setting is the best mean `{choice['metric']}` ({choice['mode']}, "
             f"validation split){' in %' if pct == 100 else ''}, never a diverged one while a stable one exists.", ""]
    if choice["all_diverged"]:
        lines += [f"**⚠ Every setting of the budget diverged for: {', '.join(choice['all_diverged'])}.** Their rows "
                  f"measure an arm that is unstable at every setting tried, which is the answer the budget gives.", ""]
    lines += ["| arm | setting | mean | sd | per seed | diverged | failed | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in choice["table"]:
        f = lambda x: "–" if x is None or x != x else f"{pct * x:.2f}"  # noqa: E731
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        same = f" (same experiment as {', '.join(r['same_as'])})" if r.get("same_as") else ""
        seeds = ", ".join(f"{s}: {f(v)}" for s, v in sorted(r["values"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['arm']} | {setting}{same} | {f(r['mean'])} | {f(r['sd'])} | {seeds} | {r['diverged']} | "
                     f"{r['failed']} | {'**chosen**' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"
