"""Generate the Python code for `proto/v1/*.proto` into `proto/v1/` (or another directory).

The .proto sources live in `proto/v1/`, which installs as `meshd.proto.v1`; protoc runs on a
staged copy laid out as `meshd/proto/v1/` so the generated imports use the installed names.
Usage: python scripts/gen_proto.py [OUT_DIR]. The test suite regenerates into a temp dir and
fails if the committed files differ.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "proto" / "v1"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "meshd" / "proto" / "v1"
        stage.mkdir(parents=True)
        protos = sorted(SRC.glob("*.proto"))
        for p in protos:
            shutil.copy(p, stage / p.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        args = ["protoc", f"-I{tmp}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}"]
        args += [f"meshd/proto/v1/{p.name}" for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / "meshd" / "proto" / "v1").iterdir()):
            dest = out_dir / f.name
            shutil.copy(f, dest)
            written.append(dest)
        return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    for path in generate(out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
