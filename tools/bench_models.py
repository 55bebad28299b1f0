"""Whole-model benchmark: refimpl beside keras-hub (jax, torch) and transformers on the same preset and inputs.

    python -m tools.bench_models                                   # the mid-size workload, every available peer
    python -m tools.bench_models --workload pali_gemma_3b_mix_224  # 11.7 GB float32 preset (+11.7 GB for HF)
    python -m tools.bench_models --peers refimpl-numba,keras-jax --rounds 3 --repeats 7 --dir /big/disk

For a workload (``tools.make_big_preset.WORKLOADS``) the command writes the preset once (random weights, streamed
to disk; reused while its provenance matches) and the inputs (batch 1, 64 text tokens: prompt then response). Then,
for each round, it runs every requested peer in a fresh child process, so that load times, first calls and peak
memory are each peer's own:

    peer                       what runs
    refimpl-numpy              ``PaliGemmaBackbone.from_preset(kernels="numpy")``: the spec, and the reference
    refimpl-numba              ``kernels="numba"``
    refimpl-numba-mmap         ``kernels="numba", mmap=True``: weights stored as used are mapped, not read
    refimpl-numba-stream       ``kernels="numba", stream=True``: blocks read from the file when they run
    refimpl-numba-f64-stream   the same in float64 (the oracle mode; judged against float32, so loosely)
    refimpl-numba-blocked      experiment, not refimpl: the numba set with matmul split into column blocks that two
                               workers take from a queue, each calling single-threaded BLAS (threadpoolctl)
    keras-jax / keras-torch    keras-hub ``PaliGemmaBackbone.from_preset`` with KERAS_BACKEND=jax / torch; steady
                               time is the faster of eager calls and ``predict_on_batch`` (both are recorded)
    transformers               ``PaliGemmaForConditionalGeneration.from_pretrained`` of the same weights converted
                               once to an HF checkpoint (conformance.hf_backend's mapping; the conversion is timed
                               apart), its ``model.model`` (final-norm hidden states, no LM head), sdpa attention

Each child times: imports; load (preset to ready); the first call; then, only if its output agrees with the
reference (refimpl-numpy float32, within ``conformance.tolerances``' float32 bound for ``llm/final_norm``), N
steady calls. The parent takes the child's peak RSS from ``os.wait4`` and prints a table with ratios against
refimpl-numba (best of the rounds per peer; every round is in the JSON). Absent peers are reported as absent.

The refimpl-numba child also measures matrix throughput: it times each matmul of one forward pass (the best of 3
passes per call) and numpy's float32 GEMM on the same shapes with fresh data, and reports both GFLOP/s. And the
numba first-call overhead: the first call minus the median steady call, with the dispatchers' cache hits.

Children run with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from the environment (they can slow OpenBLAS
here); ``threadpoolctl`` (a benchmark-only dependency: ``pip install threadpoolctl``) reports which BLAS kernel
each child used. Timings on a shared 2-core machine move with other jobs: the table shows the load average.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(tempfile.gettempdir()) / "paligemma-bench"
TEXT_TOKENS = 64
INPUT_SEED = 0
CLEARED_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BASELINE = "refimpl-numba"  # ratios are against this peer
REFERENCE = "refimpl-numpy"  # outputs are checked against this peer's (float32, the spec)

PEERS = ("refimpl-numpy", "refimpl-numba", "refimpl-numba-mmap", "refimpl-numba-stream", "refimpl-numba-f64-stream",
         "refimpl-numba-blocked", "keras-jax", "keras-torch", "transformers")
# Peers run by default per workload: all of them, but the blocked-matmul experiment on the 3B model. The 3B model
# is 11.7 GB in float32; measured peaks on this 24 GiB machine: keras-hub JAX 14.5 GiB, torch 15.4 GiB,
# transformers 9.5 GiB (its one-off conversion writes an 11.7 GB HF checkpoint beside the preset).
DEFAULT_PEERS = {"tiny": PEERS, "midsize": PEERS,
                 "pali_gemma_3b_mix_224": tuple(p for p in PEERS if p != "refimpl-numba-blocked")}


# ---- availability (parent; nothing heavy imported) -------------------------------------------------------------
def _has(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):
        return False


def absent_reason(peer: str) -> str | None:
    """Why a peer cannot run here, or None."""
    needs = {"keras-jax": ("keras", "keras_hub", "jax"), "keras-torch": ("keras", "keras_hub", "torch"),
             "transformers": ("torch", "transformers", "safetensors"),
             "refimpl-numba-blocked": ("numba", "threadpoolctl")}
    needs.update({p: ("numba",) for p in PEERS if p.startswith("refimpl-numba") and p not in needs})
    missing = [m for m in needs.get(peer, ()) if not _has(m)]
    if missing:
        hint = " (torch: pip install torch==2.13.0)" if "torch" in missing else ""
        return f"not installed: {', '.join(missing)}{hint}"
    return None


# ---- the child: one peer in a fresh process ------------------------------------------------------------------
def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _threadpools() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed (pip install threadpoolctl)"}]
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer")
    return [{k: info[k] for k in keep if k in info} for info in threadpool_info()]


def _agreement(out: np.ndarray, reference_path: Path | None) -> dict:
    """max |out - ref| / max |ref| and the float32 bound of the tolerance table for the backbone output."""
    if reference_path is None:
        return {"max_rel_diff": 0.0, "bound_rel": None, "agrees": True, "note": "this run is the reference"}
    from conformance.tolerances import resolve

    ref = np.load(reference_path, allow_pickle=False)
    if out.shape != ref.shape:
        return {"max_rel_diff": math.inf, "agrees": False, "note": f"shape {out.shape} != reference {ref.shape}"}
    scale = float(np.abs(ref).max())
    bound = resolve("llm/final_norm", "float32", scale, {})
    diff = float(np.abs(out.astype(np.float64) - ref).max())
    return {"max_rel_diff": diff / scale, "bound_rel": bound.atol / scale, "agrees": diff <= bound.atol,
            "bound_source": bound.source}


class _Runner:
    """How one peer loads and calls: ``load()`` -> model, ``call(model, inputs)`` -> f32[B, L, D]."""

    modes: tuple[str, ...] = ("call",)

    def load(self, preset: Path):
        raise NotImplementedError

    def prepare(self, model, inputs: dict[str, np.ndarray]):
        """The inputs as this peer takes them (converted once, outside the timings)."""
        return inputs

    def call(self, model, inputs, mode: str = "call") -> np.ndarray:
        raise NotImplementedError

    def extra(self, model, inputs) -> dict:
        return {}


class _Refimpl(_Runner):
    def __init__(self, kernels: str, stream: bool = False, dtype: str = "float32", blocked: bool = False,
                 mmap: bool = False):
        self.kernels, self.stream, self.dtype, self.blocked, self.mmap = kernels, stream, dtype, blocked, mmap

    def load(self, preset):
        from refimpl.model import PaliGemmaBackbone

        kernels = blocked_kernels() if self.blocked else self.kernels
        return PaliGemmaBackbone.from_preset(preset, dtype=self.dtype, kernels=kernels, stream=self.stream,
                                             mmap=self.mmap)

    def call(self, model, inputs, mode="call"):
        return np.asarray(model(inputs), dtype=np.float32)

    def extra(self, model, inputs) -> dict:
        out: dict[str, Any] = {"weights_resident_bytes": int(model.params.nbytes)}
        if self.kernels == "numba" and not (self.stream or self.blocked or self.mmap):
            out["matmul"] = matmul_profile(model, inputs)
            out["numba_cache"] = numba_cache_stats()
        return out


class _Keras(_Runner):
    modes = ("eager", "predict_on_batch")

    def __init__(self, backend: str):
        self.backend = backend

    def load(self, preset):
        import keras_hub

        return keras_hub.models.PaliGemmaBackbone.from_preset(str(preset))

    def prepare(self, model, inputs):
        from tools.keras_oracle import model_inputs

        return model_inputs(model, inputs)

    def call(self, model, tensors, mode="eager"):
        import keras

        if mode == "predict_on_batch":
            return np.asarray(model.predict_on_batch(tensors), dtype=np.float32)
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                return np.asarray(keras.ops.convert_to_numpy(model(tensors)), dtype=np.float32)
        return np.asarray(keras.ops.convert_to_numpy(model(tensors)), dtype=np.float32)


class _Transformers(_Runner):
    def load(self, preset):
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        return PaliGemmaForConditionalGeneration.from_pretrained(str(hf_dir(preset)), dtype=torch.float32).eval()

    def prepare(self, model, inputs):
        import torch

        from conformance.hf_backend import hf_inputs
        from refimpl.model import read_preset_config

        config = read_preset_config(Path(self._preset))
        return {k: torch.from_numpy(v) for k, v in hf_inputs(inputs, config).items()}

    def call(self, model, tensors, mode="call"):
        import torch

        with torch.inference_mode():
            hidden = model.model(**tensors, use_cache=False).last_hidden_state
        return hidden.float().numpy().copy()

    def extra(self, model, inputs) -> dict:
        return {"attn_implementation": getattr(model.config, "_attn_implementation", None)}


def make_runner(peer: str, preset: Path) -> _Runner:
    runners = {
        "refimpl-numpy": lambda: _Refimpl("numpy"),
        "refimpl-numba": lambda: _Refimpl("numba"),
        "refimpl-numba-mmap": lambda: _Refimpl("numba", mmap=True),
        "refimpl-numba-stream": lambda: _Refimpl("numba", stream=True),
        "refimpl-numba-f64-stream": lambda: _Refimpl("numba", stream=True, dtype="float64"),
        "refimpl-numba-blocked": lambda: _Refimpl("numba", blocked=True),
        "keras-jax": lambda: _Keras("jax"),
        "keras-torch": lambda: _Keras("torch"),
        "transformers": _Transformers,
    }
    runner = runners[peer]()
    runner._preset = preset
    return runner


def _import_peer(peer: str) -> None:
    """Import what the peer needs (timed apart from loading)."""
    if peer.startswith("keras"):
        import keras  # noqa: F401
        import keras_hub  # noqa: F401
    elif peer == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    else:
        import refimpl.model  # noqa: F401
        if "numba" in peer:
            from refimpl.kernels import get_kernels

            get_kernels("numba")  # imports numba; compiled kernels load from the cache on first call


def run_child(peer: str, preset: Path, inputs_path: Path, reference: Path | None, output: Path,
              repeats: int) -> dict:
    """Everything one peer's process measures (see the module docstring)."""
    result: dict[str, Any] = {"peer": peer, "loadavg_start": _loadavg(), "pid": os.getpid()}
    result["import_s"], _ = _timed(lambda: _import_peer(peer))
    with np.load(inputs_path, allow_pickle=False) as data:
        inputs = {k: data[k] for k in data.files}
    runner = make_runner(peer, preset)
    result["load_s"], model = _timed(lambda: runner.load(preset))
    raw_inputs, inputs = inputs, runner.prepare(model, inputs)
    result["first_call_s"], out = _timed(lambda: runner.call(model, inputs, runner.modes[0]))
    np.save(output, out)
    result["agreement"] = _agreement(out, reference)
    if not result["agreement"]["agrees"]:
        result["error"] = "output disagrees with the reference: not timed"
        return result
    modes = {}
    for mode in runner.modes:
        first = None
        if mode != runner.modes[0]:  # a compiled mode: its first call compiles
            first, mode_out = _timed(lambda: runner.call(model, inputs, mode))
            agreement = _agreement(mode_out, reference)
            if not agreement["agrees"]:
                modes[mode] = {"error": "output disagrees", "agreement": agreement}
                continue
        times = [_timed(lambda: runner.call(model, inputs, mode))[0] for _ in range(repeats)]
        modes[mode] = {"first_s": first, "steady_s": times, "median_s": float(np.median(times)),
                       "min_s": float(min(times))}
    result["modes"] = modes
    best = min((m for m in modes.values() if "median_s" in m), key=lambda m: m["median_s"])
    result["steady_mode"] = next(name for name, m in modes.items() if m is best)
    result["steady_median_s"], result["steady_min_s"] = best["median_s"], best["min_s"]
    result["first_call_overhead_s"] = result["first_call_s"] - modes[runner.modes[0]]["median_s"]
    result.update(runner.extra(model, raw_inputs))
    result["threadpools"] = _threadpools()
    result["loadavg_end"] = _loadavg()
    result["ru_maxrss_self_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ---- matrix throughput -----------------------------------------------------------------------------------------
def matmul_profile(model, inputs, passes: int = 3) -> dict:
    """refimpl's achieved GFLOP/s in its matmuls (per call best of ``passes`` forwards) vs numpy's GEMM, same shapes."""
    import dataclasses

    base = model.kernels
    calls: list[list[float]] = []
    shapes: list[tuple[int, int, int]] = []

    def timed_matmul(x, w):
        start = time.perf_counter()
        out = base.matmul(x, w)
        calls[-1].append(time.perf_counter() - start)
        if len(calls) == 1:
            shapes.append((int(np.prod(x.shape[:-1])), int(w.shape[0]), int(w.shape[1])))
        return out

    model.kernels = dataclasses.replace(base, matmul=timed_matmul)
    try:
        for _ in range(passes):
            calls.append([])
            model(inputs)
    finally:
        model.kernels = base
    best = np.min(np.array(calls), axis=0)
    flops = np.array([2 * m * k * n for m, k, n in shapes], dtype=np.float64)
    gemm = numpy_gemm_seconds(sorted(set(shapes)))
    numpy_time = sum(gemm[s] for s in shapes)
    return {"calls": len(shapes), "gflop": float(flops.sum() / 1e9),
            "refimpl_gflops": float(flops.sum() / best.sum() / 1e9),
            "numpy_gemm_gflops": float(flops.sum() / numpy_time / 1e9),
            "ratio": float(numpy_time / best.sum()),
            "per_shape": [{"m_k_n": list(s), "count": shapes.count(s),
                           "refimpl_gflops": float(2 * np.prod(s) * shapes.count(s)
                                                   / best[[i for i, t in enumerate(shapes) if t == s]].sum() / 1e9),
                           "numpy_gflops": float(2 * np.prod(s) / gemm[s] / 1e9)} for s in sorted(set(shapes))]}


def numpy_gemm_seconds(shapes, repeats: int = 3) -> dict[tuple[int, int, int], float]:
    """Best time of ``np.matmul`` f32[M, K] @ f32[K, N] on fresh random data, per shape."""
    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        np.matmul(a, b)
        out[(m, k, n)] = min(_timed(lambda: np.matmul(a, b))[0] for _ in range(repeats))
    return out


def numba_cache_stats() -> dict:
    """Cache hits and misses of every compiled core in refimpl.kernels.numba_kernels (misses mean compiling)."""
    from refimpl.kernels import numba_kernels

    hits = misses = 0
    for value in vars(numba_kernels).values():
        stats = getattr(value, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    return {"cache_hits": hits, "cache_misses": misses}


def blocked_kernels():
    """The numba set with a column-blocked matmul: an experiment, see the module docstring."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from refimpl.kernels import get_kernels

    base = get_kernels("numba")
    threadpool_limits(1, user_api="blas")  # for the whole process: the workers below are the parallelism
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    blocks = 4 * (os.cpu_count() or 1)

    def matmul(x, w):
        if x.dtype != w.dtype or w.ndim != 2 or w.shape[1] < 2 * blocks:
            return base.matmul(x, w)
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty((rows.shape[0], w.shape[1]), dtype=np.result_type(x, w))
        edges = np.linspace(0, w.shape[1], blocks + 1).astype(int)

        def work(i):
            np.matmul(rows, w[:, edges[i]:edges[i + 1]], out=out[:, edges[i]:edges[i + 1]])

        list(pool.map(work, range(blocks)))
        return out.reshape(x.shape[:-1] + (w.shape[1],))

    return dataclasses.replace(base, name="numba+blocked-matmul", matmul=matmul)


# ---- the parent ----------------------------------------------------------------------------------------------
def child_env(peer: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if peer.startswith("keras-"):
        env["KERAS_BACKEND"] = peer.split("-", 1)[1]
    return env


def spawn(args: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, int]:
    """Run ``python -m tools.bench_models ARGS`` and return (exit status, peak RSS bytes of that child)."""
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "tools.bench_models", *args], cwd=REPO, env=env,
                                   stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, usage.ru_maxrss * 1024
            if time.monotonic() > deadline:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = -9
                return -9, usage.ru_maxrss * 1024
            time.sleep(0.2)


def run_peer(peer: str, work: Path, preset: Path, inputs: Path, reference: Path | None, repeats: int,
             timeout: float, tag: str) -> dict:
    result_path, output_path, log = work / f"{tag}.json", work / f"{tag}.npy", work / f"{tag}.log"
    result_path.unlink(missing_ok=True)
    args = ["--child", peer, "--preset", str(preset), "--inputs", str(inputs), "--output", str(output_path),
            "--result", str(result_path), "--repeats", str(repeats)]
    if reference is not None:
        args += ["--reference", str(reference)]
    status, peak = spawn(args, child_env(peer), log, timeout)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"peer": peer}
    result.update({"exit_status": status, "peak_rss_bytes": peak, "log": str(log), "output": str(output_path)})
    if status != 0 and "error" not in result:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
        result["error"] = f"child exited with {status}: " + " | ".join(tail)
    return result


def prepare_hf(preset: Path, log: Path, timeout: float) -> dict:
    """Convert the preset to an HF checkpoint once (in a child: the conversion holds two copies of the weights)."""
    target = hf_dir(preset)
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return {"reused": str(target)}
    start = time.perf_counter()
    status, peak = spawn(["--prepare-hf", str(preset)], child_env("transformers"), log, timeout)
    return {"written": str(target), "seconds": time.perf_counter() - start, "exit_status": status,
            "peak_rss_bytes": peak}


def hf_dir(preset: Path) -> Path:
    return Path(preset).parent / (Path(preset).name + "-hf")


def write_hf_checkpoint(preset: Path) -> None:
    """config.json and model.safetensors under HF's names, from the Keras preset (refimpl's reader, float32)."""
    from conformance.hf_backend import hf_config_dict, hf_state_dict
    from refimpl.dtypes import Policy
    from refimpl.model import read_preset_config
    from refimpl.weights import load_params
    from tools.export_case import write_safetensors

    config = read_preset_config(preset)
    params = load_params(preset, config, Policy("float32"))
    tensors = hf_state_dict(params, config)
    del params
    target = hf_dir(preset)
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors(target / "model.safetensors.partial", tensors)
    os.replace(target / "model.safetensors.partial", target / "model.safetensors")
    (target / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2) + "\n")


def make_inputs_file(config, path: Path) -> None:
    from tools.keras_oracle import make_inputs

    inputs = make_inputs(config.to_keras_config(), batch=1, text_len=TEXT_TOKENS, seed=INPUT_SEED,
                         kind="prefix_padded")
    np.savez(path, **inputs)


# ---- reporting -----------------------------------------------------------------------------------------------
def best_of_rounds(rounds: list[dict[str, dict]], peer: str) -> dict | None:
    """The peer's successful rounds combined: the round with the fastest steady median, with load, first call and
    preset-to-first-output replaced by their minima over the rounds and peak RSS by its maximum (the worst)."""
    runs = [r[peer] for r in rounds if peer in r and "steady_median_s" in r[peer] and not r[peer].get("error")]
    if not runs:
        return None
    best = dict(min(runs, key=lambda r: r["steady_median_s"]))
    for key in ("load_s", "first_call_s"):
        best[key] = min(r[key] for r in runs)
    best["preset_to_first_output_s"] = min(r["load_s"] + r["first_call_s"] for r in runs)
    best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    best["rounds"] = len(runs)
    return best


def summary(rounds: list[dict[str, dict]], peers: list[str], absent: dict[str, str], weight_bytes: int) -> dict:
    table = {}
    for peer in peers:
        if peer in absent:
            table[peer] = {"absent": absent[peer]}
            continue
        best = best_of_rounds(rounds, peer)
        if best is None:
            errors = [r[peer].get("error", "no result") for r in rounds if peer in r]
            table[peer] = {"failed": errors[-1] if errors else "not run"}
            continue
        best["rss_over_weights"] = best["peak_rss_bytes"] / weight_bytes
        table[peer] = best
    base = table.get(BASELINE, {})
    for row in table.values():
        if "steady_median_s" in row and "steady_median_s" in base:
            row["ratios_vs_" + BASELINE] = {
                "load": row["load_s"] / base["load_s"],
                "preset_to_first_output": row["preset_to_first_output_s"] / base["preset_to_first_output_s"],
                "steady": row["steady_median_s"] / base["steady_median_s"],
                "peak_rss": row["peak_rss_bytes"] / base["peak_rss_bytes"]}
    return table


def format_table(table: dict, weight_bytes: int) -> str:
    head = (f"{'peer':26s} {'load s':>7s} {'1st call':>8s} {'to 1st out':>10s} {'steady s':>9s} {'min s':>6s} "
            f"{'peak RSS':>8s} {'/weights':>8s} {'rel diff':>8s}   ratios vs {BASELINE}: load, to 1st out, steady, RSS")
    lines = [head, "-" * len(head)]
    for peer, row in table.items():
        if "absent" in row or "failed" in row:
            state = f"absent: {row['absent']}" if "absent" in row else f"FAILED: {row['failed']}"
            lines.append(f"{peer:26s} {state}")
            continue
        ratios = row.get("ratios_vs_" + BASELINE, {})
        ratio_text = ", ".join(f"{ratios[k]:.2f}x" for k in ("load", "preset_to_first_output", "steady", "peak_rss")
                               ) if ratios else ""
        mode = "" if row.get("steady_mode") in ("call", "eager") else f" [{row['steady_mode']}]"
        lines.append(f"{peer:26s} {row['load_s']:7.2f} {row['first_call_s']:8.2f} "
                     f"{row['preset_to_first_output_s']:10.2f} {row['steady_median_s']:9.3f} "
                     f"{row['steady_min_s']:6.3f} "
                     f"{row['peak_rss_bytes'] / 2**30:7.2f}G "
                     f"{row['rss_over_weights']:8.2f} {row['agreement']['max_rel_diff']:8.1e}   {ratio_text}{mode}")
    lines.append(f"(weights: {weight_bytes / 2**30:.2f} GiB in float32; 'to 1st out' = load + first call; steady = "
                 "median of the repeats, best round; rel diff = max|out - ref| / max|ref| vs refimpl-numpy float32)")
    return "\n".join(lines)


def format_details(table: dict) -> str:
    lines = []
    numba = table.get(BASELINE, {})
    matmul = numba.get("matmul")
    if matmul:
        lines.append(f"matrix work ({matmul['calls']} matmuls, {matmul['gflop']:.1f} GFLOP per forward): "
                     f"refimpl-numba {matmul['refimpl_gflops']:.1f} GFLOP/s, numpy float32 GEMM on the same shapes "
                     f"{matmul['numpy_gemm_gflops']:.1f} GFLOP/s -> {100 * matmul['ratio']:.0f}%")
    for peer in (BASELINE, REFERENCE):
        row = table.get(peer, {})
        if "first_call_overhead_s" in row:
            cache = row.get("numba_cache")
            cache_text = f" (numba cache: {cache['cache_hits']} hits, {cache['cache_misses']} misses)" if cache else ""
            lines.append(f"first-call overhead {peer}: {row['first_call_overhead_s']:.2f} s{cache_text}")
    for peer, row in table.items():
        if "threadpools" in row:
            pools = "; ".join(f"{p.get('internal_api', p.get('note'))} {p.get('version', '')} "
                              f"{p.get('architecture', '')} x{p.get('num_threads', '')}".strip()
                              for p in row["threadpools"])
            lines.append(f"threadpools {peer}: {pools or 'none reported'}; load average {row['loadavg_start']} -> "
                         f"{row['loadavg_end']}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------
def parse_args(argv):
    # Nothing of refimpl is imported here: a child times its own imports.
    parser = argparse.ArgumentParser(prog="python -m tools.bench_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(DEFAULT_PEERS), default="midsize",
                        help="a workload of tools.make_big_preset.WORKLOADS")
    parser.add_argument("--peers", help=f"comma-separated subset of {', '.join(PEERS)} (default: per workload)")
    parser.add_argument("--rounds", type=int, default=2, help="times every peer runs (best round is tabled)")
    parser.add_argument("--repeats", type=int, default=5, help="steady calls per run")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where presets and results go (not the repo)")
    parser.add_argument("--json", type=Path, help="results file (default: DIR/WORKLOAD-bench.json)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    parser.add_argument("--storage", choices=("float32", "bfloat16"), default="float32")
    # child modes (internal)
    parser.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--prepare-hf", type=Path, help=argparse.SUPPRESS)
    for name in ("preset", "inputs", "output", "result", "reference"):
        parser.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_hf:
        write_hf_checkpoint(args.prepare_hf)
        return 0
    if args.child:
        try:
            result = run_child(args.child, args.preset, args.inputs, args.reference, args.output, args.repeats)
        except Exception as error:  # noqa: BLE001 - reported in the table, the other peers still run
            import traceback

            traceback.print_exc()
            result = {"peer": args.child, "error": f"{type(error).__name__}: {error}"}
        args.result.write_text(json.dumps(result, indent=1, default=str))
        return 0 if "error" not in result else 3
    return run_parent(args)


def run_parent(args) -> int:
    from refimpl.config import count_params
    from tools.make_big_preset import WORKLOADS, make_preset

    config = WORKLOADS[args.workload]
    peers = args.peers.split(",") if args.peers else list(DEFAULT_PEERS[args.workload])
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; expected some of {PEERS}")
    if REFERENCE not in peers:
        peers.insert(0, REFERENCE)  # the outputs are checked against it
    peers.sort(key=lambda p: p != REFERENCE)
    work = args.dir / f"{args.workload}-runs"
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    preset, wrote = make_preset(args.dir / (args.workload if args.storage == "float32"
                                            else f"{args.workload}-{args.storage}"), config, storage=args.storage)
    print(f"preset {preset}: {'written' if wrote else 'reused'} ({time.perf_counter() - start:.1f} s)", flush=True)
    inputs = work / "inputs.npz"
    make_inputs_file(config, inputs)
    absent = {p: reason for p in peers if (reason := absent_reason(p))}
    report: dict[str, Any] = {"workload": args.workload, "config": config.to_keras_config(), "preset": str(preset),
                              "parameters": count_params(config), "text_tokens": TEXT_TOKENS, "machine": machine(),
                              "absent": absent, "rounds": []}
    if "transformers" in peers and "transformers" not in absent:
        report["hf_conversion"] = prepare_hf(preset, work / "hf-conversion.log", args.timeout)
        if report["hf_conversion"].get("exit_status", 0) != 0:
            absent["transformers"] = f"conversion to an HF checkpoint failed (see {work / 'hf-conversion.log'})"
    weight_bytes = count_params(config) * 4
    reference = None
    for round_number in range(args.rounds):
        results = {}
        for peer in peers:
            if peer in absent:
                continue
            print(f"round {round_number + 1}/{args.rounds}: {peer} (load average {_loadavg()})", flush=True)
            tag = f"r{round_number}-{peer}"
            result = run_peer(peer, work, preset, inputs, None if peer == REFERENCE else reference, args.repeats,
                              args.timeout, tag)
            if peer == REFERENCE and "error" not in result:
                reference = Path(result["output"])
            results[peer] = result
            state = result.get("error") or (f"steady {result['steady_median_s']:.3f} s, peak RSS "
                                             f"{result['peak_rss_bytes'] / 2**30:.2f} GiB")
            print(f"    {state}", flush=True)
        report["rounds"].append(results)
    table = summary(report["rounds"], peers, absent, weight_bytes)
    report["summary"] = table
    path = args.json or args.dir / f"{args.workload}-bench.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print()
    print(f"workload {args.workload}: {count_params(config) / 1e6:.0f} M parameters, batch 1, "
          f"{config.image_sequence_length} image + {TEXT_TOKENS} text tokens; {report['machine']['summary']}")
    print(format_table(table, weight_bytes))
    print(format_details(table))
    print(f"results: {path}")
    return 0


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {}
    for module in ("numpy", "numba", "keras", "keras_hub", "jax", "torch", "transformers"):
        try:
            versions[module] = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    text = f"{os.cpu_count()} cores ({cpu}), {memory / 2**30:.0f} GiB, load average {_loadavg()}"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "versions": versions, "summary": text}


if __name__ == "__main__":
    sys.exit(main())
