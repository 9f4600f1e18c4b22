"""Image+text calibration samples: read them from a dataset and open their images.

Sources, chosen with `--dataset`:

- ``builtin-images``: photographs shipped with scikit-image (``skimage.data``) with questions and answers
  written for gemoe (`data/builtin_images.jsonl`); works offline.
- a ``.jsonl`` file where each line has ``image`` (a path or a list of paths, relative to the file's folder,
  or ``skimage:NAME`` for a scikit-image sample photograph) and either ``text`` (with an optional
  ``answer``) or chat ``messages``;
- a folder of images (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``),
  each asked `--prompt-template` (``{name}`` is replaced by the file name); a ``.txt`` file with the same
  stem, if present, is the answer;
- ``hf:NAME[:CONFIG][:SPLIT]`` with an ``image`` or ``images`` column and ``text`` (optional ``answer``),
  ``question`` + ``answer``, or ``messages``.

Each sample becomes a chat: a user turn with its images and text, and an assistant turn with the answer
when there is one. Images are opened only when a sample is encoded, so a missing or unreadable image is an
error of that sample (`SampleError`), reported with where the sample came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from gemoe_cli.calibration.bad_samples import SampleError
from gemoe_cli.errors import InvalidInputError

BUILTIN_IMAGES = "builtin-images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT_TEMPLATE = "Describe this image in one sentence."
SKIMAGE_PREFIX = "skimage:"

# scikit-image sample photographs by name; each value is the `skimage.data` function and an index into its
# result for the functions that return several images.
_SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut", None),
    "brick": ("brick", None),
    "camera": ("camera", None),
    "cell": ("cell", None),
    "chelsea": ("chelsea", None),
    "clock": ("clock", None),
    "coffee": ("coffee", None),
    "coins": ("coins", None),
    "grass": ("grass", None),
    "gravel": ("gravel", None),
    "hubble_deep_field": ("hubble_deep_field", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "moon": ("moon", None),
    "motorcycle": ("stereo_motorcycle", 0),
    "page": ("page", None),
    "retina": ("retina", None),
    "rocket": ("rocket", None),
    "text": ("text", None),
}


@dataclass(frozen=True)
class ImageSource:
    """Where one image comes from: a file path, a scikit-image photograph, or an already decoded image."""

    path: Path | None = None
    skimage_name: str | None = None
    decoded: Any = None
    """A PIL image or array from an HF dataset row."""

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.skimage_name is not None:
            return f"{SKIMAGE_PREFIX}{self.skimage_name}"
        return "an embedded image"


@dataclass(frozen=True)
class ImageTextSample:
    """One chat with images, before the processor sees it.

    `messages` follow the transformers chat format. Images are ``{"type": "image"}`` items of user turns, in
    the order of `images`. `origin` says where the sample came from (``file line N``), for error messages.
    """

    messages: list[dict]
    images: list[ImageSource] = field(default_factory=list)
    origin: str = ""

    @property
    def has_answer(self) -> bool:
        return any(message.get("role") == "assistant" for message in self.messages)


def is_image_text_dataset(dataset: str) -> bool:
    """Return whether `dataset` holds image+text samples (checked without opening any image)."""
    if dataset == BUILTIN_IMAGES:
        return True
    if dataset.startswith("hf:"):
        return False  # decided after loading, from the columns
    path = Path(dataset).expanduser()
    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
    if path.suffix == ".jsonl" and path.is_file():
        return any(record_has_image(record) for record in _json_records(path))
    return False


def record_has_image(record: Any) -> bool:
    return isinstance(record, dict) and record.get("image") not in (None, [], "")


def _json_records(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read dataset {path}: {error}; check that it is UTF-8 text.") from error
    for line in lines:
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # reported with its line number when the samples are read


def read_image_text_samples(dataset: str, prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[ImageTextSample]:
    """Read every sample of an image+text dataset; images are not opened yet.

    Raises:
        InvalidInputError: the dataset is missing, empty, or a line is not a valid record (with its number).
    """
    if dataset == BUILTIN_IMAGES:
        text = resources.files("gemoe_cli.calibration").joinpath("data/builtin_images.jsonl").read_text("utf-8")
        return parse_jsonl(text.splitlines(), "the built-in image set", base=None)
    if dataset.startswith("hf:"):
        from gemoe_cli.calibration.data import load_hub_dataset

        return samples_from_rows(load_hub_dataset(dataset), dataset)

    path = Path(dataset).expanduser()
    if not path.exists():
        raise InvalidInputError(f"dataset {dataset} not found; pass a .jsonl file, an image folder or builtin-images.")
    if path.is_dir():
        samples = _folder_samples(path, prompt_template)
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"cannot read dataset {path}: {error}; check that it is UTF-8 text.") from error
        samples = parse_jsonl(lines, str(path), base=path.parent)
    if not samples:
        raise InvalidInputError(f"dataset {dataset} is empty; give it at least one sample.")
    return samples


def parse_jsonl(lines: list[str], name: str, base: Path | None) -> list[ImageTextSample]:
    """Parse JSONL image+text records; image paths are relative to `base`."""
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        origin = f"{name} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{origin} is not valid JSON: {error.msg}.") from error
        if not isinstance(record, dict):
            raise InvalidInputError(f"{origin} is not a JSON object; write one object per line.")
        images = [_image_source(value, base, origin) for value in _image_values(record.get("image"), origin)]
        samples.append(ImageTextSample(_record_messages(record, len(images), origin), images, origin))
    return samples


def _image_values(value: Any, origin: str) -> list:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for item in values:
        if not isinstance(item, str) or not item:
            raise InvalidInputError(f"{origin}: 'image' must be a path or a list of paths; got {item!r}.")
    return values


def _image_source(value: str, base: Path | None, origin: str) -> ImageSource:
    if value.startswith(SKIMAGE_PREFIX):
        name = value[len(SKIMAGE_PREFIX) :]
        if name not in _SKIMAGE_PHOTOS:
            known = ", ".join(sorted(_SKIMAGE_PHOTOS))
            raise InvalidInputError(f"{origin}: {value} is not a scikit-image photograph; use one of {known}.")
        return ImageSource(skimage_name=name)
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return ImageSource(path=path)


def _record_messages(record: dict, image_count: int, origin: str) -> list[dict]:
    if isinstance(record.get("messages"), list):
        return _attach_images(_checked_messages(record["messages"], origin), image_count, origin)
    text = record.get("text", record.get("question"))
    if not isinstance(text, str):
        raise InvalidInputError(f"{origin} has no 'text' string or 'messages' list; add one.")
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise InvalidInputError(f"{origin}: 'answer' must be a string; got {type(answer).__name__}.")
    return chat_messages(text, image_count, answer)


def chat_messages(text: str, image_count: int, answer: str | None) -> list[dict]:
    """Return a user turn with `image_count` images before `text`, and an assistant turn for `answer`."""
    content = [{"type": "image"} for _ in range(image_count)] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _checked_messages(messages: list, origin: str) -> list[dict]:
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            raise InvalidInputError(f"{origin}: each message needs 'role' and 'content'.")
    return messages


def _attach_images(messages: list[dict], image_count: int, origin: str) -> list[dict]:
    """Check that image items match the images, or put the images at the start of the first user turn."""
    items = sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    )
    if items == image_count:
        return messages
    if items:
        raise InvalidInputError(
            f"{origin}: the messages have {items} image items but the record lists {image_count} images; "
            "make them match."
        )
    attached = []
    placed = False
    for message in messages:
        if not placed and message["role"] == "user":
            content = message["content"]
            text_items = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message = {**message, "content": [{"type": "image"} for _ in range(image_count)] + text_items}
            placed = True
        attached.append(message)
    if not placed and image_count:
        raise InvalidInputError(f"{origin}: the record has images but no user message to put them in.")
    return attached


def _folder_samples(folder: Path, prompt_template: str) -> list[ImageTextSample]:
    samples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        answer_file = path.with_suffix(".txt")
        answer = None
        if answer_file.is_file():
            try:
                answer = answer_file.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as error:
                raise InvalidInputError(f"cannot read answer file {answer_file}: {error}.") from error
        prompt = prompt_template.replace("{name}", path.name)
        samples.append(ImageTextSample(chat_messages(prompt, 1, answer), [ImageSource(path=path)], str(path)))
    if not samples:
        raise InvalidInputError(f"dataset folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).")
    return samples


def samples_from_rows(rows, name: str) -> list[ImageTextSample]:
    """Turn the rows of an HF dataset with an ``image`` or ``images`` column into samples.

    `rows` is a `datasets.Dataset` or any sequence of dicts with a `column_names` attribute.
    """
    columns = list(getattr(rows, "column_names", []))
    image_column = next((column for column in ("image", "images") if column in columns), None)
    if image_column is None:
        raise InvalidInputError(f"{name} has no 'image' or 'images' column (columns: {', '.join(columns)}).")
    samples = []
    for index, row in enumerate(rows):
        origin = f"{name} row {index}"
        value = row[image_column]
        images = [ImageSource(decoded=item) for item in (value if isinstance(value, list) else [value])]
        images = [image for image in images if image.decoded is not None]
        record = {key: row[key] for key in ("text", "question", "answer", "messages") if key in row}
        samples.append(ImageTextSample(_record_messages(record, len(images), origin), images, origin))
    return samples


# --- opening images --------------------------------------------------------------------------------------------


def builtin_image(name: str):
    """Return a scikit-image sample photograph as an RGB PIL image.

    Raises:
        InvalidInputError: scikit-image is not installed.
    """
    from PIL import Image

    try:
        from skimage import data
    except ImportError as error:
        raise InvalidInputError(
            "the built-in image set needs scikit-image; pip install 'gemoe[vision]' or scikit-image."
        ) from error
    function, index = _SKIMAGE_PHOTOS[name]
    array = getattr(data, function)()
    if index is not None:
        array = array[index]
    return Image.fromarray(array).convert("RGB")


def open_image(source: ImageSource):
    """Open one image as RGB.

    Raises:
        SampleError: the file is missing, unreadable, or in a format Pillow cannot decode.
    """
    from PIL import Image, UnidentifiedImageError

    if source.skimage_name is not None:
        return builtin_image(source.skimage_name)
    if source.decoded is not None:
        image = source.decoded if isinstance(source.decoded, Image.Image) else Image.fromarray(source.decoded)
        return image.convert("RGB")
    path = source.path
    if not path.is_file():
        raise SampleError("missing image", f"image {path} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise SampleError(
            "unsupported image format", f"image {path} is not in a format Pillow can read (suffix {path.suffix!r})"
        ) from None
    except (OSError, ValueError) as error:
        raise SampleError("unreadable image", f"cannot read image {path}: {error}") from None
