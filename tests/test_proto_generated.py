"""The committed generated code must be exactly what `scripts/gen_proto.py` produces."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert {p.name for p in written} == {"control_pb2.py", "control_pb2.pyi",
                                          "control_pb2_grpc.py"}
    for p in written:
        committed = ROOT / "proto" / "v1" / p.name
        assert committed.read_text() == p.read_text(), (
            f"{committed} is stale: run `python scripts/gen_proto.py`")
