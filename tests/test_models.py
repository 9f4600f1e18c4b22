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


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_models.build("mixtral").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    with pytest.raises(InvalidInputError) as raised:
        models.load_model(str(tmp_path))

    message = str(raised.value)
    assert message.startswith(f"cannot read the weights {weights}: ")
    assert message.endswith("the file is truncated or corrupt, so download or save the checkpoint again.")


@pytest.mark.parametrize("value", ["foo", "cuda:x", "disk"])
def test_unknown_device_map_rejected(value):
    with pytest.raises(InvalidInputError, match=rf"^--device-map {value} is unknown; use auto, balanced, "):
        models.check_device_map(value)


def test_tokenizer_files_detected(tmp_path):
    tiny_models.build("mixtral").save_pretrained(tmp_path)

    assert not models.has_tokenizer_files(str(tmp_path))
    with pytest.raises(InvalidInputError, match="has no usable tokenizer"):
        models.load_tokenizer(str(tmp_path))

    tiny_models.tiny_tokenizer().save_pretrained(tmp_path)
    assert models.has_tokenizer_files(str(tmp_path))
    assert models.has_tokenizer_files("org/hub-model")
