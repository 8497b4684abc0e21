"""Shared fixtures of the SFT tests: a tiny SOLO checkpoint and a tiny generated instruction set."""

from __future__ import annotations

import json
import os

from data_prep.synthetic import jpeg_bytes, photo_like

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_tiny_solo(directory: str, **overrides) -> str:
    """A `solo create` checkpoint of the tiny local Mistral (hidden 64, 2 layers)."""
    from solo.create import create_solo_checkpoint
    from solo.tiny import make_base_checkpoint

    base = os.path.join(directory, "base")
    out = os.path.join(directory, "solo")
    make_base_checkpoint(base, **overrides)
    create_solo_checkpoint(base, out)
    return out


def solid_jpeg(colour: str, size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    return jpeg_bytes(Image.new("RGB", size, COLOURS[colour]))


def make_instruction_set(directory: str, count: int = 48, *, bad: bool = False) -> str:
    """LLaVA JSON of `count` samples: single-image colour questions, multi-turn and multi-image
    samples and text-only ones. With `bad`, one sample of each bad kind is appended."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    for colour in COLOURS:
        with open(os.path.join(directory, "images", f"{colour}.jpg"), "wb") as fh:
            fh.write(solid_jpeg(colour))
    with open(os.path.join(directory, "images", "photo.jpg"), "wb") as fh:
        fh.write(jpeg_bytes(photo_like(80, 60, seed=1)))
    names = list(COLOURS)
    samples = []
    for i in range(count):
        colour = names[i % 3]
        kind = i % 4
        if kind == 0:
            samples.append({"id": f"s{i}", "image": f"images/{colour}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is this?"},
                {"from": "gpt", "value": f"it is {colour}."}]})
        elif kind == 1:
            samples.append({"id": f"s{i}", "image": f"images/{colour}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is this?"},
                {"from": "gpt", "value": f"it is {colour}."},
                {"from": "human", "value": "are you sure?"},
                {"from": "gpt", "value": "yes."}]})
        elif kind == 2:
            other = names[(i + 1) % 3]
            samples.append({"id": f"s{i}", "image": [f"images/{colour}.jpg", f"images/{other}.jpg"],
                            "conversations": [
                                {"from": "human", "value": "<image> and <image>: the first colour?"},
                                {"from": "gpt", "value": f"{colour}."}]})
        else:
            samples.append({"id": f"s{i}", "conversations": [
                {"from": "system", "value": "answer briefly"},
                {"from": "human", "value": f"say {colour}"},
                {"from": "gpt", "value": f"{colour}"}]})
    if bad:
        samples += [
            {"id": "missing-image", "image": "images/nope.jpg",
             "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hi"}]},
            {"id": "unknown-role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
            {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
            {"id": "placeholders", "image": "images/red.jpg",
             "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}]},
        ]
        with open(os.path.join(directory, "images", "broken.jpg"), "wb") as fh:
            fh.write(b"\xff\xd8\xff not a jpeg")
        samples.append({"id": "broken-image", "image": "images/broken.jpg",
                        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]})
    path = os.path.join(directory, "sft.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(samples, fh)
    return path
