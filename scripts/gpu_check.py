#!/usr/bin/env python3
"""One-shot check of the GPU path on a machine with NVIDIA GPUs; writes one JSON report.

    scripts/gpu_check.sh [--binary PATH] [--nccl-test PATH] [--out report.json]
                         [--quick] [--rehearse | --dry-run] [--run-timeout S] [--deadline S]

Steps, each recorded (ok / failed / skipped, seconds, figures) and none stopping the others:
  device     nvidia-smi: GPUs, memory, driver
  libraries  each CUDA library the binary loads: where it was found, or the package that ships it
  gpu_tests  the NCCL test binary's ignored GPU tests (tests/nccl.rs), when given
  parity     a small LLaMA (Adam-mini + BSFA) 20 steps on CUDA in f32 and in bf16 against the
             CPU running the same ops (train.kernels=reference) in the same precision and seed
  resume     on CUDA: a run killed after step 25 resumes from its step-20 checkpoint; its
             losses against a straight run (bit-exact expected)
  nccl       2 ranks through NCCL against 1 rank, when 2 GPUs exist
  bench      llama134m, bf16, 12 x 1024 tokens: AdamW, Adam-mini, Adam-mini + BSFA (f32 and
             4-bit state) at BSFA's steady state, and AdamW without our GPU kernels
             (train.kernels=reference): ms/step, tokens/s, MFU, peak GPU memory, BSFA's
             overhead, one re-estimation's time, the kernels' speed-up; each row on its own
  memory     --dry-run's peak GPU memory for the bench's AdamW run (measured on the CPU)
             against the peak nvidia-smi saw in it

Every run of the binary has its own time bound (--run-timeout), the whole check a deadline
(--deadline: a step that would start after it is skipped), and the report is rewritten after
every step and bench row, so a hang or a kill loses at most the run in progress.

--quick: device, libraries, parity, resume and the AdamW bench row only.
--rehearse: on the CPU, the GPU's own command lines (same presets, optimizers, BSFA settings,
  step rule and dtype) with only the device, batch, sequence length and step counts shrunk,
  an empty Hugging Face cache and an unreachable hub: any step that would need a download or
  a file the GPU machine lacks fails. CI runs it.
--dry-run: the rehearsal with `tiny` in place of llama134m (seconds).
"""

import argparse
import functools
import glob
import json
import os
import platform
import re
import shutil
import signal
import site
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

# The bench's workload, as the performance model (docs/gpu.md) sizes it. Step counts are
# bench's own defaults: for BSFA its steady state (history full, a re-estimation timed).
BENCH = ["--model", "llama134m", "--dtype", "bf16", "--batch-size", "12", "--seq-len", "1024",
         "--set", "train.micro_batch_size=12"]
BENCH_ROWS = {
    "adamw": ["--optimizer", "adamw"],
    "adam-mini": ["--optimizer", "adam-mini"],
    # BSFA's f32 state at a full history (25.7 GiB) and micro-batch 12 need 81 GiB, beyond an
    # 80 GB H100: the same 12 sequences per step in two micro-batches of 6.
    "adam-mini+bsfa": ["--optimizer", "adam-mini", "--bsfa",
                       "--set", "train.micro_batch_size=6"],
    "adam-mini+bsfa-4bit": ["--optimizer", "adam-mini", "--bsfa", "--set", "bsfa.bits=4"],
    # Without our GPU kernels (Triton attention): what they save.
    "adamw-reference-ops": ["--optimizer", "adamw", "--set", "train.kernels=reference"],
}
QUICK_STEPS = ("device", "libraries", "parity", "resume", "bench", "kernels")
# The kernels step's bound on each fused op's worst relative difference from its reference
# composition, per compute type (the GPU self-check's bounds).
KERNEL_BOUNDS = {"f32": 1e-4, "bf16": 3e-2}
QUICK_ROWS = ("adamw",)

# What the rehearsal changes in a GPU command line, and nothing else: (flag, value) pairs
# and whole arguments. --dry-run adds the model.
REHEARSAL = {("--device", "cuda"): "cpu", ("--batch-size", "12"): "2",
             ("--seq-len", "1024"): "16", "train.micro_batch_size=12": "train.micro_batch_size=2",
             "train.micro_batch_size=6": "train.micro_batch_size=1"}
DRY_RUN = {("--model", "llama134m"): "tiny"}
# Shrunk step counts for bench, and the GPU whose memory --dry-run sizes for.
REHEARSAL_BENCH_STEPS = ["--warmup", "1", "--iters", "2"]
REHEARSAL_GPU_MEMORY = ["--gpu-memory", "79.6"]

# The CUDA libraries of a `cuda,nccl` build: soname, whether the loader needs it at start-up
# (else NVRTC opens it when it compiles), and what ships it.
CUDA_LIBRARIES = [
    ("libcuda.so.1", True, "the NVIDIA driver (>= 580)"),
    ("libcudart.so.13", True, "pip nvidia-cuda-runtime (CUDA 13)"),
    ("libcublas.so.13", True, "pip nvidia-cublas (CUDA 13)"),
    ("libcublasLt.so.13", True, "pip nvidia-cublas (CUDA 13)"),
    ("libcurand.so.10", True, "pip nvidia-curand"),
    ("libnvrtc.so.13", True, "pip nvidia-cuda-nvrtc (CUDA 13)"),
    ("libnvrtc-builtins.so.13.0", False, "pip nvidia-cuda-nvrtc (CUDA 13)"),
    ("libnccl.so.2", True, "pip nvidia-nccl-cu13"),
]


def log(message):
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A step, or a part of one, that does not apply here."""


class Check:
    """Runs the steps and collects the report."""

    def __init__(self, args):
        self.args = args
        self.mode = "dry-run" if args.dry_run else "rehearse" if args.rehearse else "gpu"
        self.on_gpu = self.mode == "gpu"
        self.binary = args.binary
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.logs = self.out.with_name(self.out.stem + "-logs")
        self.logs.mkdir(exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.deadline = time.time() + args.deadline
        self.env = {}
        if not self.on_gpu:
            # No cache to lean on and no hub to reach (refused at once, not a DNS wait):
            # what the GPU machine has.
            hf_home = self.work / "empty-hf-home"
            hf_home.mkdir()
            self.env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"}
        self.report = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": self.mode,
            "quick": args.quick,
            "host": platform.node(),
            "binary": str(self.binary),
            "logs": str(self.logs),
            "steps": {},
        }
        self.runs = 0

    # ---- plumbing ---------------------------------------------------------------------------

    def step(self, name, body):
        if self.args.quick and name not in QUICK_STEPS:
            return
        started = time.time()
        log(f"{name} ...")
        try:
            if self.left() < 20:
                raise Skip(f"the check's deadline ({self.args.deadline} s) has passed")
            result = body() or {}
            status = result.pop("status", "ok")
        except Skip as e:
            result, status = {"reason": str(e)}, "skipped"
        except Exception as e:  # a failed step is recorded; the others still run
            result, status = {"error": f"{type(e).__name__}: {e}"}, "failed"
        result = {"status": status, "seconds": round(time.time() - started, 1), **result}
        self.report["steps"][name] = result
        log(f"{name}: {status} ({result['seconds']} s)"
            + (f": {result.get('error') or result.get('reason')}" if status != "ok" else ""))
        self.save()

    def save(self):
        temporary = self.out.with_name(self.out.name + ".tmp")
        temporary.write_text(json.dumps(self.report, indent=2) + "\n")
        temporary.replace(self.out)

    def left(self):
        return self.deadline - time.time()

    def command(self, args, bench=False):
        """A GPU command line as this mode runs it."""
        if self.on_gpu:
            return list(args)
        table = {**REHEARSAL, **(DRY_RUN if self.mode == "dry-run" else {})}
        out = []
        for arg in args:
            if out and (out[-1], arg) in table:
                out.append(table[(out[-1], arg)])
            else:
                out.append(table.get(arg, arg))
        if bench:
            out += REHEARSAL_BENCH_STEPS
        if "--dry-run" in out:
            out += REHEARSAL_GPU_MEMORY
        return out

    def run_bound(self):
        """Seconds the next run may take: --run-timeout, within the check's deadline."""
        timeout = min(self.args.run_timeout, self.left() - 10)
        if timeout < 10:
            raise Skip(f"the check's deadline ({self.args.deadline} s) has passed")
        return timeout

    def run(self, args, env=None, bench=False):
        """Runs the binary on `args` (made this mode's) within the run bound; returns the last
        stdout line as JSON (or None). Its stderr goes to the logs folder."""
        timeout = self.run_bound()
        argv = [str(self.binary), *self.command(args, bench)]
        self.runs += 1
        log_path = self.logs / f"{self.runs:02d}.log"
        log(f"  run {self.runs}: {' '.join(argv[1:])}")
        started = time.time()
        with open(log_path, "w") as stderr:
            stderr.write(" ".join(argv) + "\n")
            stderr.flush()
            # A session of its own: a timeout kills the run and any ranks it launched.
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                     env={**os.environ, **self.env, **(env or {})},
                                     start_new_session=True)
            try:
                stdout, _ = child.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                raise RuntimeError(f"run {self.runs} timed out after {timeout:.0f} s "
                                   f"(log {log_path}): {tail(log_path)}")
        seconds = time.time() - started
        # Warnings (a kernel's failed self-check, a fallback) go into the report.
        for line in Path(log_path).read_text(errors="replace").splitlines():
            if line.startswith("warning:"):
                self.report.setdefault("warnings", []).append(f"run {self.runs}: {line}")
        if child.returncode != 0:
            raise RuntimeError(f"run {self.runs} exited {child.returncode} after {seconds:.0f} s "
                               f"(log {log_path}): {tail(log_path)}")
        lines = stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    def losses(self, out):
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        return {(r["step"], k): r[k] for r in rows for k in ("loss", "val_loss") if k in r}

    def train(self, name, device, steps, extra=(), env=None):
        out = self.work / name
        self.run([*SMALL, *device, "--steps", str(steps), "--out", str(out), *extra], env)
        return out

    # ---- steps ------------------------------------------------------------------------------

    def device_info(self):
        if not self.on_gpu:
            raise Skip(f"{self.mode}: no GPU")
        query = "name,memory.total,driver_version"
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=60,
        )
        gpus = [dict(zip(query.split(","), map(str.strip, l.split(","))))
                for l in done.stdout.strip().splitlines()]
        return {"gpus": len(gpus), "devices": gpus}

    def libraries(self):
        found = {}
        for soname, needed, package in CUDA_LIBRARIES:
            path = find_library(soname)
            found[soname] = {"path": path, "source": library_source(path)} if path else {
                "path": None, "needed_at_start": needed, "install": package}
        unresolved = unresolved_libraries(self.binary)
        result = {"library_path": os.environ.get("LD_LIBRARY_PATH", ""), "libraries": found,
                  "binary_unresolved": unresolved}
        missing = [s for s, needed, _ in CUDA_LIBRARIES if needed and not found[s]["path"]]
        if unresolved or (self.on_gpu and missing):
            result["status"] = "failed"
            result["error"] = f"not found: {sorted(set(unresolved) | set(missing))}"
        elif not self.on_gpu:
            result["note"] = "a CPU binary: the CUDA libraries are listed, not needed"
        return result

    def gpu_tests(self):
        if not self.args.nccl_test:
            raise Skip("no --nccl-test binary given")
        if not self.on_gpu:
            raise Skip(f"{self.mode}: the GPU tests need a GPU")
        timeout = self.run_bound()
        done = subprocess.run([self.args.nccl_test, "--ignored", "--test-threads", "1"],
                              capture_output=True, text=True, timeout=timeout)
        tail_lines = (done.stdout + done.stderr).strip().splitlines()[-15:]
        if done.returncode != 0:
            raise RuntimeError("\n".join(tail_lines))
        return {"output": tail_lines[-3:]}

    def parity(self):
        result = {}
        cuda = ["--device", "cuda"]
        reference = ["--device", "cpu", "--set", "train.kernels=reference"]
        for dtype, tolerance in (("f32", 2e-3), ("bf16", 3e-2)):
            precision = ["--dtype", dtype]
            gpu = self.losses(self.train(f"parity-{dtype}", [*cuda, *precision], 20))
            cpu = self.losses(self.train(f"parity-{dtype}-cpu", [*reference, *precision], 20))
            worst = max(abs(gpu[k] - v) / abs(v) for k, v in cpu.items())
            result[dtype] = {"worst_relative_difference": worst, "tolerance": tolerance,
                             "final_loss": gpu[(20, "loss")], "cpu_final_loss": cpu[(20, "loss")]}
        bad = [d for d, r in result.items() if r["worst_relative_difference"] > r["tolerance"]]
        if bad:
            result["status"] = "failed"
            result["error"] = f"losses differ beyond tolerance in {bad}"
        return result

    def resume(self):
        cuda, extra = ["--device", "cuda"], ["--checkpoint-every", "10"]
        straight = self.losses(self.train("straight", cuda, 30, extra))
        crash = {"BSFA_TRAIN_FAILPOINT": "rank-abort:0:25", "BSFA_TRAIN_TEST_HOOKS": "1"}
        try:
            self.train("resumed", cuda, 30, extra, env=crash)
            raise RuntimeError("the failpoint did not stop the run")
        except RuntimeError as e:
            if "exited" not in str(e):
                raise
        self.train("resumed", cuda, 30, [*extra, "--resume", "auto"])
        resumed = self.losses(self.work / "resumed")
        diffs = [abs(resumed[k] - v) for k, v in straight.items()]
        result = {"steps_compared": len(diffs), "max_abs_difference": max(diffs),
                  "bit_exact": max(diffs) == 0.0}
        if not result["bit_exact"]:
            result["status"] = "failed"
            result["error"] = "the resumed run's losses differ from the straight run's"
        return result

    def nccl(self):
        gpus = self.report["steps"].get("device", {}).get("gpus", 0)
        if self.on_gpu and gpus < 2:
            raise Skip(f"{gpus} GPU(s): 2 ranks need 2")
        cuda = ["--device", "cuda"]
        one = self.losses(self.train("ranks-1", cuda, 20))
        two = self.losses(self.train("ranks-2", cuda, 20, ["--nproc-per-node", "2"]))
        worst = max(abs(two[k] - v) / abs(v) for k, v in one.items())
        return {"worst_relative_difference": worst,
                **({"status": "failed"} if worst > 1e-4 else {})}

    def bench(self):
        names = QUICK_ROWS if self.args.quick else tuple(BENCH_ROWS)
        rows = {}
        progress = self.report["steps"]["bench"] = {"status": "running", "runs": rows}
        for name in names:
            try:
                rows[name] = self.bench_row(name)
            except Skip as e:
                rows[name] = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # the rows measured so far are kept
                rows[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            log(f"  bench {name}: {rows[name].get('ms_per_step', rows[name].get('status'))}")
            self.save()
        del progress["status"]
        base = rows.get("adam-mini", {})
        reference = rows.get("adamw-reference-ops", {})
        if "ms_per_step" in reference and "ms_per_step" in rows.get("adamw", {}):
            rows["adamw"]["speedup_over_reference_ops"] = (
                reference["ms_per_step"] / rows["adamw"]["ms_per_step"])
        for name in ("adam-mini+bsfa", "adam-mini+bsfa-4bit"):
            row = rows.get(name, {})
            if "mean_optimizer_ms" in row and "mean_optimizer_ms" in base:
                # BSFA changes the optimizer step alone; its row may split the batch into
                # other micro-batches, so the overhead compares optimizer times.
                extra = row["mean_optimizer_ms"] - base["mean_optimizer_ms"]
                row["bsfa_overhead"] = extra / base["mean_ms_per_step"]
        failed = [n for n, r in rows.items() if r.get("status") == "failed"]
        return {"runs": rows,
                **({"status": "failed", "error": f"rows failed: {failed}"} if failed else {})}

    def bench_row(self, name):
        memory = GpuMemory(enabled=self.on_gpu)
        with memory:
            report = self.run(["bench", *BENCH, "--device", "cuda", *BENCH_ROWS[name],
                               "--out", str(self.work / f"bench-{name}")], bench=True)
        keep = ("ms_per_step", "mean_ms_per_step", "tokens_per_s", "mfu", "peak_tflops",
                "peak_tflops_source", "micro_batch_size", "warmup_steps", "timed_steps",
                "optimizer_ms", "mean_optimizer_ms", "reestimations_timed", "reestimation_ms",
                "bsfa_steady_state", "peak_rss_mib")
        return {**{k: report.get(k) for k in keep}, "peak_gpu_memory_mib": memory.peak_mib}

    def kernels(self):
        """Each fused op against its reference composition at the bench's shapes (`bench
        --kernels`): worst difference and times; on a GPU every op must take our kernels."""
        report = self.run(["bench", *BENCH, "--device", "cuda", "--kernels",
                           "--out", str(self.work / "bench-kernels")], bench=True)
        bound = KERNEL_BOUNDS.get(report["dtype"], 1e-4)
        rows = {}
        for k in report["kernels"]:
            rows[k["kernel"]] = {**k, "speedup": k["reference_ms"] / k["fused_ms"]}
        problems = [name for name, k in rows.items() if k["worst_difference"] > bound
                    or (self.on_gpu and k["path"] != "triton")]
        return {"bound": bound, "kernels": rows,
                **({"status": "failed", "error": f"beyond the bound or not on our kernels: "
                    f"{problems}"} if problems else {})}

    def memory(self):
        report = self.run([*BENCH, "--device", "cuda", "--optimizer", "adamw", "--dry-run"])
        predicted = report["gpu_memory"]["peak_bytes"] / 2**20
        seen = self.report["steps"].get("bench", {}).get("runs", {}).get("adamw", {})
        seen = seen.get("peak_gpu_memory_mib")
        return {"predicted_peak_mib": predicted, "nvidia_smi_peak_mib": seen,
                "predicted_over_seen": predicted / seen if seen else None,
                "measured_s": report["gpu_memory"]["measured_s"]}

    def main(self):
        self.step("device", self.device_info)
        self.step("libraries", self.libraries)
        self.step("gpu_tests", self.gpu_tests)
        self.step("parity", self.parity)
        self.step("resume", self.resume)
        self.step("nccl", self.nccl)
        self.step("bench", self.bench)
        self.step("kernels", self.kernels)
        self.step("memory", self.memory)
        self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.save()
        shutil.rmtree(self.work, ignore_errors=True)
        print(json.dumps(self.report), flush=True)
        failed = [n for n, s in self.report["steps"].items() if s["status"] == "failed"]
        log(f"report: {self.out}" + (f"; failed: {failed}" if failed else "; no step failed"))
        return 1 if failed else 0


def tail(path, chars=800):
    return Path(path).read_text(errors="replace").strip()[-chars:]


# ---- libraries ----------------------------------------------------------------------------------

def library_dirs():
    """Where CUDA libraries may be besides the loader's cache: the nvidia-* wheels of this
    Python (PyTorch's), then CUDA toolkits under /usr/local. Never a `stubs` folder."""
    bases = [*site.getsitepackages(), site.getusersitepackages()]
    dirs = [d for b in bases for d in sorted(glob.glob(os.path.join(b, "nvidia", "*", "lib")))]
    for cuda in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        dirs += [os.path.join(cuda, "lib64"), *glob.glob(os.path.join(cuda, "targets/*/lib"))]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d) and "stubs" not in d]


def add_library_dirs():
    """Puts library_dirs() after what LD_LIBRARY_PATH already holds (the runs inherit it)."""
    given = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(given + library_dirs()))


@functools.cache
def ldconfig_cache():
    """soname -> path from the loader's cache (`ldconfig -p`), x86-64 entries."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            done = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        cache = {}
        for line in done.stdout.splitlines():
            m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
            if m and ("x86-64" in m.group(2) or "64" in m.group(2)):
                cache.setdefault(m.group(1), m.group(3))
        return cache
    return {}


def find_library(soname):
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if d and os.path.exists(os.path.join(d, soname)):
            return os.path.join(d, soname)
    return ldconfig_cache().get(soname)


def library_source(path):
    if "site-packages" in path or "dist-packages" in path:
        return "a Python nvidia-* package"
    if path.startswith("/usr/local/cuda"):
        return "a CUDA toolkit"
    return "the loader's cache (ldconfig)"


def unresolved_libraries(binary):
    """The libraries `ldd` cannot resolve for `binary` (with LD_LIBRARY_PATH as the runs
    get it); empty when ldd is missing."""
    try:
        done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=60)
    except OSError:
        return []
    return [l.split()[0] for l in done.stdout.splitlines() if "not found" in l]


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
            try:
                done = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                     "-i", "0"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if done.returncode == 0 and done.stdout.strip():
                used = float(done.stdout.split()[0])
                self.peak_mib = max(self.peak_mib or 0.0, used)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    parser.add_argument("--binary", type=Path, default=target / "release/bsfa-train")
    parser.add_argument("--nccl-test", help="tests/nccl.rs built with --features cuda,nccl")
    parser.add_argument("--out", default="gpu_check.json",
                        help="the report (rewritten after every step); run logs go beside it")
    parser.add_argument("--quick", action="store_true",
                        help="parity, resume and the AdamW bench row only")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rehearse", action="store_true",
                      help="the GPU's command lines on the CPU, shrunk, with no network")
    mode.add_argument("--dry-run", action="store_true", help="the rehearsal with `tiny`")
    parser.add_argument("--run-timeout", type=float, default=150,
                        help="seconds one run of the binary may take")
    parser.add_argument("--deadline", type=float, default=540,
                        help="seconds the whole check may take (steps after it are skipped)")
    args = parser.parse_args()
    if not args.binary.is_file():
        sys.exit(f"no binary at {args.binary}: build it (docs/gpu.md) or pass --binary")
    add_library_dirs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(Check(args).main())


if __name__ == "__main__":
    main()
