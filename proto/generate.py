"""Generate the Python code of the project's own protos (the admin API) with grpcio-tools.

    .venv/bin/python proto/generate.py            # what `make proto` runs: writes meshkeeper/admin/v1/
    .venv/bin/python proto/generate.py --check    # exit 1 if the committed code is stale

The output is committed; tests/unit/test_proto_generated.py fails when it differs from what the
pinned grpcio-tools (pyproject.toml) generates, so a .proto edit cannot land without its code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCES = ("meshkeeper/admin/v1/admin.proto",)
OUTPUTS = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")
PACKAGE_DIR = "meshkeeper/admin/v1"


def generate(out_dir: Path) -> None:
    """Run protoc (grpc_tools) on SOURCES, writing the package tree under ``out_dir``."""
    from importlib.resources import files

    from grpc_tools import protoc

    include = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *(str(PROTO_DIR / s) for s in SOURCES)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def stale() -> list[str]:
    """The generated files whose committed copy differs from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [name for name in OUTPUTS
                if (Path(tmp) / PACKAGE_DIR / name).read_bytes() != _read(ROOT / PACKAGE_DIR / name)]


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = p.parse_args(argv)
    if args.check:
        found = stale()
        for name in found:
            print(f"stale: {PACKAGE_DIR}/{name} (run `make proto`)", file=sys.stderr)
        return 1 if found else 0
    generate(ROOT)
    print(f"generated {', '.join(f'{PACKAGE_DIR}/{n}' for n in OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
