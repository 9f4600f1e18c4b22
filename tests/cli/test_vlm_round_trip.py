"""Round trips of tiny vision-language models through the command line: calibrate -> convert -> load, with
gemoe and with transformers alone -> bench, each checked against the adaptive model in memory."""

import json
import subprocess
import textwrap
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gemoe_cli.api import apply_recipe
from gemoe_cli.cli.app import app
from gemoe_cli.convert import load_adaptive_model
from gemoe_cli.models import load_config, load_model
from gemoe_cli.recipe import load_recipe, save_recipe
from gemoe_cli.vlm import forward_module, load_processor
from tests import tiny_vlms
from tests.bench.conftest import fitted_recipe
from tests.bench.test_cli import documented_fields, resolve

runner = CliRunner()
CALIBRATE = ["--num-samples", "5", "--heldout-fraction", "0.4", "--policy", "uniform", "--device", "cpu"]
# The same --num-samples, --heldout-fraction and --seed as CALIBRATE, so the bench evaluates calibrate's held-out part.
BENCH = [
    "--num-samples", "5", "--heldout-fraction", "0.4", "--device", "cpu", "--threads", "1",
    "--prefill-batch-size", "2", "--gen-len", "3", "--warmup", "0",
]  # fmt: skip
TOLERANCE = 1e-5
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the photo?"}]}]

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import transformers

    try:
        import gemoe_cli  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("gemoe_cli is importable; the remote-code test would prove nothing")
    directory, inputs_file, out_file = sys.argv[1:]
    with open(f"{directory}/config.json", encoding="utf-8") as handle:
        auto_class = getattr(transformers, next(iter(json.load(handle)["auto_map"])))
    model = auto_class.from_pretrained(directory, trust_remote_code=True)
    module = getattr(model, "thinker", model)
    with torch.no_grad():
        logits = module(**torch.load(inputs_file)).logits
    torch.save({"logits": logits, "modality_sparsity": model.gemoe_routing.modality_sparsity()}, out_file)
    """
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one CPU thread: the tiny models gain nothing from more, and waits for busy cores with them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return tiny_vlms.write_photo_dataset(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A virtual environment with torch and transformers visible but not gemoe_cli."""
    root = tmp_path_factory.mktemp("bare-venv")
    venv.EnvBuilder(with_pip=False).create(root)
    site_packages = Path(torch.__file__).resolve().parents[1]
    purelib = next((root / "lib").glob("python*/site-packages"))
    (purelib / "shared_packages.pth").write_text(f"{site_packages}\n")
    return root / "bin" / "python"


@dataclass(frozen=True)
class RoundTrip:
    model_type: str
    model_dir: str
    recipe_file: Path
    report: dict
    converted: Path


def calibrate_and_convert(model_type: str, directory: Path, *calibrate_args: str) -> RoundTrip:
    """Save the tiny model, then run `gemoe calibrate` and `gemoe convert` on it; both must succeed."""
    model_dir = tiny_vlms.save(model_type, tiny_vlms.build(model_type), directory / model_type)
    recipe_file, report_file, converted = directory / "recipe.yaml", directory / "report.json", directory / "converted"
    calibrated = runner.invoke(
        app,
        ["calibrate", model_dir, *CALIBRATE, "--target-sparsity", "0.3", "-o", str(recipe_file),
         "--report", str(report_file), *calibrate_args],
    )  # fmt: skip
    assert calibrated.exit_code == 0, calibrated.output
    converted_run = runner.invoke(app, ["convert", model_dir, "--recipe", str(recipe_file), "-o", str(converted)])
    assert converted_run.exit_code == 0, converted_run.output
    return RoundTrip(model_type, model_dir, recipe_file, json.loads(report_file.read_text()), converted)


def image_inputs(model_type: str, photo: str = "rocket") -> dict[str, torch.Tensor]:
    """Return the processor's inputs for one question about one built-in photograph."""
    processor = tiny_vlms.processor(model_type)
    text = processor.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[tiny_vlms.photo(photo)], return_tensors="pt")
    # Llama 4's image processor returns bfloat16 pixel values; the tiny models are float32, as gemoe casts them.
    return {name: value.float() if value.is_floating_point() else value for name, value in inputs.items()}


def in_memory_logits(trip: RoundTrip, inputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the logits and modality sparsity of the original model with the recipe applied in memory."""
    model = load_model(trip.model_dir)
    with torch.no_grad(), apply_recipe(model, load_recipe(trip.recipe_file)) as routing:
        logits = forward_module(model)(**inputs).logits
        return logits, routing.modality_sparsity()


def check_loaders(trip: RoundTrip, bare_python: Path, tmp_path: Path) -> None:
    """Check that both loaders of the converted checkpoint match the in-memory adaptive model."""
    inputs = image_inputs(trip.model_type)
    expected, expected_sparsity = in_memory_logits(trip, inputs)
    assert expected_sparsity["image"] > 0.0

    loaded = load_adaptive_model(trip.converted)
    with torch.no_grad():
        logits = forward_module(loaded)(**inputs).logits
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert loaded.gemoe_routing.modality_sparsity() == pytest.approx(expected_sparsity)

    inputs_file, out_file, script = tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path / "load.py"
    torch.save(inputs, inputs_file)
    script.write_text(REMOTE_SCRIPT)
    completed = subprocess.run(
        [str(bare_python), str(script), str(trip.converted), str(inputs_file), str(out_file)],
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(out_file)
    assert (remote["logits"] - expected).abs().max().item() <= TOLERANCE
    assert remote["modality_sparsity"] == pytest.approx(expected_sparsity)


def bench(source: Path, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run `gemoe bench` on a converted checkpoint; return the JSON record and the printed tables."""
    output = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(source), "--json", str(output), *BENCH, *args])
    assert result.exit_code == 0, result.output
    return json.loads(output.read_text()), result.stdout


def check_bench_matches_calibration(record: dict, trip: RoundTrip) -> None:
    """The bench's gemoe evaluation is calibrate's held-out measurement, so every figure must agree."""
    heldout = trip.report["heldout"]
    gemoe = record["policies"]["gemoe"]["evaluation"]
    assert record["data"]["kind"] == "image+text"
    assert record["data"]["heldout_blocks"] == 2
    assert record["routing"]["source"] == f"{trip.converted}/config.json (gemoe section)"
    assert gemoe["sparsity"]["overall"] == pytest.approx(heldout["sparsity"], abs=1e-12)
    assert gemoe["modality_sparsity"] == pytest.approx(heldout["modality_sparsity"], abs=1e-12)
    for modality, value in heldout["modality_sparsity"].items():
        assert gemoe["sparsity"]["modalities"][modality]["sparsity"] == pytest.approx(value, abs=1e-12)
    assert gemoe["retention"]["nll"] == pytest.approx(heldout["retention"]["nll"], abs=1e-9)
    assert gemoe["exact_match"] == heldout["retention"]["exact_match"]


def check_prefill_figures(record: dict) -> None:
    inputs = record["inputs"]
    assert inputs["kind"] == "image+text"
    assert inputs["prefill_passes"] == 2
    assert inputs["prefill_images"] >= 2
    for name, policy in record["policies"].items():
        prefill = policy["prefill"]
        assert prefill["tokens"] == sum(inputs["prefill_prompt_tokens"]), name
        assert prefill["images"] == inputs["prefill_images"], name
        assert prefill["images_per_second"]["median"] > 0, name
        assert prefill["samples_per_second"]["median"] > 0, name
        if name == "static_native":
            continue
        # Every prompt token, image placeholders included, is routed once per MoE layer and timed run.
        modalities = prefill["sparsity"]["modalities"]
        routed = record["settings"]["repeats"] * len(prefill["sparsity"]["layers"]) * prefill["tokens"]
        assert modalities["image"]["tokens"] > 0, name
        assert modalities["image"]["tokens"] + modalities["text"]["tokens"] == routed, name


def check_documented_fields(record: dict) -> None:
    """Every documented field is present in an image+text record (many are null here, so nothing more)."""
    tables = documented_fields()
    for path, kind in tables["record"]:
        for value in resolve(record, path):
            if value is not None and kind in ("Stats", "Sparsity"):
                for field, _ in tables[kind]:
                    resolve(value, field)


# --- calibrate -> convert -> load ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["glm4v_moe", "aria", "qwen3_omni_moe", "ernie4_5_vl_moe"])
def test_converted_vlm_loads_both_ways(model_type, photos, bare_python, tmp_path):
    trip = calibrate_and_convert(model_type, tmp_path, "--dataset", photos)

    # transformers 5.23 keeps some image processors' settings inside processor_config.json (aria's).
    assert (trip.converted / "processor_config.json").is_file()
    assert (trip.converted / "chat_template.jinja").is_file()
    processor = load_processor(str(trip.converted), load_config(str(trip.converted)))
    assert type(processor).__name__ == tiny_vlms.VLMS[model_type].processor_class
    assert trip.report["heldout"]["modality_sparsity"]["image"] > 0.0
    check_loaders(trip, bare_python, tmp_path)


@pytest.mark.skipif(tiny_vlms.has_processor("llama4"), reason="torchvision is installed here")
def test_llama4_processor_without_torchvision_exits_2(tmp_path):
    model_dir = tiny_vlms.save("llama4", tiny_vlms.build("llama4"), tmp_path / "llama4")
    # The processor files a released llama4 checkpoint ships, written by hand: building them needs torchvision.
    (tmp_path / "llama4" / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor"})
    )
    (tmp_path / "llama4" / "processor_config.json").write_text(json.dumps({"processor_class": "Llama4Processor"}))

    result = runner.invoke(app, ["calibrate", model_dir, *CALIBRATE, "--target-sparsity", "0.3",
                                 "-o", str(tmp_path / "recipe.yaml")])  # fmt: skip

    assert result.exit_code == 2, result.output
    assert "requires torchvision, which is not installed; pip install torchvision." in result.stderr
    assert not (tmp_path / "recipe.yaml").exists()


# NOTE: this test skips without torchvision and has not run yet: the suite ran beside a CPU build of torch
# with no torchvision.
@pytest.mark.skipif(
    not tiny_vlms.has_processor("llama4"), reason="llama4's image processor requires torchvision, not installed"
)
def test_llama4_round_trip_with_processor(photos, bare_python, tmp_path):
    trip = calibrate_and_convert("llama4", tmp_path, "--dataset", photos)

    check_loaders(trip, bare_python, tmp_path)


# --- calibrate -> convert -> load -> bench -------------------------------------------------------------------


def test_bench_qwen3_vl_moe_round_trip(tmp_path):
    # Per-modality thresholds on the built-in image set, which bench then picks by default.
    trip = calibrate_and_convert("qwen3_vl_moe", tmp_path, "--per-modality")

    record, tables = bench(trip.converted, tmp_path)

    assert record["data"]["dataset"] == "builtin-images"
    assert record["routing"]["per_modality"] is True
    check_bench_matches_calibration(record, trip)
    check_prefill_figures(record)
    check_documented_fields(record)
    assert record["summary"]["gemoe_modality_sparsity"] == pytest.approx(trip.report["heldout"]["modality_sparsity"])
    # The default terminal width of CliRunner wraps column headers, so only the titles are checked.
    for fragment in ("2 image+text evaluation samples", "image+text prompts (", " images) one at a time"):
        assert fragment in " ".join(tables.split()), fragment


def test_bench_glm4v_moe_round_trip(photos, tmp_path):
    trip = calibrate_and_convert("glm4v_moe", tmp_path, "--dataset", photos)

    record, _ = bench(trip.converted, tmp_path, "--dataset", photos, "--metric", "exact_match",
                      "--decode-batch-size", "2")  # fmt: skip

    check_bench_matches_calibration(record, trip)
    check_prefill_figures(record)
    gemoe = record["policies"]["gemoe"]
    assert gemoe["retention"] == gemoe["evaluation"]["exact_match"]
    assert record["routing"]["per_modality"] is False
    decode = gemoe["decode"]
    settings = record["settings"]
    assert decode["passes"] == 2
    # Two prompts, each generating gen_len - 1 timed tokens, routed once per MoE layer and timed run.
    expected_tokens = settings["repeats"] * 2 * (settings["gen_len"] - 1) * len(decode["sparsity"]["layers"])
    assert decode["sparsity"]["modalities"] == {
        "text": {**decode["sparsity"]["modalities"]["text"], "tokens": expected_tokens}
    }


def test_bench_prompt_beyond_position_limit_exits_2(tmp_path):
    model = tiny_vlms.build("qwen3_vl_moe")
    model_dir = tiny_vlms.save("qwen3_vl_moe", model, tmp_path / "qwen3_vl_moe")
    recipe = tmp_path / "recipe.yaml"
    save_recipe(fitted_recipe(model, model_dir), recipe)

    result = runner.invoke(app, ["bench", model_dir, "--recipe", str(recipe), *BENCH, "--gen-len", "8000"])

    assert result.exit_code == 2, result.output
    assert "the built-in image set line " in result.stderr
    assert "--gen-len 8000 makes " in result.stderr
    assert "above the model's limit of 8192; lower --gen-len." in result.stderr
