"""Benchmark: ckdiff beside what a user would otherwise run, on the same pairs, as a table.

The peers are the scripts the JetStream checkpoint guide suggests for checking a conversion, in the two
forms people write them:
  load_file  ``safetensors.torch.load_file`` of both files, then ``torch.equal`` per tensor and the
             maximum absolute difference where they are not equal (holds both models in memory)
  safe_open  the same per tensor through ``safe_open(...).get_tensor`` (one tensor of each side at a time)
Each verdict is checked against what the pair is: ``copy`` and ``cast`` (bf16 -> fp16, within the cast's
rounding) are the same model, ``one`` (one element changed), ``all`` (every element changed by ~1%) and
``perm`` (every q_proj's rows in another order) are not. A tool's row is ``right`` when its verdict matches, so the table shows speed and correctness
side by side. Every run is a fresh process (start-up included: that is what a user waits for), the page
cache warm; the row is the median wall of ``--repeat`` runs and the highest peak RssAnon.

    python bench/bench_peers.py [--sizes 1] [--cases copy,one,all,cast,perm] [--repeat 3] [--dir DIR] [--keep]

The pairs are made as in bench_compare.py (generated bf16 Llama-shaped HF directories).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compare import MAIN, make_b  # noqa: E402
from common import (add_dir_keep, checkout_env, child_peak_rss_anon, discard, human, median, out_dir,  # noqa: E402
                    sized_model, write_model)

SAME = {"copy": True, "cast": True, "one": False, "all": False, "perm": False}

LOAD_FILE = r"""
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
bad, worst = 0, 0.0
for k in sorted(set(a) | set(b)):
    if k not in a or k not in b:
        bad += 1
    elif not torch.equal(a[k], b[k]):
        bad += 1
        worst = max(worst, (a[k].float() - b[k].float()).abs().max().item() if a[k].shape == b[k].shape
                    else float("inf"))
print("SAME" if bad == 0 else f"DIFFER {bad} tensors, max abs {worst}")
"""

SAFE_OPEN = r"""
import sys, torch
from safetensors import safe_open
bad, worst = 0, 0.0
with safe_open(sys.argv[1], "pt") as fa, safe_open(sys.argv[2], "pt") as fb:
    ka, kb = set(fa.keys()), set(fb.keys())
    bad += len(ka ^ kb)
    for k in sorted(ka & kb):
        x, y = fa.get_tensor(k), fb.get_tensor(k)
        if not torch.equal(x, y):
            bad += 1
            worst = max(worst, (x.float() - y.float()).abs().max().item() if x.shape == y.shape else float("inf"))
print("SAME" if bad == 0 else f"DIFFER {bad} tensors, max abs {worst}")
"""


def tools(a: Path, b: Path) -> dict:
    """name -> (argv, parse(stdout, returncode) -> says the pair is the same model)."""
    fa, fb = a / "model.safetensors", b / "model.safetensors"
    naive = lambda out, rc: out.strip().startswith("SAME")  # noqa: E731
    return {"ckdiff": ([sys.executable, "-c", MAIN, str(a), str(b), "-q", "--no-github-summary"],
                       lambda out, rc: rc == 0),
            "load_file": ([sys.executable, "-c", LOAD_FILE, str(fa), str(fb)], naive),
            "safe_open": ([sys.executable, "-c", SAFE_OPEN, str(fa), str(fb)], naive)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dir_keep(p)
    p.add_argument("--sizes", default="1", help="GiB per side, comma separated")
    p.add_argument("--cases", default=",".join(SAME), help="comma separated, of " + ",".join(SAME))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    out = out_dir(args.dir)
    env = checkout_env()
    import compileall  # an installed ckdiff has its bytecode compiled; a checkout run under
    # PYTHONDONTWRITEBYTECODE would otherwise compile its modules in every timed process
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "ckdiff"), quiet=1)
    print(f"machine: {os.cpu_count()} cores; each row: the median wall of {args.repeat} fresh processes, "
          "the highest peak RssAnon")
    print(f"{'size':>8} {'case':5} {'tool':10} {'wall':>7} {'vs ckdiff':>9} {'peak RssAnon':>13}  verdict")
    for gib in [float(s) for s in args.sizes.split(",")]:
        cfg, tensors, size = sized_model(gib, out, 3)
        a = out / f"a-{gib:g}"
        if not (a / "config.json").exists():
            write_model(a, tensors, cfg)
        for case in args.cases.split(","):
            b = out / f"b-{gib:g}-{case}"
            make_b(case, a, b, tensors, cfg, env)
            rows = {}
            for _ in range(args.repeat):  # interleaved, so a change in machine state hits every tool alike
                for name, (argv, same) in tools(a, b).items():
                    wall, peak, rc, stdout, err = child_peak_rss_anon(argv, env=env)
                    rows.setdefault(name, []).append((wall, peak, same(stdout, rc), rc, stdout.strip()[:40]))
            base = median(r[0] for r in rows["ckdiff"])
            for name, runs in rows.items():
                wall = median(r[0] for r in runs)
                peak = max(r[1] for r in runs)
                says = runs[-1][2]
                right = "right" if says == SAME[case] else "WRONG"
                print(f"{human(size):>8} {case:5} {name:10} {wall:6.2f}s {wall / base:8.2f}x {peak:9.0f} MiB  "
                      f"{'same' if says else 'differ'} ({right})", flush=True)
            discard(args.keep, b)
        discard(args.keep, a)


if __name__ == "__main__":
    main()
