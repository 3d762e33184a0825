"""Graph breaks and recompilations of a compiled benchmark run, on any machine, before a GPU pays for them.

    python benchmarks/dynamo_check.py SCRIPT [its arguments]
    python benchmarks/dynamo_check.py anonymize_throughput.py --profile sd15 --compile --photos 1 \\
        --faces-per-photo 1 --batch-sizes 1 --steps 2 --unet-dtype bfloat16 --precision bf16-mixed

Runs ``benchmarks/SCRIPT`` (or a path) in this process with every ``torch.compile`` traced by
dynamo but not compiled (backend ``eager``: no Inductor code generation, so SD-1.5 size runs on a
CPU in minutes), then prints dynamo's graph breaks by reason, the recompilations, and the graphs
captured. A compiled GPU run with a break or a recompile in its loop spends minutes compiling
fragments (dynamo's recompile limit ends it: 2026-11-27 on an H100); on the GPU the same code
runs under Inductor, which adds kernels, not breaks. Last line: one JSON object; exit status 1
if there was a break or a recompilation. Two compiled modules of one class share their forward's
code object: ``train_step.py --compile`` (ours and the bare UNet) counts one recompilation, the
second UNet's own compile.
"""
from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters

HERE = Path(__file__).resolve().parent


class _Recompilations(logging.Handler):
    """The first line of each of dynamo's "Recompiling function ..." messages."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0])


def traced_only(compile_fn):
    """``torch.compile`` with the ``eager`` backend whatever the caller asked (Inductor's ``mode``
    and ``options`` have no meaning there)."""

    def compile(model=None, **kwargs):
        kwargs = {key: value for key, value in kwargs.items() if key not in ("backend", "mode", "options")}
        return compile_fn(model, backend="eager", **kwargs)

    return compile


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    script = Path(argv[0]) if Path(argv[0]).is_file() else HERE / argv[0]
    if not script.is_file():
        print(f"dynamo_check: no script {argv[0]} (nor {script})", file=sys.stderr)
        return 2

    torch._dynamo.reset()
    counters.clear()
    recompilations = _Recompilations()
    torch._logging.set_logs(recompiles=True)
    recompiles_logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    recompiles_logger.addHandler(recompilations)
    compile_fn, saved_argv = torch.compile, sys.argv
    torch.compile, sys.argv = traced_only(compile_fn), [str(script), *argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
        status = 0
    except SystemExit as done:
        status = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        torch.compile, sys.argv = compile_fn, saved_argv
        recompiles_logger.removeHandler(recompilations)
        torch._logging.set_logs()
    if status:
        print(f"dynamo_check: {script.name} exited with status {status}", file=sys.stderr)
        return status

    breaks = dict(counters["graph_break"])
    graphs = int(counters["stats"]["unique_graphs"])
    print(f"\ndynamo check of {script.name} (backend eager): {graphs} graphs, {sum(breaks.values())} graph breaks, "
          f"{len(recompilations.messages)} recompilations")
    for reason, count in sorted(breaks.items(), key=lambda item: -item[1]):
        print(f"  break x{count}: {reason.splitlines()[0][:160]}")
    for message in recompilations.messages:
        print(f"  {message[:160]}")
    print(json.dumps({"benchmark": "dynamo_check", "script": script.name, "graphs": graphs,
                      "graph_breaks": sum(breaks.values()), "recompilations": len(recompilations.messages),
                      "break_reasons": {reason.splitlines()[0][:160]: count for reason, count in breaks.items()},
                      "recompiled": recompilations.messages}))
    return 1 if breaks or recompilations.messages else 0


if __name__ == "__main__":
    sys.exit(main())
