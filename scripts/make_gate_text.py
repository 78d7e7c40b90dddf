"""Write training data for the demo donors' tasks, for `moe-surgeon gates train`.

  python scripts/make_gate_text.py arith train.jsonl --lines 4000 --seed 0   # {"prompt", "answer"}
  python scripts/make_gate_text.py arith train.txt                           # "12+7=19" lines
  python scripts/make_gate_text.py arith heldout.txt --held-out

Items look like the donors' training data ("12+7=" "19", "rev:abc=" "cba"): a .jsonl file gets
prompt/answer records (train them with --unit pairs, the loss on the answers), any other file one
line per item. The items of the built-in probe sets (surgeon/demo/probes/TASK.jsonl, which the
donors never saw) are skipped; with --held-out exactly those 200 items are written, so held-out
perplexity is measured on items neither the donors nor the gates were trained on (for pairs,
`--eval arith` reads the built-in set directly).
"""

import argparse
import json
import random
from pathlib import Path

PROBES = Path(__file__).resolve().parents[1] / "surgeon" / "demo" / "probes"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def item(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "arith":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}=", str(a + b)
    w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    return f"rev:{w}=", w[::-1]


def key(prompt: str):
    # 12+7 and 7+12 are one fact, as in scripts/make_demo_donors.py
    return frozenset(prompt.rstrip("=").split("+")) if "+" in prompt else prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["arith", "reverse"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--lines", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out", action="store_true", help="write the probe set's items instead")
    args = ap.parse_args()
    probes = [json.loads(line) for line in (PROBES / f"{args.task}.jsonl").read_text().splitlines() if line.strip()]
    if args.held_out:
        pairs = [(p["prompt"], p["answer"]) for p in probes]
    else:
        held = {key(p["prompt"]) for p in probes}
        rng = random.Random(args.seed)
        pairs = []
        while len(pairs) < args.lines:
            prompt, answer = item(args.task, rng)
            if key(prompt) not in held:
                pairs.append((prompt, answer))
    if args.out.suffix == ".jsonl":
        lines = [json.dumps({"prompt": p, "answer": a}) for p, a in pairs]
    else:
        lines = [p + a for p, a in pairs]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} items to {args.out}")


if __name__ == "__main__":
    main()
