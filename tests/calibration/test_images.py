"""Image+text samples: the built-in image set, JSONL records, image folders, HF rows and opening images."""

import json

import pytest
from PIL import Image

from gemoe_cli.calibration.bad_samples import SampleError
from gemoe_cli.calibration.images import (
    BUILTIN_IMAGES,
    ImageSource,
    is_image_text_dataset,
    open_image,
    read_image_text_samples,
    samples_from_rows,
)
from gemoe_cli.errors import InvalidInputError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _photo(path, size=(40, 30), color=(200, 40, 40)):
    Image.new("RGB", size, color).save(path)
    return path


def test_builtin_set_opens_every_photo():
    samples = read_image_text_samples(BUILTIN_IMAGES)

    assert len(samples) == 28
    assert all(sample.has_answer for sample in samples)
    assert sum(len(sample.images) > 1 for sample in samples) == 3
    for sample in samples:
        for source in sample.images:
            image = open_image(source)
            assert image.mode == "RGB"
            assert min(image.size) >= 100, source.describe()


def test_builtin_set_is_image_text():
    assert is_image_text_dataset(BUILTIN_IMAGES)


def test_jsonl_paths_relative_to_file(tmp_path):
    _photo(tmp_path / "red.png")
    _photo(tmp_path / "blue.png", color=(0, 0, 255))
    dataset = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"image": "red.png", "text": "What colour is this?", "answer": "Red."},
            {"image": ["red.png", "blue.png"], "text": "Compare the colours."},
        ],
    )

    first, second = read_image_text_samples(str(dataset))

    assert first.images[0].path == tmp_path / "red.png"
    assert first.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}
    assert [item["type"] for item in second.messages[0]["content"]] == ["image", "image", "text"]
    assert not second.has_answer
    assert second.origin == f"{dataset} line 2"


def test_jsonl_messages_get_images_in_first_user_turn(tmp_path):
    dataset = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "image": "skimage:coffee",
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is this?"},
                    {"role": "assistant", "content": "Coffee."},
                ],
            }
        ],
    )

    (sample,) = read_image_text_samples(str(dataset))

    assert sample.messages[0] == {"role": "system", "content": "Answer briefly."}
    assert sample.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    assert sample.images[0].skimage_name == "coffee"


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"image": "a.png"}, r"line 2 has no 'text' string or 'messages' list"),
        ({"image": 7, "text": "x"}, r"line 2: 'image' must be a path"),
        ({"image": "skimage:unicorn", "text": "x"}, r"line 2: skimage:unicorn is not a scikit-image photograph"),
        (
            {"image": ["a.png", "b.png"], "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            r"line 2: the messages have 1 image items but the record lists 2 images",
        ),
        ({"image": "a.png", "text": "x", "answer": 3}, r"line 2: 'answer' must be a string"),
    ],
)
def test_jsonl_invalid_record_names_line(tmp_path, record, match):
    dataset = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "text": "fine"}, record])

    with pytest.raises(InvalidInputError, match=match):
        read_image_text_samples(str(dataset))


def test_jsonl_with_image_is_image_text(tmp_path):
    text_only = _write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [{"text": "plain"}, {"image": "a.png", "text": "x"}])

    assert not is_image_text_dataset(str(text_only))
    assert is_image_text_dataset(str(mixed))


def test_folder_uses_template_and_answer_files(tmp_path):
    _photo(tmp_path / "b.jpg")
    _photo(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("A red square.\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")

    first, second = read_image_text_samples(str(tmp_path), "What is in {name}?")

    assert first.messages[0]["content"][1]["text"] == "What is in a.png?"
    assert first.messages[1]["content"][0]["text"] == "A red square."
    assert not second.has_answer
    assert second.origin == str(tmp_path / "b.jpg")


def test_folder_without_images_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")

    with pytest.raises(InvalidInputError, match="has no images"):
        read_image_text_samples(str(tmp_path))


class _Rows(list):
    """The two parts of a `datasets.Dataset` that `samples_from_rows` uses: iteration and column names."""

    def __init__(self, rows):
        super().__init__(rows)
        self.column_names = list(rows[0])


def test_hub_rows_with_image_column():
    image = Image.new("RGB", (20, 20))
    rows = _Rows([{"image": image, "question": "What is it?", "answer": "Black."}, {"image": image, "text": "Hi"}])

    first, second = samples_from_rows(rows, "hf:demo")

    assert first.images[0].decoded is image
    assert first.has_answer
    assert second.origin == "hf:demo row 1"


def test_hub_rows_without_image_column():
    with pytest.raises(InvalidInputError, match="has no 'image' or 'images' column"):
        samples_from_rows(_Rows([{"text": "Hi"}]), "hf:demo")


def test_hub_dataset_with_image_feature(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from gemoe_cli.calibration import data

    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (16, 16), (9, 9, 9))], "text": ["Grey."]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: table)

    (sample,) = samples_from_rows(data.load_hub_dataset("hf:demo"), "hf:demo")

    assert open_image(sample.images[0]).size == (16, 16)


def test_open_missing_image(tmp_path):
    with pytest.raises(SampleError, match="not found") as caught:
        open_image(ImageSource(path=tmp_path / "gone.png"))
    assert caught.value.kind == "missing image"


def test_open_unsupported_format(tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"this is not an image")

    with pytest.raises(SampleError, match="not in a format Pillow can read") as caught:
        open_image(ImageSource(path=fake))
    assert caught.value.kind == "unsupported image format"


def test_open_truncated_image(tmp_path):
    whole = _photo(tmp_path / "whole.png", size=(64, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:60])

    with pytest.raises(SampleError) as caught:
        open_image(ImageSource(path=cut))
    assert caught.value.kind in ("unreadable image", "unsupported image format")


def test_open_converts_to_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 128).save(grey)

    assert open_image(ImageSource(path=grey)).mode == "RGB"
