import pytest
import torch

from gemoe_cli import models
from gemoe_cli.errors import InvalidInputError
from tests import tiny_models


def test_weight_estimate_matches_parameter_count():
    model = tiny_models.build("mixtral")
    count = sum(parameter.numel() for parameter in model.parameters())

    assert models.estimate_weight_bytes(model.config, "float32") == 4 * count
    assert models.estimate_weight_bytes(model.config, "bfloat16") == 2 * count


def test_memory_check_rejects_oversized_model(monkeypatch, tmp_path):
    model = tiny_models.build("mixtral")
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(models, "available_memory_bytes", lambda: 1024)

    with pytest.raises(InvalidInputError, match=r"needs about .* GiB .*--device-map auto"):
        models.load_model(str(tmp_path))


def test_pickle_weights_rejected_without_flag(tmp_path):
    model = tiny_models.build("mixtral")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    with pytest.raises(InvalidInputError, match="only pickle"):
        models.load_model(str(tmp_path))


def test_unknown_device_rejected():
    with pytest.raises(InvalidInputError, match="--device tpu9 is unknown"):
        models.resolve_device("tpu9")
