"""The JSON file of `python -m gemoe_cli.export.benchmark`: written atomically, a full disk exits with code 3."""

import json

from gemoe_cli.export import benchmark
from tests.write_faults import FaultyDisk, leftovers


def _timed(directory, **settings):
    # Stands in for onnxruntime timing, which these tests do not measure: only the JSON writer is under test.
    summary = {"min": 0.001, "median": 0.002, "max": 0.003}
    return {
        "directory": str(directory),
        "body": "portable",
        "prefill_seconds_per_token": summary,
        "decode_seconds_per_token": summary,
        "active_pairs": 10,
        "tokens": 20,
    }


def test_json_written(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "time_export", _timed)
    output = tmp_path / "timings.json"

    code = benchmark.main([str(tmp_path / "onnx"), "--json", str(output)])

    assert code == 0
    assert json.loads(output.read_text())[0]["directory"] == str(tmp_path / "onnx")
    assert leftovers(tmp_path, {"timings.json"}) == []


def test_full_disk_keeps_previous_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "time_export", _timed)
    output = tmp_path / "timings.json"
    output.write_text("[]\n")
    FaultyDisk(tmp_path, 40).install(monkeypatch)

    code = benchmark.main([str(tmp_path / "onnx"), "--json", str(output)])

    assert code == 3
    assert (
        f"error: cannot write benchmark JSON {output}: no space left on device (the disk or the quota is full); "
        "free space on that file system or choose another output path." in capsys.readouterr().err
    )
    assert output.read_text() == "[]\n"
    assert leftovers(tmp_path, {"timings.json"}) == []
