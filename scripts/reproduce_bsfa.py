#!/usr/bin/env python3
"""The BSFA study of issue #29: does AdamMini-BSFA reach a tuned baseline's loss in half the
steps, at 9 and 44 tokens per parameter?

Model and data: a 2-layer LLaMA, hidden 64, 4 heads, MLP 172, on a 1,024-token byte-level BPE
trained on the study's training text (230,208 parameters, 99,136 = 43.1% of them in the norm,
attention and MLP blocks BSFA covers; printed at the start); the Vim documentation (Debian
package `vim-runtime`) split by file, 3.87M training and 0.19M validation tokens; batch
16 x 128 tokens. Horizons N = 1000 (8.9 tokens per parameter) and N = 5000 (44.5).

Protocol (scripts/bsfa_study/protocol.py has the details; docs/bsfa.md the reasons):
- Schedules: every run has its own full schedule, linear warm-up then cosine to lr/20 over its
  own length; the warm-up is fixed in steps per horizon, N/20 (50 and 250 steps), for the N/2,
  3N/4 and N runs alike (as the paper keeps 500 steps for its 50k and 100k runs).
- AdamW and Adam-mini: learning rate tuned at N on a grid of factors of 2 (3e-3 * 2**e), three
  values first, widened while the best is at an edge; then N/2, 3N/4 and N on each seed.
- AdamMini-BSFA (k 50, l 60, T 10) at N/2: rate (factors of 2 around Adam-mini's tuned rate)
  x gamma {1, 1.25, 1.5, 2, 3} at alpha 0.5, then alpha 1 and 0.2 at the best rate and the
  gammas around the best; every axis widened at its edges (at most 3 rounds). At N = 5000 the
  search starts from N = 1000's choice: 3 rates x 3 gammas at its alpha, then the other two
  alphas. AdamW-BSFA: its rate (around AdamW's) tuned the same way, gamma and alpha carried
  over. Reported at N/2 and N with the setting tuned at N/2.
- All tuning is on seed 1000, which is never reported; seeds 0, 1, 2 are reported.
- Control: Adam-mini at BSFA's tuned rate and at that rate times gamma (N/2). Ablations (N/2):
  BSFA's blocks as the Adam-mini partition (`bsfa.partition=adam-mini`) and the first
  projection once the history holds k updates (`bsfa.first_projection=rank_updates`).
- Scoring: every run evaluates every N/20 steps on 8 fixed validation batches
  (`train.eval_seed=0`, the same windows for every seed); its final checkpoint is kept and
  scored by `bsfa-train eval` on the whole validation split, the number every table uses.

Budget (`--estimate` prints it). Measured: 200 steps of one run take 13.7-13.9 s of CPU for
AdamW / Adam-mini and 15.1 s with BSFA (one thread, the other core busy with a second run;
37-45 s of wall time while the machine was shared), 22 s with Adam-mini blocks; an 8-batch
evaluation 0.23 s. Before any widening the study is 138 runs and 5.7 CPU hours (N = 1000: 72
runs, 1.1 h; N = 5000: 66 runs, 4.6 h), 2.8 hours on two cores running one run each (longer
while other work shares the machine); each widening round adds one or two runs to a search. Cuts made to fit
about 3 hours: the BSFA search is a coordinate search (rate x gamma at one alpha, then the other
alphas around the best) instead of the full rate x gamma x alpha grid (45 runs per horizon); at
N = 5000 it starts from N = 1000's choice (9 + 6 runs instead of 21); BSFA@N and AdamW-BSFA use
the setting tuned at N/2; the baselines' rate is tuned at N only and used at N/2 and 3N/4; the
control and the ablations run at N/2 only. Not cut: 3 reported seeds for every arm at both
horizons. Next cuts if needed: 2 seeds at N = 1000 (`--seeds`), no alpha 1.

Resumable: every run's folder (OUT/runs/h<N>/<name>/) keeps its checkpoint and, once scored,
its `result.json`; a second invocation skips finished runs, resumes stopped ones from their
checkpoint, and makes the same choices from the same results. SIGINT / SIGTERM make the runs
checkpoint and the study exit. The binary's sha256 and git commit are recorded in
OUT/study.json and in every result; a study refuses to continue with another binary unless
`--new-binary` is given.

    python3 scripts/reproduce_bsfa.py --bin /work/bsfa-study/bin/bsfa-train \\
        --out /work/bsfa-study/out --jobs 2          # the full study, or its resumption
    python3 scripts/reproduce_bsfa.py --out DIR --report   # tables of what has finished
    python3 scripts/reproduce_bsfa.py --estimate     # the plan's runs and CPU time
    python3 scripts/reproduce_bsfa.py --quick --out target/reproduce-bsfa-quick   # CI smoke

Writes OUT/results.json (every run, the choices, the readout), OUT/results.md (the tables) and
OUT/curves-h<N>.png. Everything after `--` is passed to every training run.
"""

import argparse
import os
import shutil
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bsfa_study import protocol, readout, runner  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/reproduce-bsfa", help="output folder")
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    p.add_argument("--bin", default=os.path.join(target, "release", "bsfa-train"),
                   help="the bsfa-train binary (default: cargo's release build)")
    p.add_argument("--bin-commit", help="the git commit the binary was built from (default: "
                   "BIN.commit, or this tree's HEAD for a binary inside it)")
    p.add_argument("--new-binary", action="store_true",
                   help="continue a study with a binary other than the one it started with")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on cores/jobs threads)")
    p.add_argument("--horizons", help="N values, comma-separated (default 1000,5000)")
    p.add_argument("--seeds", help="reported seeds per arm (default 3)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run of the pipeline")
    p.add_argument("--paper", action="store_true",
                   help="the protocol on LLaMA-72M / WikiText-103 (preset llama72m; a GPU)")
    p.add_argument("--paper-val", default="shards:" + os.path.expanduser(
        "~/.cache/huggingface/hub/bsfa-train/wikitext103-gpt2"), help="--paper: validation shards")
    p.add_argument("--estimate", action="store_true", help="print the plan's CPU time and exit")
    p.add_argument("--report", action="store_true", help="write the tables of finished runs only")
    p.add_argument("extra", nargs="*", help="after --: flags for every training run")
    return p.parse_args()


def print_estimate(settings, jobs):
    rows = protocol.estimate(settings)
    total_runs = sum(r[2] for r in rows)
    total = sum(r[3] for r in rows)
    for h in settings.horizons:
        part = [r for r in rows if r[0] == h]
        print(f"N = {h}: {sum(r[2] for r in part)} runs, {sum(r[3] for r in part) / 3600:.2f} CPU h")
        for _, label, runs, cpu in part:
            print(f"  {runs:4d} runs {cpu / 60:7.1f} CPU min  {label}")
    print(f"total: {total_runs} runs, {total / 3600:.2f} CPU hours, {total / 3600 / jobs:.2f} h "
          f"on {jobs} cores (before widening)")


def main():
    args = parse_args()
    settings = protocol.Settings(args)
    if args.estimate:
        print_estimate(settings, args.jobs)
        return
    if not os.path.exists(args.bin):
        sys.exit(f"no binary at '{args.bin}': run `cargo build --release` (or scripts/reproduce_bsfa.sh)")
    os.makedirs(args.out, exist_ok=True)
    if args.quick:
        # The smoke run starts over whenever the binary changed (CI rebuilds it).
        args.new_binary = True
        study = os.path.join(args.out, "study.json")
        if os.path.exists(study) and runner.sha256(args.bin) not in open(study).read():
            for stale in ("runs", "decisions.json", "study.json"):
                path = os.path.join(args.out, stale)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
    started = time.time()
    run = runner.Runner(args, settings)
    binaries = run.record_binary()
    data = None if args.paper else run.prepare_data()
    size = run.model_size()
    print(f"model: {size['parameters']:,} parameters, {size['bsfa_covered']:,} in BSFA's blocks "
          f"({100 * size['bsfa_share']:.1f}%); binary {binaries[-1]['commit']}", file=sys.stderr)
    if data:
        print(f"data: {data['train_tokens']:,} training, {data['val_tokens']:,} validation tokens "
              f"({data['val_bytes_per_token']:.2f} bytes per token)", file=sys.stderr, flush=True)
    stopped = None
    if not args.report:
        signal.signal(signal.SIGINT, run.stop)
        signal.signal(signal.SIGTERM, run.stop)
        try:
            protocol.Study(run, settings).run()
        except runner.Interrupted:
            stopped = "interrupted"
        except Exception as err:  # a failed run: report what has finished, then the error
            stopped = f"failed: {err}"
    result = readout.Readout(os.path.abspath(args.out), settings, size)
    _, text = result.write({"binary": binaries[-1], "binaries": binaries, "model": size,
                            "data": data, "settings": settings.public(),
                            "complete": stopped is None and not args.report})
    print(text)
    if not args.report and stopped is None:
        plot(run, result, settings)
    minutes = (time.time() - started) / 60
    if stopped:
        sys.exit(f"{stopped} after {minutes:.1f} min; rerun the same command to resume")
    print(f"study {'report' if args.report else 'finished'} in {minutes:.1f} min: "
          f"{os.path.abspath(args.out)}", file=sys.stderr)


def plot(run, result, s):
    """Validation curves of seed 0's reported arms, one PNG per horizon."""
    for h in s.horizons:
        d = result.decisions.get(str(h), {})
        seed, half = s.seeds[h][0], h // 2
        specs = [protocol.make_spec(s, h, b, d[f"lr_{b}"], h, seed) for b in protocol.BASES]
        for key, base in (("bsfa", "adam-mini"), ("adamw_bsfa", "adamw")):
            c = d[key]
            specs += [protocol.make_spec(s, h, base, c["lr"], steps, seed, (c["gamma"], c["alpha"]))
                      for steps in (half, h)]
        dirs = [run.run_dir(spec) for spec in specs]
        run.command(["plot", *dirs, "--out", os.path.join(run.out, f"curves-h{h}.png"), "--title",
                     f"N = {h}: tuned AdamW, Adam-mini at N; AdamMini-BSFA, AdamW-BSFA at N/2 and N "
                     f"(seed {seed})"])


if __name__ == "__main__":
    main()
