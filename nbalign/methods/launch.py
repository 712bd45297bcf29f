"""Training in processes of its own: `--launch subprocess` (one process) and `--launch accelerate` (N processes
through `accelerate launch`: DDP, or FSDP / DeepSpeed from an accelerate config file).

The notebook's process checks everything and writes the run folder (spec.json, the in-memory data, status
"running"), exactly as a run here would; then it starts `python -m nbalign run <out> --out <out>` (under
`accelerate launch` for N), with NBALIGN_LAUNCHED naming the folder, and streams what the processes print into the
cell. The launched processes train the folder's spec in place: the first writes metrics, weights, evaluation,
card and status; the others only train. A kernel interrupt is passed on as SIGINT: the processes stop after the
current step, save, and mark the run interrupted. The training's memory, on the GPU too, belongs to those
processes and is back when they end; a kernel that already initialised CUDA does not matter to them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import runfolder
from ..errors import NbalignError

LAUNCHED = "NBALIGN_LAUNCHED"  # the run folder a launched process trains in place


def launched_here(out: Path) -> bool:
    """This process was started by a launcher to train the run in `out` (already written by the launcher)."""
    return os.environ.get(LAUNCHED) == str(Path(out).resolve())


def is_main_process() -> bool:
    """Rank 0 writes the run folder; the other processes of a distributed run only train."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def command(spec, out: Path) -> tuple[list[str], dict]:
    """The command line and environment that train the folder's spec in processes of their own."""
    env = {**os.environ, LAUNCHED: str(Path(out).resolve()), "PYTHONUNBUFFERED": "1"}
    inner = ["-m", "nbalign", "run", str(out), "--out", str(out)]
    if spec.launch == "subprocess":
        return [sys.executable, *inner], env
    line = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.accelerate_config:
        line += ["--config_file", str(spec.accelerate_config)]
    import torch

    if not torch.cuda.is_available() and not spec.accelerate_config and spec.num_processes > 1:
        # Several CPU processes: accelerate's --cpu starts one, --multi_gpu without GPUs starts N (gloo DDP).
        line += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif not spec.accelerate_config:
        line += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    line += ["--num_processes", str(spec.num_processes), *inner]
    return line, env


def launch(name: str, plan, write_spec) -> None:
    """Write the run folder, train it in processes of its own, stream their output; the folder's status says how
    it ended (a launched process that died without saying so leaves it failed, with its exit code)."""
    out = plan.out
    runfolder.start(out, overwrite=plan.spec.overwrite)
    write_spec()
    spec = plan.spec
    how = "its own process" if spec.launch == "subprocess" else f"{spec.num_processes} processes (accelerate launch)"
    runfolder.set_status(out, "running", f"launched in {how}")
    print(f"nbalign {name}: {spec.model} | {plan.adapter.describe()} | {plan.data.n_examples} examples | memory "
          f"{plan.memory} | training in {how} -> {out}", flush=True)
    line, env = command(spec, out)
    proc = subprocess.Popen(line, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                            start_new_session=True)  # its own process group: an interrupt reaches all of it
    code = _stream(proc)
    status = runfolder.read_status(out)
    if status.get("status") == "running":  # died without a word (killed, or failed before its first line)
        runfolder.set_status(out, "failed", f"the launched process exited with code {code} before finishing")


def _stream(proc) -> int:
    """Forward the processes' output to this cell until they end. The first interrupt asks them to stop after
    the current step and save (SIGINT to the group); a second one stops them at once."""
    interrupts = 0
    while True:
        try:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return proc.wait()
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                print("\nnbalign: stopping the launched run after its current step (interrupt again to stop it at "
                      "once)...", flush=True)
                _signal(proc, signal.SIGINT)
            else:
                _signal(proc, signal.SIGKILL)


def _signal(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def finished_run(out: Path):
    """The Run a launch left, or the error it ended with."""
    from ..runs import Run

    status = runfolder.read_status(out)
    if status.get("status") == "failed":
        raise NbalignError(
            f"The launched run in '{out}' failed: {status.get('message')}.",
            f"its output is above; a traceback, if any, is in {out / runfolder.ERROR_LOG}.",
        )
    if status.get("status") == "interrupted":
        print(f"nbalign: the run in {out} was interrupted and saved: {status.get('message')}.")
    return Run(out)
