#!/bin/sh
# One-shot job of the local community (compose.yaml `demo-data`): give each demo
# volunteer its own generated training data, the way `loracommons demo` does.
#
#   demo-data.sh DIR...    volunteer i of N gets DIR_i/train.jsonl (+ heldout.jsonl)
#                          with its share of the demo's skills (non-IID); a DIR
#                          that already holds train.jsonl is left as it is.
# Environment: LC_DEMO_EXAMPLES [2000] training examples per volunteer,
#              LC_DEMO_SEED [0].
# Real volunteers bring their own file instead (mounted read-only at /data).
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: demo-data.sh DIR..." >&2
    exit 2
fi

exec python - "$@" <<'PY'
import json
import os
import sys
from pathlib import Path

from loracommons.demo.skills import make_examples, skills_for_volunteer

dirs = [Path(d) for d in sys.argv[1:]]
n_train = int(os.environ.get("LC_DEMO_EXAMPLES") or 2000)
seed = int(os.environ.get("LC_DEMO_SEED") or 0)
n_heldout = max(1, n_train // 10)
for i, folder in enumerate(dirs):
    target = folder / "train.jsonl"
    if target.exists():
        print(f"demo-data: {target} exists, kept", file=sys.stderr)
        continue
    folder.mkdir(parents=True, exist_ok=True)
    skills = skills_for_volunteer(i, len(dirs))
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        rows = []
        for skill in skills:
            heldout = make_examples(skill, n_heldout, seed, "heldout")
            rows += heldout if split == "heldout" else make_examples(
                skill, n // len(skills), seed, "train", exclude={e["input"] for e in heldout})
        tmp = folder / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(folder / f"{split}.jsonl")  # train.jsonl last: its presence means done
    print(f"demo-data: {target}: {n_train} examples of {', '.join(skills)}", file=sys.stderr)
PY
