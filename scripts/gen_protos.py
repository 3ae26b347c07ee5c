"""Regenerate gateway/api/v1 from proto/ (the committed generated code).

Run: python scripts/gen_protos.py [--check]

--check regenerates into a temporary directory and fails when the committed
code differs, so CI catches a proto change without regenerated code.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("gateway/api/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    )
    well_known = str(resources.files("grpc_tools") / "_proto")
    bindir = str(Path(sys.executable).parent)
    plugin = shutil.which("protoc-gen-mypy", path=bindir)
    grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=bindir)
    if plugin is None or grpc_plugin is None:
        raise SystemExit("protoc-gen-mypy not found next to this Python: pip install mypy-protobuf")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={plugin}",
        # Typed stubs of the service classes, so mypy --strict checks the server.
        f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    # grpc_tools writes a _pb2_grpc.py for every file; keep only those that
    # define services so the package holds no empty modules.
    for grpc_file in (out / PACKAGE_DIR).glob("*_pb2_grpc.py"):
        if "Servicer" not in grpc_file.read_text():
            grpc_file.unlink()
            grpc_file.with_suffix(".pyi").unlink(missing_ok=True)


def generated_files(base: Path) -> set[str]:
    return {p.name for p in (base / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / PACKAGE_DIR).mkdir(parents=True)
        generate(out)
        fresh, committed = generated_files(out), generated_files(ROOT)
        if args.check:
            stale = sorted(fresh ^ committed)
            stale += sorted(
                n
                for n in fresh & committed
                if not filecmp.cmp(out / PACKAGE_DIR / n, ROOT / PACKAGE_DIR / n, shallow=False)
            )
            if stale:
                print("generated code is stale; run python scripts/gen_protos.py:", *stale)
                return 1
            print(f"generated code up to date ({len(fresh)} files)")
            return 0
        for name in committed - fresh:
            (ROOT / PACKAGE_DIR / name).unlink()
        for name in fresh:
            shutil.copyfile(out / PACKAGE_DIR / name, ROOT / PACKAGE_DIR / name)
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
