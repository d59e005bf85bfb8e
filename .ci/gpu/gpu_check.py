"""The prepared GPU check: every GPU claim of the project measured in one short lease (issue 25).

A lease gives 15 minutes of device time in all, a bare machine with no package index, and 64 MiB
carried per call. So everything is built beforehand on the CPU machine and the run is two
back-to-back calls of a few minutes, each one command that calls this script:

    .ci/gpu/run prepare            # CPU machine: wheels, project, corpus, model parts -> .gpu/
    .ci/gpu/run first              # call 1 (carry .gpu/common .gpu/part1): (a) tests, (b) bench
    .ci/gpu/run second             # call 2 (carry .gpu/common .gpu/part2): (e) FSDP2, (c) distill, (d) + Liger,
                                   #   (f) long context: the p=0.5 long retrofits (uniform, two per KV head), then 8k-32k, 64k

    .ci/gpu/run dry-run            # CPU rehearsal of all three (CI runs it): tiny shapes, a few steps

Device calls (each under the tool's 2,000 characters):

    run(command=".ci/gpu/run first", carry=[".gpu/common", ".gpu/part1"], timeout_s=420)
    run(command=".ci/gpu/run second", carry=[".gpu/common", ".gpu/part2"], timeout_s=480)

Call 1 keeps its half of the embedded SmolLM2 GGUF in /tmp/hf-prope-gpu (outside the work
tree, which each call replaces) for call 2, which must follow while the machine is still warm
(30 s); if it finds no first half it says so and stops. Every result lands as JSON under $OUT:
``tests.xml`` and ``tests.json`` (a), ``bench.json`` (b), ``distill.json`` (c),
``distill_liger.json`` (d), ``fsdp_distill.json`` and ``fsdp_lm.json`` (e), ``long_train.json``,
``long_train_turns.json``, ``long_train_heads.json``, ``long_eval.json`` and ``long_eval_64k.json`` (f), and ``first.json`` /
``second.json`` (what ran, for how long, the machine). Standard library only, plus the project
once installed.

(e) runs first in call 2 because it is short: the recipe under FSDP2 on one process (torchrun,
accelerate's fully_shard of every decoder layer), a few steps of the staged distillation (the
teacher and the layer-wise student under sharding) saved merged (from the gathered adapter), and
of the LM objective with its control (the patched stage on a freshly loaded base). On the CPU
rehearsal accelerate cannot shard, so the recipe must refuse both runs before any work.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEST = ROOT / ".gpu"
STASH = Path(os.environ.get("HF_PROPE_GPU_STASH", "/tmp/hf-prope-gpu"))
SITE = Path(os.environ.get("HF_PROPE_GPU_SITE", "/tmp/hf-prope-site"))
MODEL_NAME = "smollm2-135m.gguf"
DOCS_ARCHIVE = "python-docs.tar.xz"
# What the GPU image lacks (its package list: the device tool's KINDS.md): datasets and the two
# pure-Python packages it needs beyond the image, gguf, Liger-Kernel, TRL.
WHEELS = ("datasets", "dill", "multiprocess", "gguf", "liger-kernel", "trl")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIGER_ROPE_ONLY = (
    '{"rope": true, "rms_norm": false, "swiglu": false, "cross_entropy": false, "fused_linear_cross_entropy": false}'
)


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# prepare (CPU machine)


def _download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(folder),
            *pins,
        ]
    )
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(folder)])


def _pack_docs(archive: Path, docs: Path | None) -> None:
    """CPython 3.11's reST sources (Debian's python3.11-doc), as one small archive."""
    with tempfile.TemporaryDirectory(prefix="hf-prope-docs-") as tmp:
        if docs is None:
            run(["apt-get", "download", "python3.11-doc"], cwd=tmp, stdout=subprocess.DEVNULL)
            deb = next(Path(tmp).glob("python3.11-doc_*.deb"))
            run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
            docs = Path(tmp) / "x" / "usr/share/doc/python3.11/html/_sources"
        with tarfile.open(archive, "w:xz") as tar:
            for path in sorted(docs.rglob("*.txt")):
                tar.add(path, arcname=str(Path("docs") / path.relative_to(docs)))


def prepare(dest: Path, docs: Path | None = None) -> dict:
    from hf_prope.models import embedded_gguf_path

    started = time.time()
    if dest.exists():
        shutil.rmtree(dest)
    common = dest / "common"
    _download_wheels(common / "wheels")
    _pack_docs(common / DOCS_ARCHIVE, docs)
    model = embedded_gguf_path("smollm2-135m")
    data = model.read_bytes()
    half = len(data) // 2
    for i, chunk in enumerate((data[:half], data[half:]), start=1):
        (dest / f"part{i}").mkdir(parents=True)
        (dest / f"part{i}" / f"{MODEL_NAME}.part{i}").write_bytes(chunk)
    manifest = {
        "model": MODEL_NAME,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "model_bytes": len(data),
        "wheels": sorted(p.name for p in (common / "wheels").iterdir()),
        "prepared_on": platform.node(),
        "prepared_in_s": round(time.time() - started, 1),
    }
    (common / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    def mib(folder: Path) -> float:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20

    for part in ("part1", "part2"):
        size = mib(common) + mib(dest / part)
        if size > 56:  # with the work tree (about 3 MiB) under the 64 MiB a call carries
            raise SystemExit(f"common + {part} is {size:.1f} MiB: too large to carry with the work tree.")
        say(f"a call carries common + {part}: {size:.1f} MiB")
    return manifest


# ---------------------------------------------------------------------------------------------
# on the device machine


def _install(common: Path, dry: bool) -> None:
    """The carried wheels into a site folder on PYTHONPATH (the GPU image has no package index)."""
    wheels = sorted((common / "wheels").glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    missing = [n for n in (*WHEELS, "hf-prope") if n.replace("_", "-") not in names]
    if missing:
        raise SystemExit(f"prepare left out wheels of {missing}: run .ci/gpu/run prepare again")
    if dry:
        say(f"dry run: {len(wheels)} wheels present; not installed (this machine has them and is not Python 3.12)")
        return
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(SITE),
            *map(str, wheels),
        ]
    )
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = f"{SITE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


def _docs(common: Path) -> Path:
    target = STASH / "docs"
    if not target.is_dir():
        STASH.mkdir(parents=True, exist_ok=True)
        with tarfile.open(common / DOCS_ARCHIVE) as tar:
            tar.extractall(STASH, filter="data")
    return target


def _machine(device: str) -> dict:
    info = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(), "device": device}
    try:
        import torch
        import transformers

        info |= {"torch": torch.__version__, "transformers": transformers.__version__}
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _hf_prope(args: list[str], out: Path, *, launcher: tuple[str, ...] = (), quiet: bool = False) -> dict:
    """``python [-m launcher] -m hf_prope ARGS`` (output to ``out``): seconds and return code; a failure is recorded.

    Run outside the work tree with PYTHONSAFEPATH, so the installed hf_prope (with its patches/ and
    recipes/ subpackages) is imported, never the source folder. ``quiet``: a failure is expected
    (the rehearsal's refusals), so its log is not echoed.
    """
    started = time.time()
    cmd = [sys.executable, *launcher, "-m", "hf_prope", *args]
    say("$ " + " ".join(cmd))
    with open(out, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=STASH, env=_env()).returncode
    if code != 0 and not quiet:
        say(f"FAILED ({code}); the end of {out.name}:\n" + out.read_text()[-3000:])
    return {"s": round(time.time() - started, 1), "returncode": code, "log": out.name}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}


def first(out: Path, common: Path, part: Path, device: str, quick: bool, dry: bool) -> dict:
    """Call 1: (a) the test suite (the GPU-only tests included), (b) the benchmark; keeps the model's first half."""
    report = {"machine": _machine(device), "steps": {}}
    _install(common, dry)
    STASH.mkdir(parents=True, exist_ok=True)
    shutil.copy2(part / f"{MODEL_NAME}.part1", STASH / f"{MODEL_NAME}.part1")
    started = time.time()
    tests = ["tests/test_rotary_kernel.py"] if quick else []
    # pytest-xdist is in the GPU image: the suite in parallel, each test module on one worker.
    n = os.environ.get("HF_PROPE_GPU_WORKERS", "6")
    workers = [] if quick or dry or n in ("", "0") else ["-n", n, "--dist", "loadfile"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not real_model",
            *workers,
            f"--junitxml={out / 'tests.xml'}",
            *tests,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    tail = result.stdout.strip().splitlines()[-1:] or [""]
    (out / "tests.json").write_text(
        json.dumps(
            {"returncode": result.returncode, "summary": tail[0], "stdout_tail": result.stdout[-6000:]}, indent=2
        )
        + "\n"
    )
    report["steps"]["a_tests"] = {
        "s": round(time.time() - started, 1),
        "returncode": result.returncode,
        "summary": tail[0],
    }
    say(f"(a) tests: {tail[0]}")
    bench = [
        "bench",
        "--device",
        device,
        "--only",
        "rotary,head_mask" if quick else "rotary,train,decode,head_mask",
        "--out",
        str(out / "bench.json"),
        *(["--quick"] if quick else []),
    ]
    report["steps"]["b_bench"] = _hf_prope(bench, out / "bench.txt")
    return report


def _model_file() -> Path:
    """The embedded GGUF, joined from call 1's half (kept in the stash) and call 2's."""
    return STASH / MODEL_NAME


def _run_settings(model: Path, docs: Path) -> list[str]:
    """What every recipe run of call 2 sets: the joined model, the docs, nothing sent or exported."""
    return [f"model={model}", f"dataset={docs}", "report_to=none", "gguf=null", "save_steps=100000"]


def _distill_run(name: str, settings: list[str], out: Path, **kwargs) -> dict:
    """``hf-prope run lora --config smollm2_135m_p_rope_distill SETTINGS`` into the stash's NAME folder."""
    args = ["run", "lora", "--config", "smollm2_135m_p_rope_distill", *settings]
    return _hf_prope([*args, f"output_dir={STASH / name}", "overwrite=true"], out / f"{name}.txt", **kwargs)


def second(out: Path, common: Path, part: Path, device: str, quick: bool, dry: bool) -> dict:
    """Call 2: (c) the distillation retrofit at SmolLM2's 8192-token context, (d) the same under Liger's rope."""
    report = {"machine": _machine(device), "steps": {}}
    _install(common, dry)
    head = STASH / f"{MODEL_NAME}.part1"
    if not head.is_file():
        raise SystemExit(
            f"No first half of the model at {head}: this is a fresh machine. Run '.ci/gpu/run first' and "
            "this call back to back (the machine stays warm 30 s)."
        )
    manifest = json.loads((common / "manifest.json").read_text())
    model = _model_file()
    with open(model, "wb") as f:
        f.write(head.read_bytes())
        f.write((part / f"{MODEL_NAME}.part2").read_bytes())
    if sha256(model) != manifest["model_sha256"]:
        raise SystemExit("The joined model does not match the prepared one (sha256): run prepare again.")
    docs = _docs(common)
    overrides = _run_settings(model, docs)
    if quick:  # the CPU rehearsal: the same recipe and config, tiny shapes, a few steps
        overrides += [
            "max_steps=2",
            "transfer_steps=1",  # one step of each stage of the staged objective
            "block_size=256",
            "eval_window=256",
            "eval_windows=2",
            "eval_contexts=[128,256]",
            "per_device_train_batch_size=1",
            "bf16=false",
            "gradient_checkpointing=false",
            "logging_steps=1",
        ]
    report["steps"]["e_fsdp"] = _fsdp(out, model, docs, device)
    runs = {"c_distill": [], "d_distill_liger": ["use_liger_kernel=true", f"liger_kernel_config={LIGER_ROPE_ONLY}"]}
    for name, extra in runs.items():
        if name == "d_distill_liger" and device != "cuda":
            report["steps"][name] = {"skipped": "Liger-Kernel's Trainer integration needs CUDA"}
            continue
        run_dir = STASH / name
        step = _distill_run(name, [*overrides, *extra], out)
        target = out / ("distill.json" if name == "c_distill" else "distill_liger.json")
        if (run_dir / "results.json").is_file():
            shutil.copy2(run_dir / "results.json", target)
            step["results"] = target.name
        report["steps"][name] = step
    report["steps"]["f_long_context"] = _long_context(out, model, docs, device, quick)
    return report


# (f): documents no run of (f) trains on; os and stdtypes hold 32,768 tokens each, the other two 16,384.
LONG_HELDOUT = (
    "library/os.rst.txt",
    "library/stdtypes.rst.txt",
    "library/multiprocessing.rst.txt",
    "library/ssl.rst.txt",
)
# (f)'s retrofits, each trained, then all scored by the eval recipe: uniform p-RoPE; per KV head with every
# rotating pair turning inside 8192; per KV head by 2-norm (the one that met every CPU target with dynamic:2).
LONG_RETROFITS = {
    "long_train": "smollm2_135m_p_rope_long",
    "long_train_turns": "smollm2_135m_p50_long_turns",
    "long_train_heads": "smollm2_135m_p50_long_heads",
}
# dynamic:2 / dynamic:4 beside YaRN: on CPU dynamic NTK x2 was the best zero-shot extension and the one the
# per-head retrofit met its 16384 target with; 32768 (4x) is where x2 and x4 part.
LONG_EVAL = [
    "p=[1.0,0.5]",
    "extensions=[none,yarn:2,yarn:4,dynamic:2,dynamic:4,temperature:4]",
    "batch_size=1",
]


def _long_context(out: Path, model: Path, docs: Path, device: str, quick: bool) -> dict:
    """(f) the long-context retrofits (LONG_RETROFITS, bf16) on the docs less four held out, then the eval recipe
    on those four: original, YaRN, p=0.5 and the retrofits at 8k/16k/32k (each window inside one document)
    with passkey, and at 64k (windows across the four documents, joined)."""
    train, heldout = STASH / "long-train", STASH / "long-heldout"
    for folder in (train, heldout):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(docs, train)
    heldout.mkdir(parents=True)
    for name in LONG_HELDOUT:
        shutil.move(str(train / name), str(heldout / Path(name).name))
    base = [f"model={model}", "report_to=none", "gguf=null", "save_steps=100000"]
    steps: dict = {}
    adapters = []
    for name, config in LONG_RETROFITS.items():
        trained = STASH / name
        train_args = ["run", "lora", "--config", config, *base, f"dataset={train}"]
        train_args += [f"output_dir={trained}", "overwrite=true"]
        if quick:
            train_args += ["max_steps=2", "transfer_steps=1", "transfer_blocks=1", "block_size=256"]
            train_args += ["eval_window=256", "eval_contexts=[256]"]
        else:
            train_args += ["bf16=true", "gradient_checkpointing=true"]
        steps[name] = _hf_prope(train_args, out / f"{name}.txt")
        if (trained / "results.json").is_file():
            shutil.copy2(trained / "results.json", out / f"{name}.json")
        if (trained / "adapter").is_dir():
            adapters.append(str(trained / "adapter"))
    adapter = f"trained=[{','.join(adapters)}]" if adapters else "trained=null"
    evals = {
        "long_eval": ["windows=documents", "contexts=[2048,8192,16384,32768]", "eval_tokens=32768"]
        + ["passkey_lengths=[8192,16384,32768]", "passkey_depths=[0.0,0.25,0.5,0.75,1.0]", "passkey_trials=2"],
        "long_eval_64k": ["windows=tail", "contexts=[8192,32768,65536]", "eval_tokens=131072", "passkey_lengths=null"],
    }
    variants = LONG_EVAL
    if quick:  # the same runs on tiny windows, fewer variants
        evals = {
            "long_eval": ["windows=documents", "contexts=[128,256]", "eval_tokens=256", "passkey_lengths=[128]"]
            + ["passkey_depths=[0.0,1.0]", "passkey_trials=1"],
            "long_eval_64k": ["windows=tail", "contexts=[512]", "eval_tokens=512", "passkey_lengths=null"],
        }
        variants = ["p=[1.0]", "extensions=[none,yarn:2,dynamic:2]", "batch_size=1"]
    for name, extra in evals.items():
        folder = STASH / name
        args = ["run", "eval", "--config", "smollm2_135m_long_eval", f"model={model}", f"dataset={heldout}"]
        steps[name] = _hf_prope([*args, *variants, *extra, adapter, f"output_dir={folder}"], out / f"{name}.txt")
        if (folder / "results.json").is_file():
            shutil.copy2(folder / "results.json", out / f"{name}.json")
            steps[name]["results"] = f"{name}.json"
        if (folder / "passkey.png").is_file():
            shutil.copy2(folder / "passkey.png", out / f"{name}_passkey.png")
    return steps


# (e): the run settings; SmolLM2's decoder layers are Llama's.
FSDP_CONFIG = '{"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "reshard_after_forward": true}'
FSDP_SHORT = [
    "max_steps=6",
    "block_size=1024",
    "eval_window=1024",
    "eval_windows=4",
    "eval_contexts=[512,1024]",
    "heldout_documents=tail",
    "logging_steps=1",
]
FSDP_RUNS = {
    # staged distillation: 2 layer-wise transfer steps, then KL; merged from the gathered adapter
    "fsdp_distill": ["transfer_steps=2", "save_method=merged"],
    # the LM objective with its control: two trainer stages, the second on a freshly loaded base
    "fsdp_lm": [
        "objective=lm",
        "control=true",
        "transfer_steps=0",
        "transfer_learning_rate=null",
        "save_method=adapter",
    ],
}
FSDP_REFUSAL = "FSDP was asked for"


def _fsdp(out: Path, model: Path, docs: Path, device: str) -> dict:
    """(e) the recipe under FSDP2 on one process (GPU); on the CPU rehearsal, both runs refused before any work."""
    steps: dict = {}
    for name, extra in FSDP_RUNS.items():
        run_dir = STASH / name
        step = _distill_run(
            name,
            [*_run_settings(model, docs), *FSDP_SHORT, *extra, "fsdp=true", f"fsdp_config={FSDP_CONFIG}"],
            out,
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"),
            quiet=device != "cuda",
        )
        if device != "cuda":
            log = (out / f"{name}.txt").read_text()
            step["refused_before_any_work"] = step["returncode"] != 0 and FSDP_REFUSAL in log and not run_dir.exists()
            if not step["refused_before_any_work"]:
                raise SystemExit(
                    f"(e) {name}: FSDP on a CPU-only machine was not refused before any work:\n{log[-3000:]}"
                )
        elif (run_dir / "results.json").is_file():
            summary = json.loads((run_dir / "results.json").read_text())
            shutil.copy2(run_dir / "results.json", out / f"{name}.json")
            step |= {"results": f"{name}.json", "engine": summary["training"]["engine"]}
            step["parameters_per_process"] = summary["training"]["parameters_per_process"]
            step["saved"] = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
        steps[name] = step
    return steps


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=".ci/gpu/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["prepare", "first", "second", "dry-run"])
    parser.add_argument("--dest", type=Path, default=DEST, help="where prepare writes (default: .gpu/)")
    parser.add_argument("--docs", type=Path, help="prepare: a local _sources folder instead of apt-get download")
    parser.add_argument("--device", default=None, help="cuda (default on the device machine) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few steps (the rehearsal)")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        print(json.dumps(prepare(args.dest, args.docs), indent=2))
        return 0
    if args.step == "dry-run":
        global STASH
        with tempfile.TemporaryDirectory(prefix="hf-prope-gpu-dry-") as tmp:
            STASH = Path(tmp) / "stash"
            dest, out = Path(tmp) / "gpu", Path(tmp) / "out"
            out.mkdir()
            prepare(dest, args.docs)
            reports = {
                "first": first(out, dest / "common", dest / "part1", "cpu", True, True),
                "second": second(out, dest / "common", dest / "part2", "cpu", True, True),
            }
            produced = sorted(p.name for p in out.iterdir())
            for name in (
                "tests.json",
                "tests.xml",
                "bench.json",
                "distill.json",
                *(f"{name}.json" for name in LONG_RETROFITS),
                "long_eval.json",
                "long_eval_64k.json",
            ):
                if name not in produced:
                    raise SystemExit(f"the rehearsal produced no {name} (it produced {produced})")
            if reports["first"]["steps"]["a_tests"]["returncode"] != 0:
                raise SystemExit(f"the rehearsal's tests failed: {reports['first']['steps']['a_tests']['summary']}")
            summary = json.loads((out / "distill.json").read_text())
            say(f"dry run passed: {produced}; distill contexts {sorted(summary.get('perplexity', {}))}")
            print(json.dumps(reports, indent=2))
        return 0
    out = Path(os.environ.get("OUT") or ROOT / "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or "cuda"
    step = first if args.step == "first" else second
    part = DEST / ("part1" if args.step == "first" else "part2")
    started = time.time()
    report = step(out, DEST / "common", part, device, args.quick, False)
    report["wall_s"] = round(time.time() - started, 1)
    (out / f"{args.step}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
