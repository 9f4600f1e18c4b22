"""`gemoe calibrate` on vision-language models: image+text data, per-modality thresholds, convert round trips
and bad input."""

import json
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig
from typer.testing import CliRunner

from gemoe_cli.api import apply_recipe
from gemoe_cli.cli.app import app
from gemoe_cli.convert import load_adaptive_model
from gemoe_cli.models import load_model
from gemoe_cli.recipe import load_recipe
from gemoe_cli.vlm import forward_module, load_processor
from tests import tiny_models, tiny_vlms

runner = CliRunner()
FAST = ["--num-samples", "5", "--heldout-fraction", "0.4", "--policy", "uniform", "--device", "cpu"]
TOLERANCE = 1e-5
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the photo?"}]}]

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        import gemoe_cli  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("gemoe_cli is importable; the remote-code test would prove nothing")
    directory, inputs_file, out_file = sys.argv[1:]
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**torch.load(inputs_file)).logits
    torch.save({"logits": logits, "modality_sparsity": model.gemoe_routing.modality_sparsity()}, out_file)
    """
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return tiny_vlms.save("qwen3_vl_moe", tiny_vlms.build("qwen3_vl_moe"), tmp_path_factory.mktemp("qwen3_vl_moe"))


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    return tiny_models.save_with_tokenizer(tiny_models.build("olmoe"), tmp_path_factory.mktemp("olmoe"))


def _image_inputs(model_type, photo="rocket"):
    processor = tiny_vlms.processor(model_type)
    text = processor.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[tiny_vlms.photo(photo)], return_tensors="pt"))


def _calibrate(model_dir, tmp_path, *args):
    recipe, report = tmp_path / "recipe.yaml", tmp_path / "report.json"
    result = runner.invoke(
        app,
        ["calibrate", model_dir, *FAST, "--target-sparsity", "0.3", "-o", str(recipe), "--report", str(report), *args],
    )
    return result, recipe, report


def _adaptive_logits(source, recipe, inputs):
    model = load_model(source)
    with torch.no_grad(), apply_recipe(model, recipe) as routing:
        logits = forward_module(model)(**inputs).logits
        return logits, routing.modality_sparsity()


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A virtual environment with torch and transformers visible but not gemoe_cli."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    site_packages = Path(torch.__file__).resolve().parents[1]
    purelib = next((root / "lib").glob("python*/site-packages"))
    (purelib / "shared_packages.pth").write_text(f"{site_packages}\n")
    return root / "bin" / "python"


def test_per_modality_round_trip_qwen3_vl_moe(qwen_dir, tmp_path, bare_python):
    result, recipe_file, report_file = _calibrate(qwen_dir, tmp_path, "--per-modality")

    assert result.exit_code == 0, result.output
    recipe = load_recipe(recipe_file)
    report = json.loads(report_file.read_text())
    assert recipe.per_modality
    assert recipe.calibration["data"]["dataset"] == "builtin-images"
    assert recipe.calibration["per_modality"] is True
    layer = report["layers"]["model.language_model.layers.0.mlp"]
    assert set(layer["modalities"]) == {"text", "image"}
    assert sum(layer["modalities"]["image"]["heldout_k_histogram"]) > 100
    assert 0.0 <= report["heldout"]["retention"]["exact_match"] <= 1.0
    assert set(report["heldout"]["modality_sparsity"]) == {"text", "image"}

    converted = tmp_path / "converted"
    converted_run = runner.invoke(app, ["convert", qwen_dir, "--recipe", str(recipe_file), "-o", str(converted)])
    assert converted_run.exit_code == 0, converted_run.output
    # Where the processor settings go depends on whether torchvision is installed, so load them back.
    processor = load_processor(str(converted), AutoConfig.from_pretrained(converted))
    assert processor.image_processor.to_dict() == tiny_vlms.processor("qwen3_vl_moe").image_processor.to_dict()
    assert processor.chat_template == tiny_vlms.processor("qwen3_vl_moe").chat_template

    inputs = _image_inputs("qwen3_vl_moe")
    expected, expected_sparsity = _adaptive_logits(qwen_dir, recipe, inputs)
    loaded = load_adaptive_model(converted)
    with torch.no_grad():
        logits = loaded(**inputs).logits
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert loaded.gemoe_routing.modality_sparsity() == pytest.approx(expected_sparsity)
    assert expected_sparsity["image"] > 0.0

    inputs_file, out_file, script = tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path / "load.py"
    torch.save(inputs, inputs_file)
    script.write_text(REMOTE_SCRIPT)
    completed = subprocess.run(
        [str(bare_python), str(script), str(converted), str(inputs_file), str(out_file)],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(out_file)
    assert (remote["logits"] - expected).abs().max().item() <= TOLERANCE
    assert remote["modality_sparsity"] == pytest.approx(expected_sparsity)


def _dataset_with_bad_samples(tmp_path):
    Image.new("RGB", (96, 96), (20, 160, 20)).save(tmp_path / "green.png")
    (tmp_path / "fake.jpg").write_bytes(b"\x00\x01 not a jpeg")
    records = [
        {"image": "skimage:coffee", "text": "What is on the table?", "answer": "A cup of coffee."},
        {"image": "green.png", "text": "What colour is this?", "answer": "Green."},
        {"image": "missing.png", "text": "What is this?", "answer": "Nothing."},
        {"image": "skimage:rocket", "text": "What stands on the pad?", "answer": "A rocket."},
        {"image": "fake.jpg", "text": "What is this?", "answer": "Nothing."},
        {"image": "skimage:chelsea", "text": "Which animal is this?", "answer": "A cat."},
        {"image": ["skimage:moon", "skimage:coins"], "text": "Compare them.", "answer": "Moon and coins."},
        {"image": "skimage:astronaut", "text": "Who is this?", "answer": "An astronaut."},
    ]
    path = tmp_path / "photos.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_round_trip_ernie_with_skipped_samples(tmp_path):
    model_dir = tiny_vlms.save("ernie4_5_vl_moe", tiny_vlms.build("ernie4_5_vl_moe"), tmp_path / "ernie")
    dataset = _dataset_with_bad_samples(tmp_path)

    result, recipe_file, report_file = _calibrate(
        model_dir, tmp_path, "--dataset", str(dataset), "--skip-bad-samples", "--max-images", "1", "--num-samples", "8"
    )

    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["data"]["bad_samples"]["by_kind"] == {
        "missing image": 1,
        "too many images": 1,
        "unsupported image format": 1,
    }
    assert "skipped 3 bad samples" in result.stderr
    recipe = load_recipe(recipe_file)
    assert recipe.calibration["data"]["skipped_samples"] == 3
    vision = report["layers"]["model.language_model.layers.0.mlp.vision_moe"]
    assert set(vision["modalities"]) == {"image"}

    converted = tmp_path / "converted"
    assert runner.invoke(app, ["convert", model_dir, "--recipe", str(recipe_file), "-o", str(converted)]).exit_code == 0
    inputs = _image_inputs("ernie4_5_vl_moe")
    expected, _ = _adaptive_logits(model_dir, recipe, inputs)
    with torch.no_grad():
        logits = load_adaptive_model(converted)(**inputs).logits
    assert (logits - expected).abs().max().item() <= TOLERANCE


def test_bad_sample_stops_before_loading(qwen_dir, tmp_path):
    dataset = _dataset_with_bad_samples(tmp_path)

    # With all eight samples asked for, the two bad ones are always reached.
    result, recipe_file, report_file = _calibrate(qwen_dir, tmp_path, "--dataset", str(dataset), "--num-samples", "8")

    assert result.exit_code == 2
    assert "photos.jsonl line " in result.stderr
    assert "--skip-bad-samples" in result.stderr
    assert not recipe_file.exists()
    assert not report_file.exists()


def test_image_folder_with_prompt_template(qwen_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (60, 80), (30, 30, 200)).save(folder / "blue.jpg")
    (folder / "red.txt").write_text("A red rectangle.", encoding="utf-8")

    result, recipe_file, _ = _calibrate(
        qwen_dir, tmp_path, "--dataset", str(folder), "--prompt-template", "Describe {name}."
    )

    assert result.exit_code == 0, result.output
    data = yaml.safe_load(recipe_file.read_text())["calibration"]["data"]
    assert data["prompt_template"] == "Describe {name}."
    assert data["fit_samples"] + data["heldout_samples"] == 2


def test_image_data_for_text_model(text_model_dir, tmp_path):
    dataset = tmp_path / "photos.jsonl"
    dataset.write_text(json.dumps({"image": "skimage:coffee", "text": "What is this?"}) + "\n", encoding="utf-8")

    result, recipe_file, _ = _calibrate(text_model_dir, tmp_path, "--dataset", str(dataset), "--seq-len", "32")

    assert result.exit_code == 2
    assert "photos.jsonl line 1: the sample has an image, but the model is text-only" in result.stderr
    assert not recipe_file.exists()


def test_per_modality_on_text_model(text_model_dir, tmp_path):
    result, recipe_file, _ = _calibrate(text_model_dir, tmp_path, "--per-modality")

    assert result.exit_code == 2
    assert "--per-modality needs a vision-language model" in result.stderr
    assert not recipe_file.exists()


def test_exact_match_metric_needs_images(text_model_dir, tmp_path):
    result, _, _ = _calibrate(text_model_dir, tmp_path, "--metric", "exact_match")

    assert result.exit_code == 2
    assert "exact_match needs image+text data" in result.stderr


def test_invalid_max_images(qwen_dir, tmp_path):
    result, _, _ = _calibrate(qwen_dir, tmp_path, "--max-images", "0")

    assert result.exit_code == 2
    assert "--max-images 0 is invalid" in result.stderr


# --- one bad sample of each kind: stop with its line number, or skip and count it ------------------------


def _write_bad_sample_files(folder):
    import numpy as np

    Image.new("RGB", (96, 96), (20, 160, 20)).save(folder / "green.png")
    (folder / "fake.jpg").write_bytes(b"\x00\x01 not a jpeg")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    whole = (folder / "noise.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])


BAD_SAMPLES = {
    "missing image": (
        {"image": "missing.png", "text": "What is this?", "answer": "Nothing."},
        "image {folder}/missing.png not found",
    ),
    "unreadable image": (
        {"image": "truncated.png", "text": "What is this?", "answer": "Noise."},
        "cannot read image {folder}/truncated.png: image file is truncated",
    ),
    "unsupported image format": (
        {"image": "fake.jpg", "text": "What is this?", "answer": "Nothing."},
        "image {folder}/fake.jpg is not in a format Pillow can read (suffix '.jpg')",
    ),
    "too many images": (
        {"image": ["green.png", "skimage:coins"], "text": "Compare them.", "answer": "Green and coins."},
        "the sample has 2 images, more than the limit of 1",
    ),
}  # fmt: skip
GOOD_SAMPLES = [
    {"image": "skimage:coffee", "text": "What is on the table?", "answer": "A cup of coffee."},
    {"image": "green.png", "text": "What colour is this?", "answer": "Green."},
    {"image": "skimage:rocket", "text": "What stands on the pad?", "answer": "A rocket."},
    {"image": "skimage:chelsea", "text": "Which animal is this?", "answer": "A cat."},
]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", sorted(BAD_SAMPLES))
def test_bad_sample_stops_with_line_number(qwen_dir, tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    _write_bad_sample_files(data)
    record, message = BAD_SAMPLES[kind]
    dataset = _jsonl(data / "photos.jsonl", [*GOOD_SAMPLES[:2], record])

    result, recipe_file, report_file = _calibrate(
        qwen_dir, tmp_path, "--dataset", str(dataset), "--num-samples", "3", "--max-images", "1"
    )

    assert result.exit_code == 2, result.output
    expected = message.format(folder=data)
    assert (
        f"error: {dataset} line 3: {expected}; fix the sample, or pass --skip-bad-samples to leave it out."
        in result.stderr
    )
    assert not recipe_file.exists()
    assert not report_file.exists()


def test_bad_samples_skipped_and_counted(qwen_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_bad_sample_files(data)
    bad = [BAD_SAMPLES[kind][0] for kind in sorted(BAD_SAMPLES)]
    dataset = _jsonl(data / "photos.jsonl", [*GOOD_SAMPLES, *bad])

    result, recipe_file, report_file = _calibrate(
        qwen_dir, tmp_path, "--dataset", str(dataset), "--num-samples", "8", "--max-images", "1",
        "--skip-bad-samples",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "skipped 4 bad samples" in result.stderr
    bad_samples = json.loads(report_file.read_text())["data"]["bad_samples"]
    assert bad_samples["by_kind"] == {kind: 1 for kind in BAD_SAMPLES}
    assert bad_samples["skipped"] == 4
    assert sorted(message.split(": ", 1)[0] for message in bad_samples["first"]) == [
        f"{dataset} line {number}" for number in range(5, 9)
    ]
    assert load_recipe(recipe_file).calibration["data"]["skipped_samples"] == 4


def test_too_few_good_samples_after_skipping(qwen_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_bad_sample_files(data)
    records = [GOOD_SAMPLES[0], *(BAD_SAMPLES[kind][0] for kind in sorted(BAD_SAMPLES))]
    dataset = _jsonl(data / "photos.jsonl", records)

    result, recipe_file, _ = _calibrate(
        qwen_dir, tmp_path, "--dataset", str(dataset), "--max-images", "1", "--skip-bad-samples"
    )

    assert result.exit_code == 2, result.output
    assert (
        f"error: dataset {dataset} has 1 usable image+text samples (4 skipped); calibration needs at least 2, "
        "one to fit and one held out." in result.stderr
    )
    assert not recipe_file.exists()


def test_image_samples_skipped_for_text_model(text_model_dir, tmp_path):
    records = [{"text": f"Routers send token {number} to a few experts." * 20} for number in range(6)]
    records.insert(2, {"image": "skimage:coffee", "text": "What is this?"})
    dataset = _jsonl(tmp_path / "mixed.jsonl", records)

    result, recipe_file, report_file = _calibrate(
        text_model_dir, tmp_path, "--dataset", str(dataset), "--seq-len", "16", "--num-samples", "8",
        "--skip-bad-samples",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    bad_samples = json.loads(report_file.read_text())["data"]["bad_samples"]
    assert bad_samples["by_kind"] == {"image for a text-only model": 1}
    assert bad_samples["first"] == [
        f"{dataset} line 3: the sample has an image, but the model is text-only (no vision tower)"
    ]
    assert recipe_file.exists()


def test_only_image_samples_for_text_model(text_model_dir, tmp_path):
    dataset = _jsonl(tmp_path / "photos.jsonl", [{"image": "skimage:coffee", "text": "What is this?"}])

    result, recipe_file, _ = _calibrate(
        text_model_dir, tmp_path, "--dataset", str(dataset), "--seq-len", "32", "--skip-bad-samples"
    )

    assert result.exit_code == 2, result.output
    assert f"error: dataset {dataset} has no text-only samples for this text-only model (1 samples " in result.stderr
    assert not recipe_file.exists()
