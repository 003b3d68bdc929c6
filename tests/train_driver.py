"""Run training in a fresh process (device count / SIGKILL tests) and dump the final state.

    python tests/train_driver.py CONFIG_PY WORKDIR OUT_NPZ [key=value ...] [--stop-after N]
        [--coordinator HOST:PORT --num-processes P --process-id I] [--audit-writes FILE]

``--audit-writes FILE``: record (Python audit hooks: ``open`` for writing, ``os.mkdir``, ``os.rename``)
every path under WORKDIR this process writes, as a JSON list in FILE (tests check that only process 0
writes the shared files).

Process 0 writes OUT_NPZ (the state is replicated, so every process holds the same values) with every leaf of params / EMA / optimiser state (flattened key paths), the step and
the data iterator state (JSON), and the per-step losses read from the device.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _audit_writes(workdir: str, record: str) -> None:
    import atexit
    root = os.path.abspath(workdir) + os.sep
    seen: set[str] = set()

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree"):
            paths = [args[0]] + ([args[1]] if event == "os.rename" else [])
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(p))
                if p.startswith(root):
                    seen.add(os.path.relpath(p, root))

    def dump():
        with open(record, "w") as f:
            json.dump(sorted(seen), f)

    sys.addaudithook(hook)
    atexit.register(dump)


def main(argv: list[str]) -> None:
    import importlib.util

    import jax
    import numpy as np

    from diffusion_jax.training import train

    config_path, workdir, out = argv[:3]
    rest = argv[3:]
    options = {}
    for flag in ("--stop-after", "--coordinator", "--num-processes", "--process-id", "--audit-writes"):
        if flag in rest:
            i = rest.index(flag)
            options[flag] = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
    if "--audit-writes" in options:
        _audit_writes(workdir, options["--audit-writes"])
    stop_after = int(options["--stop-after"]) if "--stop-after" in options else None
    dist = dict(coordinator_address=options.get("--coordinator"),
                num_processes=int(options["--num-processes"]) if "--num-processes" in options else None,
                process_id=int(options["--process-id"]) if "--process-id" in options else None)
    spec = importlib.util.spec_from_file_location("cfg", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in rest:
        key, value = item.split("=", 1)
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        value = _parse_value(value)
        node[parts[-1]] = tuple(value) if isinstance(value, list) else value
    result = train(config, workdir, stop_after=stop_after, **dist)
    state = jax.device_get(result["state"])
    print(f"driver: process {jax.process_index()} done at step {result['step']} "
          f"(preempted={result['preempted']})", flush=True)
    if jax.process_index() != 0:
        return
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            {"params": state.params, "ema": state.ema, "opt": state.opt_state})[0]:
        flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
    flat["__step__"] = np.asarray(state.step)
    flat["__data__"] = np.frombuffer(json.dumps(result["iterator_state"]).encode(), dtype=np.uint8)
    flat["__devices__"] = np.asarray(jax.device_count())
    flat["__processes__"] = np.asarray(jax.process_count())
    flat["__preempted__"] = np.asarray(bool(result["preempted"]))
    np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1:])
