#!/usr/bin/env python3
"""The BSFA reproduction study: does AdamMini-BSFA reach a tuned baseline's loss in half the steps?

The paper's protocol (section 5.2): a baseline trains for N steps, BSFA for N/2, each on its own
full warmup + cosine schedule, and they are compared at their endpoints. Here, per model size:

1. Learning-rate sweep: AdamW and Adam-mini, N steps, at x0.5, x1, x2, x4 of the base rate (seed 0);
   each is tuned to the rate with the lowest final validation loss.
2. The tuned baselines at every seed.
3. At the smallest size only: BSFA's gamma, then its rank k (with l = k + 10), swept at N/2 steps
   on Adam-mini's tuned rate (seed 0); the best setting is carried to every size.
4. AdamMini-BSFA at the tuned Adam-mini rate, at N/2 steps (the paper's comparison) and at N
   steps (to count the steps it needs to reach the tuned AdamW's final loss), at every seed.

Writes OUT/results.json (every run and the summary), OUT/results.md (the tables), and
OUT/curves-<size>.png (`bsfa-train plot` of seed 0's runs).

Data: real English text from a Debian package (the Vim documentation, `vim-runtime`), split by
file into training and validation text; a byte-level BPE trained with `bsfa-train tokenizer` on the
training text only; token shards from `bsfa-train prepare`.

    scripts/reproduce_bsfa.sh                      # the full study (about 60-70 minutes, 2 cores)
    scripts/reproduce_bsfa.sh --quick              # a few minutes: the same pipeline, tiny settings
    scripts/reproduce_bsfa.sh --paper -- --device cuda   # LLaMA-72M on WikiText-103 (GPU)

Everything after `--` is passed to every training run.
"""

import argparse
import concurrent.futures
import glob
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

# Model sizes: LLaMA shapes on top of the `tiny` preset (GPT-2-like depth/width ratios).
SIZES = {
    "XS": dict(hidden=64, layers=2, heads=4, intermediate=172),
    "S": dict(hidden=128, layers=4, heads=4, intermediate=344),
    "M": dict(hidden=192, layers=6, heads=6, intermediate=512),
    "L": dict(hidden=256, layers=8, heads=8, intermediate=688),
}
LR_MULTIPLIERS = [0.5, 1, 2, 4]
ALPHA = 0.5  # the paper's setting in every experiment of section 5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/reproduce-bsfa", help="output folder")
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    p.add_argument("--bin", default=os.path.join(target, "release", "bsfa-train"),
                   help="the bsfa-train binary (default: cargo's release build)")
    p.add_argument("--sizes", default="S,M", help="model sizes, smallest first: XS, S, M, L")
    p.add_argument("--steps", type=int, default=400, help="N, the baseline's steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3, help="the base learning rate of the sweep")
    p.add_argument("--gammas", default="1.5,2,3,4,6", help="gamma values swept")
    p.add_argument("--ranks", default="10,30,50", help="k values swept (l = k + 10)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each on cores/jobs threads)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--evals", type=int, default=20, help="evaluations per run")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run of the pipeline")
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's LLaMA-72M / WikiText-103 experiment (preset llama72m; needs a GPU)",
    )
    p.add_argument("extra", nargs="*", help="after --: flags for every training run")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.steps, args.seeds = "XS", 40, 2
        args.gammas, args.ranks, args.vocab_size = "2,4", "2,8", 1024
        args.evals, args.eval_batches, args.seq_len = 4, 4, 64
    return args


class Study:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.bin = os.path.abspath(args.bin)
        self.threads = max(1, (os.cpu_count() or 1) // args.jobs)
        self.runs = {}  # name -> record

    # ---- data -------------------------------------------------------------------------
    def prepare_data(self):
        """Vim's documentation split by file (every tenth file is validation text), a BPE trained
        on the training text, and token shards whose validation split is exactly that text."""
        data = os.path.join(self.out, "data")
        meta = os.path.join(data, "shards", "meta.json")
        if os.path.exists(meta):
            return json.load(open(os.path.join(data, "tokenizer-report.json")))
        docs = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
        if not docs:
            sys.exit(
                "the study's English text is the Vim documentation from the Debian package "
                "'vim-runtime' (/usr/share/vim/vim*/doc), which is not installed: run "
                "`apt-get install vim-runtime` and start again"
            )
        os.makedirs(data, exist_ok=True)
        val_files = docs[5::10]
        train_files = [d for d in docs if d not in val_files]
        parts = {}
        for split, files in (("train", train_files), ("val", val_files)):
            text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
            parts[split] = os.path.join(data, f"{split}.txt")
            open(parts[split], "w", encoding="utf-8").write(text)
        tokenizer = os.path.join(data, "tokenizer.json")
        report = json.loads(
            self.command(
                [
                    "tokenizer",
                    "--data", f"text:{parts['train']}",
                    "--val-data", f"text:{parts['val']}",
                    "--vocab-size", str(self.args.vocab_size),
                    "--out", tokenizer,
                ]
            )
        )
        report["train_files"], report["val_files"] = len(train_files), len(val_files)
        # One text, validation last; `prepare` holds back exactly the validation text's tokens.
        joined = os.path.join(data, "all.txt")
        with open(joined, "w", encoding="utf-8") as f:
            for split in ("train", "val"):
                f.write(open(parts[split], encoding="utf-8").read())
        self.command(
            [
                "prepare",
                "--data", f"text:{joined}",
                "--tokenizer", tokenizer,
                "--val-tokens", str(report["val_tokens"]),
                "--out", os.path.join(data, "shards"),
            ]
        )
        os.remove(joined)
        json.dump(report, open(os.path.join(data, "tokenizer-report.json"), "w"), indent=1)
        return report

    def command(self, argv):
        done = subprocess.run([self.bin, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bsfa-train {' '.join(argv)} failed:\n{done.stderr}")
        return done.stdout.strip().splitlines()[-1]

    # ---- runs -------------------------------------------------------------------------
    def size_flags(self, size):
        if self.args.paper:
            return ["--model", "llama72m"]
        shape = SIZES[size]
        data = os.path.join(self.out, "data")
        return [
            "--model", "tiny",
            "--data", f"shards:{os.path.join(data, 'shards')}",
            "--tokenizer", os.path.join(data, "tokenizer.json"),
            "--set", f"model.vocab_size={self.args.vocab_size}",
            "--set", f"model.hidden_size={shape['hidden']}",
            "--set", f"model.num_hidden_layers={shape['layers']}",
            "--set", f"model.num_attention_heads={shape['heads']}",
            "--set", f"model.num_key_value_heads={shape['heads']}",
            "--set", f"model.intermediate_size={shape['intermediate']}",
            "--batch-size", str(self.args.batch_size),
            "--seq-len", str(self.args.seq_len),
        ]

    def spec(self, size, method, lr, steps, seed, gamma=None, rank=None):
        """A run, named by what sets it apart."""
        name = f"{method}-lr{lr:g}-n{steps}-s{seed}"
        flags = ["--lr", str(lr), "--steps", str(steps), "--seed", str(seed)]
        if method == "bsfa":
            name = f"bsfa-g{gamma:g}-k{rank}-lr{lr:g}-n{steps}-s{seed}"
            flags += [
                "--optimizer", "adam-mini", "--bsfa",
                "--set", f"bsfa.alpha={ALPHA}",
                "--set", f"bsfa.gamma={gamma}",
                "--set", f"bsfa.rank={rank}",
                "--set", f"bsfa.history={rank + 10}",
                "--set", "bsfa.interval=10",
            ]
        else:
            flags += ["--optimizer", method]
        if not self.args.paper:
            flags += ["--warmup-steps", str(max(1, steps // 20))]
        return dict(
            size=size, method=method, lr=lr, steps=steps, seed=seed, gamma=gamma, rank=rank,
            name=name, dir=os.path.join(self.out, "runs", size, name), flags=flags,
        )

    def run_all(self, specs):
        """Runs what has not run yet, `jobs` at a time; returns the records in order."""
        todo = [s for s in specs if s["name"] not in self.runs.get(s["size"], {})]
        # Longest first (larger sizes, more steps), so the last runs do not leave a slot idle.
        order = {size: i for i, size in enumerate(SIZES)}
        todo.sort(key=lambda s: (-order.get(s["size"], 0), -s["steps"]))
        with concurrent.futures.ThreadPoolExecutor(self.args.jobs) as pool:
            for record in pool.map(self.train, todo):
                self.runs.setdefault(record["size"], {})[record["name"]] = record
        return [self.runs[s["size"]][s["name"]] for s in specs]

    def train(self, spec):
        metrics = os.path.join(spec["dir"], "metrics.jsonl")
        summary_file = os.path.join(spec["dir"], "summary.json")
        if not os.path.exists(summary_file):
            shutil.rmtree(spec["dir"], ignore_errors=True)
            every = max(1, spec["steps"] // self.args.evals)
            argv = [
                self.bin,
                *self.size_flags(spec["size"]),
                *spec["flags"],
                "--eval-every", str(every),
                "--eval-batches", str(self.args.eval_batches),
                "--log-every", str(every),
                "--checkpoint-every", "0",
                "--threads", str(self.threads),
                "--out", spec["dir"],
                *self.args.extra,
            ]
            started = time.time()
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"run {spec['size']}/{spec['name']} failed:\n{done.stderr[-3000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            summary["wall_s_measured"] = time.time() - started
            # The final checkpoint is not needed for the study; its size adds up over ~100 runs.
            shutil.rmtree(os.path.join(spec["dir"], "checkpoints"), ignore_errors=True)
            json.dump(summary, open(summary_file, "w"))
            print(f"  {spec['size']}/{spec['name']}: val {summary['final_val_loss']:.4f} "
                  f"({summary['wall_s_measured']:.0f} s)", file=sys.stderr, flush=True)
        curve = []
        for line in open(metrics):
            record = json.loads(line)
            if "val_loss" in record:
                curve.append((record["step"], record["val_loss"]))
        summary = json.load(open(summary_file))
        fields = {k: v for k, v in spec.items() if k != "flags"}
        return dict(fields, final_val=curve[-1][1], curve=curve, wall_s=summary["wall_s"])

    # ---- the protocol -----------------------------------------------------------------
    def study(self):
        args = self.args
        sizes = ["llama72m"] if args.paper else args.sizes.split(",")
        n = 100_000 if args.paper else args.steps
        half = n // 2
        seeds = list(range(args.seeds))
        report = {"protocol": self.protocol(n), "sizes": {}}
        if not args.paper:
            report["data"] = self.prepare_data()
        base_lr = 5e-4 if args.paper else args.lr

        print(f"1. learning-rate sweeps (N = {n})", file=sys.stderr)
        sweeps = {
            size: self.run_all(
                [self.spec(size, m, base_lr * x, n, 0) for m in ("adamw", "adam-mini")
                 for x in LR_MULTIPLIERS]
            )
            for size in sizes
        }
        tuned = {
            size: {
                m: min((r for r in sweeps[size] if r["method"] == m), key=lambda r: r["final_val"])["lr"]
                for m in ("adamw", "adam-mini")
            }
            for size in sizes
        }

        smallest = sizes[0]
        lr0 = tuned[smallest]["adam-mini"]
        gammas = [float(g) for g in args.gammas.split(",")]
        ranks = [int(k) for k in args.ranks.split(",")]
        k0 = 50 if 50 in ranks else ranks[-1]
        print(f"2. tuned baselines at every seed; gamma sweep at {smallest} (k = {k0})", file=sys.stderr)
        baseline_specs = {
            (size, m): [self.spec(size, m, tuned[size][m], n, s) for s in seeds]
            for size in sizes for m in ("adamw", "adam-mini")
        }
        gamma_specs = [self.spec(smallest, "bsfa", lr0, half, 0, g, k0) for g in gammas]
        self.run_all([x for specs in baseline_specs.values() for x in specs] + gamma_specs)
        baselines = {size: {m: self.run_all(baseline_specs[(size, m)]) for m in ("adamw", "adam-mini")}
                     for size in sizes}
        gamma_sweep = self.run_all(gamma_specs)
        gamma = min(gamma_sweep, key=lambda r: r["final_val"])["gamma"]
        print(f"3. k sweep at {smallest} (gamma {gamma:g})", file=sys.stderr)
        rank_sweep = self.run_all([self.spec(smallest, "bsfa", lr0, half, 0, gamma, k) for k in ranks])
        rank = min(rank_sweep, key=lambda r: r["final_val"])["rank"]

        print(f"4. AdamMini-BSFA (gamma {gamma:g}, k {rank}) at N/2 and N", file=sys.stderr)
        bsfa_specs = {
            (size, steps): [self.spec(size, "bsfa", tuned[size]["adam-mini"], steps, s, gamma, rank)
                            for s in seeds]
            for size in sizes for steps in (half, n)
        }
        self.run_all([x for specs in bsfa_specs.values() for x in specs])
        bsfa = {size: {steps: self.run_all(bsfa_specs[(size, steps)]) for steps in (half, n)}
                for size in sizes}

        report["chosen"] = {"gamma": gamma, "rank": rank, "history": rank + 10, "alpha": ALPHA,
                            "interval": 10, "chosen_at": smallest}
        report["gamma_sweep"] = [self.brief(r) for r in gamma_sweep]
        report["rank_sweep"] = [self.brief(r) for r in rank_sweep]
        for size in sizes:
            report["sizes"][size] = self.summarise(
                size, n, sweeps[size], tuned[size], baselines[size], bsfa[size]
            )
        report["runs"] = [self.brief(r) for size in self.runs.values() for r in size.values()]
        json.dump(report, open(os.path.join(self.out, "results.json"), "w"), indent=1)
        table = self.tables(report, sizes, n)
        open(os.path.join(self.out, "results.md"), "w").write(table)
        print(table)
        for size in sizes:
            self.plot(size, tuned[size], baselines[size], bsfa[size], n)

    def protocol(self, n):
        a = self.args
        return {
            "baseline_steps": n, "bsfa_steps": n // 2, "seeds": a.seeds,
            "lr_multipliers": LR_MULTIPLIERS, "base_lr": 5e-4 if a.paper else a.lr,
            "batch_size": a.batch_size, "seq_len": a.seq_len, "schedule": "linear warmup (N/20 steps) "
            "then cosine to lr/20, per run", "eval_batches": a.eval_batches, "evals_per_run": a.evals,
            "sizes": {s: SIZES.get(s) for s in (["llama72m"] if a.paper else a.sizes.split(","))},
        }

    @staticmethod
    def brief(r):
        return {k: r[k] for k in ("size", "name", "method", "lr", "steps", "seed", "gamma", "rank",
                                  "final_val", "wall_s", "curve")}

    @staticmethod
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": mean, "std": spread, "min": min(values), "max": max(values), "n": len(values)}

    @staticmethod
    def first_reaching(curve, target):
        return next((step for step, loss in curve if loss <= target), None)

    def summarise(self, size, n, sweep, tuned, baselines, bsfa):
        half = n // 2
        target = statistics.fmean(r["final_val"] for r in baselines["adamw"])
        target_mini = statistics.fmean(r["final_val"] for r in baselines["adam-mini"])
        groups = {
            f"adamw@{n}": baselines["adamw"],
            f"adam-mini@{n}": baselines["adam-mini"],
            f"bsfa@{half}": bsfa[half],
            f"bsfa@{n}": bsfa[n],
        }
        out = {"tuned_lr": tuned, "target_adamw_final_val": target,
               "target_adam_mini_final_val": target_mini,
               "lr_sweep": {f"{r['method']}@{r['lr']:g}": r["final_val"] for r in sweep},
               "lr_at_sweep_edge": {m: tuned[m] in (min(r["lr"] for r in sweep), max(r["lr"] for r in sweep))
                                    for m in tuned},
               "methods": {}}
        for label, runs in groups.items():
            reach = [self.first_reaching(r["curve"], target) for r in runs]
            reach_mini = [self.first_reaching(r["curve"], target_mini) for r in runs]
            out["methods"][label] = {
                "final_val": self.stats([r["final_val"] for r in runs]),
                "steps_to_adamw_final": self.stats(reach),
                "reached_adamw_final": sum(x is not None for x in reach),
                "steps_to_adam_mini_final": self.stats(reach_mini),
                "reached_adam_mini_final": sum(x is not None for x in reach_mini),
                "seeds": len(runs),
                "wall_s": self.stats([r["wall_s"] for r in runs]),
            }
        # The paper's test, seed by seed: BSFA at N/2 minus the baseline at N.
        for base in ("adamw", "adam-mini"):
            gaps = [b["final_val"] - a["final_val"] for a, b in zip(baselines[base], bsfa[half])]
            out[f"gap_bsfa@{half}_minus_{base}@{n}"] = self.stats(gaps)
        gaps = [b["final_val"] - a["final_val"] for a, b in zip(baselines["adam-mini"], bsfa[n])]
        out[f"gap_bsfa@{n}_minus_adam-mini@{n}"] = self.stats(gaps)
        return out

    def tables(self, report, sizes, n):
        half = n // 2
        fmt = lambda s: "-" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
        lines = [f"## Reproduction study: baseline N = {n} steps, BSFA N/2 = {half}, "
                 f"{self.args.seeds} seeds (mean ± std)", ""]
        c = report["chosen"]
        lines.append(f"BSFA: AdamMini-BSFA, alpha {c['alpha']}, gamma {c['gamma']:g}, k {c['rank']}, "
                     f"l {c['history']}, T {c['interval']} (gamma and k chosen at {c['chosen_at']}).")
        lines.append("")
        lines.append("| size | method | final val loss | reaches tuned AdamW's final val (seeds) | steps to it / N |")
        lines.append("|---|---|---|---|---|")
        for size in sizes:
            s = report["sizes"][size]
            for label, m in s["methods"].items():
                steps = m["steps_to_adamw_final"]
                ratio = "-" if steps is None else f"{steps['mean'] / n:.2f}"
                lines.append(f"| {size} | {label} | {fmt(m['final_val'])} | "
                             f"{m['reached_adamw_final']}/{m['seeds']} | {ratio} |")
        lines += ["", "| size | tuned lr AdamW | tuned lr Adam-mini | BSFA@N/2 − AdamW@N | "
                  "BSFA@N/2 − Adam-mini@N | BSFA@N − Adam-mini@N |", "|---|---|---|---|---|---|"]
        for size in sizes:
            s = report["sizes"][size]
            gap = lambda key: fmt(s[key])
            lines.append(
                f"| {size} | {s['tuned_lr']['adamw']:g} | {s['tuned_lr']['adam-mini']:g} | "
                f"{gap(f'gap_bsfa@{half}_minus_adamw@{n}')} | {gap(f'gap_bsfa@{half}_minus_adam-mini@{n}')} | "
                f"{gap(f'gap_bsfa@{n}_minus_adam-mini@{n}')} |"
            )
        lines += ["", "| sweep at " + report["chosen"]["chosen_at"] + f" (N/2 = {half}, seed 0) | final val loss |",
                  "|---|---|"]
        swept = {r["name"]: r for r in report["gamma_sweep"] + report["rank_sweep"]}
        for r in swept.values():
            lines.append(f"| gamma {r['gamma']:g}, k {r['rank']} | {r['final_val']:.4f} |")
        lines += ["", "| size | learning-rate sweep (N steps, seed 0) |", "|---|---|"]
        for size in sizes:
            sweep = report["sizes"][size]["lr_sweep"]
            lines.append(f"| {size} | " + ", ".join(f"{k} {v:.4f}" for k, v in sweep.items()) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, size, tuned, baselines, bsfa, n):
        dirs = [baselines["adamw"][0]["dir"], baselines["adam-mini"][0]["dir"],
                bsfa[n // 2][0]["dir"], bsfa[n][0]["dir"]]
        png = os.path.join(self.out, f"curves-{size}.png")
        self.command(["plot", *dirs, "--out", png,
                      "--title", f"{size}: tuned AdamW and Adam-mini at N = {n}, AdamMini-BSFA at N/2 and N (seed 0)"])


def main():
    args = parse_args()
    if not os.path.exists(args.bin):
        sys.exit(f"no binary at '{args.bin}': run `cargo build --release` (or scripts/reproduce_bsfa.sh)")
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    Study(args).study()
    print(f"study finished in {(time.time() - started) / 60:.1f} min: {os.path.abspath(args.out)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
