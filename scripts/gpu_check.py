#!/usr/bin/env python3
"""One-shot check of the GPU path on a machine with NVIDIA GPUs; writes one JSON report.

    scripts/gpu_check.sh [--binary PATH] [--nccl-test PATH] [--out report.json] [--dry-run]

Steps, each recorded (ok / failed / skipped, seconds, figures) and none stopping the others:
  device     nvidia-smi: GPUs, memory, driver
  gpu_tests  the NCCL test binary's ignored GPU tests (tests/nccl.rs), when given
  parity     a small LLaMA (Adam-mini + BSFA) 20 steps on CUDA in f32 and in bf16 against the
             CPU running the same ops (train.kernels=reference) in the same precision and seed
  resume     on CUDA: a run killed after step 25 resumes from its step-20 checkpoint; its
             losses against a straight run (bit-exact expected)
  nccl       2 ranks through NCCL against 1 rank, when 2 GPUs exist
  bench      llama134m, bf16, 12 x 1024 tokens: AdamW, Adam-mini, Adam-mini + BSFA (f32 and
             4-bit state): ms/step, tokens/s, MFU, peak GPU memory, BSFA's overhead and the
             time of one re-estimation (from the mean minus the median optimizer time)
  memory     --dry-run's peak GPU memory for the bench's AdamW run (measured on the CPU)
             against the peak nvidia-smi saw in it

--dry-run runs every step on the CPU (the fused kernels standing in for CUDA, small sizes),
so that CI checks the script; only the CUDA calls themselves are left untested.
The GPU machine needs no Rust: --binary takes a CUDA build made elsewhere (docs/gpu.md).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The parity and resume model: small, with BSFA projecting from step 4.
SMALL = [
    "--set", "model.hidden_size=128", "--set", "model.num_hidden_layers=2",
    "--set", "model.num_attention_heads=4", "--set", "model.intermediate_size=344",
    "--batch-size", "8", "--seq-len", "128", "--eval-every", "10", "--eval-batches", "2",
    "--log-every", "1", "--optimizer", "adam-mini", "--bsfa", "--set", "bsfa.rank=3",
    "--set", "bsfa.history=6", "--set", "bsfa.interval=4", "--seed", "7",
]


class Check:
    """Runs the steps and collects the report."""

    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.binary = args.binary
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "dry_run": self.dry,
            "host": platform.node(),
            "binary": str(self.binary),
            "steps": {},
        }
        # The device under test, and the CPU that checks it.
        self.device = ["--device", "cpu"] if self.dry else ["--device", "cuda"]
        self.reference = ["--device", "cpu", "--set", "train.kernels=reference"]

    def step(self, name, body):
        started = time.time()
        try:
            result = body() or {}
            status = result.pop("status", "ok")
        except Exception as e:  # a failed step is recorded; the others still run
            result, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
        result = {"status": status, "seconds": round(time.time() - started, 1), **result}
        self.report["steps"][name] = result
        print(f"[gpu_check] {name}: {status} ({result['seconds']} s)", file=sys.stderr)
        self.save()

    def save(self):
        Path(self.args.out).write_text(json.dumps(self.report, indent=2) + "\n")

    def run(self, args, env=None, timeout=600):
        """Runs the binary; returns (summary JSON or None, stderr)."""
        done = subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-800:]}")
        return (json.loads(lines[-1]) if lines else None), done.stderr

    def losses(self, out):
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if k in r}

    def train(self, name, device, steps, extra=(), env=None):
        out = self.work / name
        self.run([*SMALL, *device, "--steps", str(steps), "--out", str(out), *extra], env)
        return out

    # ---- steps ---------------------------------------------------------------------------

    def device_info(self):
        if self.dry:
            return {"status": "skipped", "reason": "dry run: no GPU", "gpus": 0}
        query = "name,memory.total,driver_version"
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, check=True,
        )
        gpus = [dict(zip(query.split(","), map(str.strip, l.split(","))))
                for l in done.stdout.strip().splitlines()]
        return {"gpus": len(gpus), "devices": gpus}

    def gpu_tests(self):
        if not self.args.nccl_test:
            return {"status": "skipped", "reason": "no --nccl-test binary given"}
        if self.dry:
            return {"status": "skipped", "reason": "dry run: the GPU tests need a GPU"}
        done = subprocess.run([self.args.nccl_test, "--ignored", "--test-threads", "1"],
                              capture_output=True, text=True, timeout=300)
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        if done.returncode != 0:
            raise RuntimeError("\n".join(tail))
        return {"output": tail[-3:]}

    def parity(self):
        result = {}
        for dtype, tolerance in (("f32", 2e-3), ("bf16", 3e-2)):
            precision = ["--dtype", dtype]
            gpu = self.losses(self.train(f"parity-{dtype}", [*self.device, *precision], 20))
            cpu = self.losses(self.train(f"parity-{dtype}-cpu", [*self.reference, *precision], 20))
            worst = max(abs(gpu[k] - v) / abs(v) for k, v in cpu.items())
            result[dtype] = {"worst_relative_difference": worst, "tolerance": tolerance,
                             "final_loss": gpu[(20, "loss")], "cpu_final_loss": cpu[(20, "loss")]}
        bad = [d for d, r in result.items() if r["worst_relative_difference"] > r["tolerance"]]
        if bad:
            result["status"] = "failed"
            result["error"] = f"losses differ beyond tolerance in {bad}"
        return result

    def resume(self):
        extra = ["--checkpoint-every", "10"]
        straight = self.losses(self.train("straight", self.device, 30, extra))
        crash = {"BSFA_TRAIN_FAILPOINT": "rank-abort:0:25"}
        try:
            self.train("resumed", self.device, 30, extra, env=crash)
            raise RuntimeError("the failpoint did not stop the run")
        except RuntimeError as e:
            if "exit" not in str(e):
                raise
        self.train("resumed", self.device, 30, [*extra, "--resume", "auto"])
        resumed = self.losses(self.work / "resumed")
        diffs = [abs(resumed[k] - v) for k, v in straight.items()]
        result = {"steps_compared": len(diffs), "max_abs_difference": max(diffs),
                  "bit_exact": max(diffs) == 0.0}
        if not result["bit_exact"]:
            result["status"] = "failed"
            result["error"] = "the resumed run's losses differ from the straight run's"
        return result

    def nccl(self, gpus):
        if not self.dry and gpus < 2:
            return {"status": "skipped", "reason": f"{gpus} GPU(s): 2 ranks need 2"}
        one = self.losses(self.train("ranks-1", self.device, 20))
        two = self.losses(self.train("ranks-2", self.device, 20, ["--nproc-per-node", "2"]))
        worst = max(abs(two[k] - v) / abs(v) for k, v in one.items())
        return {"worst_relative_difference": worst,
                **({"status": "failed"} if worst > 1e-4 else {})}

    def bench(self):
        if self.dry:
            shape = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64",
                     "--warmup", "1", "--iters", "3"]
        else:
            shape = ["--model", "llama134m", "--dtype", "bf16", "--batch-size", "12",
                     "--seq-len", "1024", "--warmup", "3", "--iters", "10"]
        runs = {
            "adamw": ["--optimizer", "adamw"],
            "adam-mini": ["--optimizer", "adam-mini"],
            "adam-mini+bsfa": ["--optimizer", "adam-mini", "--bsfa"],
            "adam-mini+bsfa-4bit": ["--optimizer", "adam-mini", "--bsfa",
                                    "--set", "bsfa.bits=4"],
        }
        rows = {}
        for name, optimizer in runs.items():
            memory = GpuMemory(enabled=not self.dry)
            with memory:
                report, _ = self.run(["bench", *shape, *self.device, *optimizer,
                                      "--out", str(self.work / f"bench-{name}")])
            interval = 10
            reestimation_ms = (report["mean_optimizer_ms"] - report["optimizer_ms"]) * interval
            rows[name] = {
                "ms_per_step": report["ms_per_step"],
                "tokens_per_s": report["tokens_per_s"],
                "mfu": report.get("mfu"),
                "peak_tflops": report.get("peak_tflops"),
                "optimizer_ms": report["optimizer_ms"],
                "reestimation_ms_estimate": reestimation_ms if "bsfa" in name else None,
                "peak_gpu_memory_mib": memory.peak_mib,
                "peak_rss_mib": report.get("peak_rss_mib"),
            }
        base = rows["adam-mini"]["ms_per_step"]
        for name in ("adam-mini+bsfa", "adam-mini+bsfa-4bit"):
            rows[name]["bsfa_overhead"] = rows[name]["ms_per_step"] / base - 1.0
        return {"runs": rows}

    def memory(self):
        """--dry-run's peak GPU memory for the bench's AdamW run, measured on the CPU, against
        the peak nvidia-smi saw during that run."""
        if self.dry:
            shape = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64",
                     "--gpu-memory", "1"]
        else:
            shape = ["--model", "llama134m", "--dtype", "bf16", "--batch-size", "12",
                     "--seq-len", "1024"]
        report, _ = self.run([*shape, *self.device, "--optimizer", "adamw", "--dry-run"],
                             timeout=300)
        predicted = report["gpu_memory"]["peak_bytes"] / 2**20
        seen = self.report["steps"].get("bench", {}).get("runs", {}).get("adamw", {})
        seen = seen.get("peak_gpu_memory_mib")
        return {"predicted_peak_mib": predicted, "nvidia_smi_peak_mib": seen,
                "predicted_over_seen": predicted / seen if seen else None,
                "measured_s": report["gpu_memory"]["measured_s"]}

    def main(self):
        self.step("device", self.device_info)
        gpus = self.report["steps"]["device"].get("gpus", 0)
        self.step("gpu_tests", self.gpu_tests)
        self.step("parity", self.parity)
        self.step("resume", self.resume)
        self.step("nccl", lambda: self.nccl(gpus))
        self.step("bench", self.bench)
        self.step("memory", self.memory)
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        shutil.rmtree(self.work, ignore_errors=True)
        print(json.dumps(self.report))
        failed = [n for n, s in self.report["steps"].items() if s["status"] == "failed"]
        return 1 if failed else 0


class GpuMemory:
    """The highest `nvidia-smi` memory reading (MiB, GPU 0) while the block runs."""

    def __init__(self, enabled):
        self.enabled, self.peak_mib, self.stop = enabled, None, threading.Event()

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()

    def sample(self):
        while not self.stop.wait(0.2):
            done = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "-i", "0"], capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                used = float(done.stdout.split()[0])
                self.peak_mib = max(self.peak_mib or 0.0, used)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    parser.add_argument("--binary", type=Path, default=target / "release/bsfa-train")
    parser.add_argument("--nccl-test", help="tests/nccl.rs built with --features cuda,nccl")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if not args.binary.is_file():
        sys.exit(f"no binary at {args.binary}: build it (docs/gpu.md) or pass --binary")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(Check(args).main())


if __name__ == "__main__":
    main()
