"""Runs of the study: the data, the binary, and one training run from spec to scored result.

Every run lives in its own folder, OUT/runs/h<N>/<name>/, and is finished when its
`result.json` exists: a later invocation reads that file and never trains the run again. A run
that was stopped part-way resumes from its newest checkpoint (`--resume auto`, bit for bit);
its final checkpoint is kept and scored with `bsfa-train eval` on the validation split.
"""

import glob
import hashlib
import heapq
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

# The small model of the study (issue #29): 2 layers, hidden 64, on a 1,024-token BPE.
MODEL = dict(hidden=64, layers=2, heads=4, intermediate=172)


class Interrupted(Exception):
    """The study was asked to stop (SIGINT / SIGTERM); runs checkpointed where they were."""


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def binary_commit(binary, given=None):
    """The git commit the binary was built from: `given`, the sidecar file `<binary>.commit`
    (written when the binary is copied out of the tree), or, for a binary inside this
    repository's tree, its HEAD (with `-dirty` when tracked files differ from it)."""
    if given:
        return given
    sidecar = binary + ".commit"
    if os.path.exists(sidecar):
        return open(sidecar).read().strip()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.abspath(binary).startswith(repo + os.sep):
        return "unknown (pass --bin-commit or write BIN.commit)"
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True)
    head = git("rev-parse", "HEAD").stdout.strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head + ("-dirty" if dirty else "")


class Runner:
    """Trains and scores runs, `jobs` at a time (each on cores / jobs threads), smallest
    priority first; skips every run already finished on disk."""

    def __init__(self, args, settings):
        self.args = args
        self.s = settings
        self.out = os.path.abspath(args.out)
        self.bin = os.path.abspath(args.bin)
        self.threads = max(1, (os.cpu_count() or 1) // args.jobs)
        self.data = os.path.join(self.out, "data")
        self.queue, self.order, self.cv = [], itertools.count(), threading.Condition()
        self.children, self.stopping = set(), False
        self.binary = None
        for _ in range(args.jobs):
            threading.Thread(target=self.worker, daemon=True).start()

    # ---- the binary and the data ------------------------------------------------------
    def record_binary(self):
        """The binary's hash and commit, in OUT/study.json; a study continues only with the
        binary it started with (`--new-binary` accepts another and records it)."""
        record = {"path": self.bin, "sha256": sha256(self.bin),
                  "commit": binary_commit(self.bin, self.args.bin_commit)}
        path = os.path.join(self.out, "study.json")
        study = json.load(open(path)) if os.path.exists(path) else {"binaries": []}
        known = [b["sha256"] for b in study["binaries"]]
        if known and record["sha256"] != known[-1] and not self.args.new_binary:
            sys.exit(f"{self.bin} is not the binary this study started with (commit "
                     f"{study['binaries'][-1]['commit']}); resume with that one, or pass "
                     "--new-binary to continue with this one (recorded in study.json)")
        if record["sha256"] not in known:
            record["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
            study["binaries"].append(record)
        study["settings"] = self.s.public()
        json.dump(study, open(path, "w"), indent=1)
        self.binary = record
        return study["binaries"]

    def prepare_data(self):
        """Vim's documentation split by file (every tenth file is validation text), a BPE
        trained on the training text only, and token shards whose validation split is exactly
        the validation text."""
        report_path = os.path.join(self.data, "tokenizer-report.json")
        if os.path.exists(report_path):
            return json.load(open(report_path))
        docs = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
        if not docs:
            sys.exit("the study's English text is the Vim documentation from the Debian package "
                     "'vim-runtime' (/usr/share/vim/vim*/doc), which is not installed: run "
                     "`apt-get install vim-runtime` and start again")
        os.makedirs(self.data, exist_ok=True)
        val_files = docs[5::10]
        train_files = [d for d in docs if d not in val_files]
        parts = {}
        for split, files in (("train", train_files), ("val", val_files)):
            text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
            parts[split] = os.path.join(self.data, f"{split}.txt")
            open(parts[split], "w", encoding="utf-8").write(text)
        tokenizer = os.path.join(self.data, "tokenizer.json")
        report = json.loads(self.command([
            "tokenizer", "--data", f"text:{parts['train']}", "--val-data", f"text:{parts['val']}",
            "--vocab-size", str(self.s.vocab_size), "--out", tokenizer]))
        report["train_files"], report["val_files"] = len(train_files), len(val_files)
        joined = os.path.join(self.data, "all.txt")
        with open(joined, "w", encoding="utf-8") as f:
            for split in ("train", "val"):
                f.write(open(parts[split], encoding="utf-8").read())
        shards = os.path.join(self.data, "shards")
        self.command(["prepare", "--data", f"text:{joined}", "--tokenizer", tokenizer,
                      "--val-tokens", str(report["val_tokens"]), "--out", shards])
        os.remove(joined)
        meta = json.load(open(os.path.join(shards, "meta.json")))
        report["train_tokens"] = meta["splits"]["train"]["tokens"]
        json.dump(report, open(report_path, "w"), indent=1)
        return report

    def model_flags(self):
        if self.args.paper:
            return ["--model", "llama72m"]
        return [
            "--model", "tiny",
            "--data", f"shards:{os.path.join(self.data, 'shards')}",
            "--tokenizer", os.path.join(self.data, "tokenizer.json"),
            "--set", f"model.vocab_size={self.s.vocab_size}",
            "--set", f"model.hidden_size={MODEL['hidden']}",
            "--set", f"model.num_hidden_layers={MODEL['layers']}",
            "--set", f"model.num_attention_heads={MODEL['heads']}",
            "--set", f"model.num_key_value_heads={MODEL['heads']}",
            "--set", f"model.intermediate_size={MODEL['intermediate']}",
            "--batch-size", str(self.s.batch_size), "--seq-len", str(self.s.seq_len),
        ]

    def eval_data(self):
        if self.args.paper:
            return self.args.paper_val
        return f"shards:{os.path.join(self.data, 'shards')}"

    def model_size(self):
        """Parameters, and those in the blocks BSFA covers (norm, attention, MLP), from
        `--dry-run`."""
        out = subprocess.run([self.bin, *self.model_flags(), "--bsfa", "--dry-run"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bsfa-train --dry-run failed:\n{out.stderr[-2000:]}")
        groups = {}
        for line in out.stderr.splitlines():
            parts = line.split()
            if line.startswith("  ") and len(parts) == 2 and parts[1].isdigit():
                groups[parts[0]] = int(parts[1])
        total = sum(groups.values())
        covered = sum(groups.get(g, 0) for g in ("attention", "mlp", "norms"))
        return {"parameters": total, "bsfa_covered": covered, "groups": groups,
                "bsfa_share": covered / total if total else None}

    def command(self, argv):
        done = subprocess.run([self.bin, *argv], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bsfa-train {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip().splitlines()[-1]

    # ---- the pool ---------------------------------------------------------------------
    def submit(self, spec, priority):
        future = Future()
        with self.cv:
            heapq.heappush(self.queue, (priority, next(self.order), spec, future))
            self.cv.notify()
        return future

    def run_many(self, specs, priority=0):
        """Results of `specs` (finished ones read from disk), in order."""
        futures = [self.submit(s, priority) for s in specs]
        return [f.result() for f in futures]

    def worker(self):
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                _, _, spec, future = heapq.heappop(self.queue)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.run(spec))
            except BaseException as e:  # handed to the waiting stage
                future.set_exception(e)

    def stop(self, signum, _frame):
        """First signal: every training run checkpoints and the study exits (resume by
        running the same command again)."""
        self.stopping = True
        for child in list(self.children):
            try:
                child.send_signal(signal.SIGTERM)
            except OSError:
                pass
        print(f"signal {signum}: the running runs checkpoint; rerun the same command to resume",
              file=sys.stderr, flush=True)

    # ---- one run ----------------------------------------------------------------------
    def run_dir(self, spec):
        return os.path.join(self.out, "runs", f"h{spec['horizon']}", spec["name"])

    def run(self, spec):
        """Trains `spec` (resuming a stopped run), scores its final checkpoint, and writes
        `result.json`; reads that file when the run is already finished."""
        folder = self.run_dir(spec)
        result_path = os.path.join(folder, "result.json")
        if os.path.exists(result_path):
            return json.load(open(result_path))
        if self.stopping:
            raise Interrupted()
        os.makedirs(folder, exist_ok=True)
        every = self.s.eval_every(spec["horizon"])
        argv = [
            self.bin, *self.model_flags(), *spec["flags"],
            "--eval-every", str(every), "--eval-batches", str(self.s.eval_batches),
            "--set", f"train.eval_seed={self.s.eval_seed}",
            "--log-every", str(every), "--checkpoint-every", str(self.s.checkpoint_every),
            "--keep-checkpoints", "1", "--resume", "auto", "--threads", str(self.threads),
            "--set", "train.sample_every=0", "--set", "train.tensorboard=false",
            "--out", folder, *self.args.extra,
        ]
        started = time.time()
        code, cpu = self.child(argv, os.path.join(folder, "train"))
        # CPU seconds over every invocation of a resumed run.
        spent = os.path.join(folder, "train_cpu_s")
        cpu += float(open(spent).read()) if os.path.exists(spent) else 0.0
        open(spent, "w").write(f"{cpu}\n")
        if code in (130, 143) or self.stopping:
            raise Interrupted()
        if code != 0:
            err = open(os.path.join(folder, "train.err")).read()[-3000:]
            raise RuntimeError(f"run h{spec['horizon']}/{spec['name']} failed ({code}):\n{err}")
        summary = json.loads(open(os.path.join(folder, "train.out")).read().strip().splitlines()[-1])
        checkpoint = os.path.join(folder, "checkpoints", f"step-{spec['steps']:08d}")
        eval_argv = [self.bin, "eval", "--checkpoint", checkpoint, "--data", self.eval_data(),
                     "--threads", str(self.threads)]
        if self.s.final_eval_batches:
            eval_argv += ["--eval-batches", str(self.s.final_eval_batches)]
        code, eval_cpu = self.child(eval_argv, os.path.join(folder, "eval"))
        if code != 0:
            raise RuntimeError(f"eval of {checkpoint} failed ({code})")
        scored = json.loads(open(os.path.join(folder, "eval.out")).read().strip().splitlines()[-1])
        curve = []
        for line in open(os.path.join(folder, "metrics.jsonl")):
            record = json.loads(line)
            if "val_loss" in record:
                curve.append((record["step"], record["val_loss"]))
        result = {k: v for k, v in spec.items() if k != "flags"}
        result.update(
            val=scored["val_loss"], val_tokens=scored["tokens"], val_windows=curve[-1][1] if curve else None,
            curve=curve, checkpoint=os.path.relpath(checkpoint, self.out),
            wall_s=time.time() - started, train_cpu_s=cpu, eval_cpu_s=eval_cpu,
            train_wall_s=summary.get("wall_s"), binary_sha256=self.binary["sha256"],
            binary_commit=self.binary["commit"], resumed_from=summary.get("resumed_from"),
        )
        json.dump(result, open(result_path + ".tmp", "w"))
        os.replace(result_path + ".tmp", result_path)
        print(f"  h{spec['horizon']}/{spec['name']}: val {result['val']:.4f} "
              f"({cpu:.0f} s cpu, {result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return result

    def child(self, argv, stem):
        """Runs `argv` with stdout and stderr in STEM.out / STEM.err; returns its exit code
        and CPU seconds (user + system)."""
        with open(stem + ".out", "w") as out, open(stem + ".err", "a") as err:
            proc = subprocess.Popen(argv, stdout=out, stderr=err)
            self.children.add(proc)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                self.children.discard(proc)
            proc.returncode = os.waitstatus_to_exitcode(status)
        return proc.returncode, usage.ru_utime + usage.ru_stime
