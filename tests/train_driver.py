"""Run training in a fresh process (device count / SIGKILL tests) and dump the final state.

    python tests/train_driver.py CONFIG_PY WORKDIR OUT_NPZ [key=value ...] [--stop-after N]

Writes OUT_NPZ with every leaf of params / EMA / optimiser state (flattened key paths), the step and
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


def main(argv: list[str]) -> None:
    import importlib.util

    import jax
    import numpy as np

    from diffusion_jax.training import train

    config_path, workdir, out = argv[:3]
    rest = argv[3:]
    stop_after = None
    if "--stop-after" in rest:
        i = rest.index("--stop-after")
        stop_after = int(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
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
    result = train(config, workdir, stop_after=stop_after)
    state = jax.device_get(result["state"])
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            {"params": state.params, "ema": state.ema, "opt": state.opt_state})[0]:
        flat[jax.tree_util.keystr(path)] = np.asarray(leaf)
    flat["__step__"] = np.asarray(state.step)
    flat["__data__"] = np.frombuffer(json.dumps(result["iterator_state"]).encode(), dtype=np.uint8)
    flat["__devices__"] = np.asarray(jax.device_count())
    np.savez(out, **flat)


if __name__ == "__main__":
    main(sys.argv[1:])
