"""`make bench`: the prepare and train benchmarks of issues 3 and 4, side by side with TRL and HF Trainer.

    .venv/bin/python pipelines/bench.py [--quick] [--only peak,prepare,fill,scale,train,mfu,rss]

Writes data/bench/results.json (every raw figure) and data/bench/results.md (the table, also printed). --only
reruns some sections and keeps the others' last results. Benchmarks, not tests: nothing asserts, and every figure
depends on the machine being otherwise idle (the load average is recorded next to them).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "data" / "bench"
WORK = BENCH / "work"  # inputs, prepared folders, runs: deleted at the end of a run
TOKENIZER = ROOT / "data" / "models" / "SmolLM2-135M-Instruct"
SECTIONS = ("peak", "prepare", "fill", "scale", "train", "mfu", "rss")
THREADS = 2
RESULT_PREFIX = "BENCH-RESULT "


def figure(name: str, value: float, shown: str, target: str, met: bool | None, on: str) -> dict[str, Any]:
    """One row of the results table: `met` is None for figures without a target."""
    return {"figure": name, "value": value, "shown": shown, "target": target, "met": met, "on": on}


def run_worker(script: str, *arguments: str, environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `pipelines/SCRIPT ARGUMENTS` in a fresh process with pinned threads; returns the JSON it reports."""
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "PYTHONPATH": str(ROOT / "pipelines")} | (environment or {})
    command = [sys.executable, str(ROOT / "pipelines" / script), *arguments]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def report(result: dict[str, Any]) -> None:
    """Print a worker's result for `run_worker` to read, with the 1-minute load average at its end (its own 2 threads
    count ~2: more means other processes competed for the 2 cores and slowed it)."""
    print(RESULT_PREFIX + json.dumps(result | {"load_average": os.getloadavg()[0]}), flush=True)


def environment() -> dict[str, Any]:
    import datasets
    import torch
    import transformers
    import trl
    from bench_train import compute_dtype

    from lacuna.machine import cpu_model

    cpu = cpu_model()

    dtype, reason = compute_dtype()
    return {"cpu": cpu, "dtype": dtype, "dtype_reason": reason, "cores": os.cpu_count(), "threads": THREADS,
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "trl": trl.__version__, "load_average_start": os.getloadavg()}


def save(results: dict[str, Any]) -> None:
    """results.json (numpy scalars as plain numbers) and results.md."""
    (BENCH / "results.json").write_text(json.dumps(results, indent=2, default=lambda value: value.item()) + "\n")
    (BENCH / "results.md").write_text(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    """The human-readable table of every section's figures."""
    info = results["environment"]
    lines = [f"# lacuna benchmarks ({'quick' if results['quick'] else 'full'} run, {results['date']})", "",
             f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads per framework, computing in "
             f"{info['dtype']} ({info['dtype_reason']}); torch {info['torch']}, "
             f"transformers {info['transformers']}, datasets {info['datasets']}, trl {info['trl']}. Load average "
             f"(1/5/15 min) {'/'.join(f'{x:.1f}' for x in info['load_average_start'])} at the start, "
             f"{'/'.join(f'{x:.1f}' for x in info['load_average_end'])} at the end. Took {results['seconds']:.0f} s.",
             "", "| section | figure | measured | target | met | measured on | CPU, dtype |",
             "|---|---|---|---|---|---|---|"]
    for section in SECTIONS:
        for row in results["sections"].get(section, {}).get("figures", []):
            met = {True: "yes", False: "**no**", None: ""}[row["met"]]
            lines.append(f"| {section} | {row['figure']} | {row['shown']} | {row['target']} | {met} | {row['on']} | "
                         f"{row.get('machine', '')} |")
    notes = [note for section in SECTIONS for note in results["sections"].get(section, {}).get("notes", [])]
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer steps (~3 minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    arguments = parser.parse_args()
    chosen = [section for section in SECTIONS if section in arguments.only.split(",")]
    if not (TOKENIZER / "tokenizer.json").is_file():
        subprocess.run([sys.executable, "pipelines/assets.py"], cwd=ROOT, check=True)
    import bench_prepare
    import bench_train
    import torch

    torch.set_num_threads(THREADS)
    BENCH.mkdir(parents=True, exist_ok=True)
    path = BENCH / "results.json"
    results = json.loads(path.read_text()) if path.is_file() and len(chosen) < len(SECTIONS) else {"sections": {}}
    started = time.perf_counter()
    results |= {"quick": arguments.quick, "date": time.strftime("%Y-%m-%d %H:%M"), "environment": environment()}
    runners = {"peak": bench_train.peak, "prepare": bench_prepare.prepare_throughput, "fill": bench_prepare.fill,
               "scale": bench_prepare.scale,
               "train": bench_train.train_throughput, "mfu": bench_train.mfu, "rss": bench_train.rss}
    for section in chosen:
        print(f"== {section}", flush=True)
        section_started = time.perf_counter()
        results["sections"][section] = runners[section](arguments.quick, results["sections"])
        for row in results["sections"][section]["figures"]:  # a figure kept from an earlier run keeps its machine
            row["machine"] = f"{results['environment']['cpu']}, {results['environment']['dtype']}"
        results["sections"][section]["seconds"] = round(time.perf_counter() - section_started, 1)
        print(f"   {section} took {results['sections'][section]['seconds']:.0f} s", flush=True)
        results["seconds"] = time.perf_counter() - started
        results["environment"]["load_average_end"] = os.getloadavg()
        save(results)  # after every section: a later failure keeps what was measured
    shutil.rmtree(WORK, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
