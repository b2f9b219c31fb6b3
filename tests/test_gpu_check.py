"""pipelines/gpu_check.py's comparisons (parts a and b, with the all-masked batch through loss_sum) in their CPU
smoke form, so that the prepared GPU check keeps running against lacuna's attention and loss code; its trainer parts
take minutes (`make gpu-check GPU_CHECK_ARGS=--cpu-smoke`)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "gpu_check.py"


def test_gpu_check_comparisons_pass_on_their_cpu_stand_ins(tmp_path: Path) -> None:
    specification = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert specification is not None and specification.loader is not None
    gpu_check = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--cpu-smoke", "--parts", "ab", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0 and report["status"] == "pass", report["rows"]
    assert {row["part"] for row in report["rows"]} == {"a", "b"}
    assert report["parts"]["a"]["graph_breaks"]["count"] == 0  # torch_varlen_forward, traced on the meta device
    all_masked = [row for row in report["rows"] if row["check"].startswith("all-masked batch through loss_sum")]
    assert [row["status"] for row in all_masked] == ["pass"] and report["parts"]["b"]["all_masked"]["zero"]
