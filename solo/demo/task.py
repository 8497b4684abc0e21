"""The demo task: small generated pictures whose questions can only be answered from the pixels.

Each picture is 64 x 64 px (2 x 2 patches of 32 px, one quadrant per patch) on a light
background, holding 1-4 copies of one shape (circle, square, triangle, cross) in one colour (red,
green, blue, yellow), each in its own quadrant, with jittered size, place and tint plus pixel
noise. Four question types, each with four answers:

=========  ==================================  ===========================================
type       question                            answers
=========  ==================================  ===========================================
colour     What colour are the shapes?         red, green, blue, yellow
shape      Which shape is drawn?               circle, square, triangle, cross
count      How many shapes are there?          one, two, three, four
position   Where is the shape?                 top left, top right, bottom left, bottom right
=========  ==================================  ===========================================

For every question the answer is drawn first, uniformly, and the picture is then drawn to match
it, so within each question type the answers are balanced: a model that reads only the text
cannot beat chance (1/4). The position question is asked of one-shape pictures only.

Raw sources are written as a user would have them (:func:`write_sources`): PNG files, a labels
JSONL and a captions JSONL (``{"image", "caption"}``: pretraining stages 1 and 2), LLaVA-style
instruction JSON for stage 3 / SFT, and a held-out question set of the same form. Everything is a
pure function of the seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64  # px: 2 x 2 patches of 32 px
QUADRANT = IMAGE_SIZE // 2
BACKGROUND = (235, 235, 230)
COLOURS = {"red": (215, 45, 40), "green": (40, 160, 60), "blue": (45, 75, 215), "yellow": (225, 195, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant index = row * 2 + col
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "Which shape is drawn?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}
ANSWERS = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": POSITIONS,
}
QUESTION_TYPES = tuple(QUESTIONS)


@dataclass(frozen=True)
class Scene:
    """What a picture shows: one colour, one shape kind, in the listed quadrants (0..3)."""

    colour: str
    shape: str
    quadrants: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.quadrants)

    def answer(self, question_type: str) -> str:
        if question_type == "colour":
            return self.colour
        if question_type == "shape":
            return self.shape
        if question_type == "count":
            return COUNT_WORDS[self.count - 1]
        if question_type == "position":
            if self.count != 1:
                raise ValueError("the position question needs a one-shape scene")
            return POSITIONS[self.quadrants[0]]
        raise ValueError(f"unknown question type {question_type!r}; choose one of {QUESTION_TYPES}")

    def label(self) -> str:
        """Stage-1 label, like an ImageNet class name: colour and shape."""
        return f"{self.colour} {self.shape}"

    def caption(self) -> str:
        """Stage-2 caption naming every property the questions ask about."""
        places = " and ".join(POSITIONS[q] for q in self.quadrants)
        noun = self.shape if self.count == 1 else ("crosses" if self.shape == "cross" else self.shape + "s")
        return f"{COUNT_WORDS[self.count - 1]} {self.colour} {noun} at the {places}."


def scene_for_answer(rng: np.random.Generator, question_type: str, answer: str) -> Scene:
    """A random scene whose answer to `question_type` is `answer` (the other properties uniform)."""
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    count = int(rng.integers(1, 5))
    if question_type == "colour":
        colour = answer
    elif question_type == "shape":
        shape = answer
    elif question_type == "count":
        count = COUNT_WORDS.index(answer) + 1
    elif question_type == "position":
        return Scene(colour, shape, (POSITIONS.index(answer),))
    else:
        raise ValueError(f"unknown question type {question_type!r}; choose one of {QUESTION_TYPES}")
    quadrants = tuple(sorted(int(q) for q in rng.choice(4, size=count, replace=False)))
    return Scene(colour, shape, quadrants)


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene with uniform colour, shape and count (stages 1 and 2)."""
    count = int(rng.integers(1, 5))
    quadrants = tuple(sorted(int(q) for q in rng.choice(4, size=count, replace=False)))
    return Scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), quadrants)


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the scene: jittered size, centre and tint per shape, plus pixel noise."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for quadrant in scene.quadrants:
        row, col = divmod(quadrant, 2)
        half = int(rng.integers(8, 12))  # half-size: shapes 16-22 px inside a 32-px quadrant
        cx = col * QUADRANT + QUADRANT // 2 + int(rng.integers(-3, 4))
        cy = row * QUADRANT + QUADRANT // 2 + int(rng.integers(-3, 4))
        tint = np.asarray(COLOURS[scene.colour]) + rng.integers(-20, 21, size=3)
        fill = tuple(int(c) for c in np.clip(tint, 0, 255))
        box = (cx - half, cy - half, cx + half, cy + half)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        else:  # cross
            arm = max(3, half // 3)
            draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
            draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def balanced_questions(count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`count` (question type, answer) pairs: types in turn, answers cycling, then shuffled, so every
    type's answers are balanced (exactly, when count is a multiple of 16)."""
    pairs = []
    for index in range(count):
        question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        answers = ANSWERS[question_type]
        pairs.append((question_type, answers[(index // len(QUESTION_TYPES)) % len(answers)]))
    order = rng.permutation(count)
    return [pairs[i] for i in order]


@dataclass(frozen=True)
class TaskSizes:
    """How many pictures each raw source holds."""

    pretrain: int = 3000  # pictures with a label (stage 1) and a caption (stage 2)
    instructions: int = 6000  # stage 3 and SFT (one question per picture)
    heldout: int = 400  # evaluation


SPLITS = ("instructions", "heldout")  # question sets (LLaVA-style JSON)
SOURCE_FILES = {
    "labels": "labels.jsonl",
    "captions": "captions.jsonl",
    "instructions": "instructions.json",
    "heldout": "heldout.json",
}


def _save(image: Image.Image, root: Path, relative: str) -> str:
    path = root / relative
    image.save(path, format="PNG", compress_level=1)  # fast: writing, not size, is what costs here
    return relative


def write_sources(out_dir: str | os.PathLike, sizes: TaskSizes = TaskSizes(), seed: int = 0,
                  blank_images: bool = False) -> dict[str, str]:
    """Write the raw sources into `out_dir` (images/ plus the four files of SOURCE_FILES).

    The labels and captions describe the same pretraining pictures. The pretraining pictures, the
    instructions and the held-out set each use their own random stream (seeded by `seed` and the
    set), so the size of one set does not change the pictures of another.
    `blank_images=True` writes the same files with every picture replaced by the empty background
    (the text-only control: the questions and answers are unchanged). Returns name -> file path.
    """
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    blank = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)

    def picture(scene: Scene, rng: np.random.Generator) -> Image.Image:
        drawn = render(scene, rng)  # drawn even when blanked, so the random streams stay aligned
        return blank if blank_images else drawn

    streams = {name: np.random.default_rng([seed, index]) for index, name in enumerate(("pretrain", *SPLITS))}
    paths = {name: str(root / file) for name, file in SOURCE_FILES.items()}

    rng = streams["pretrain"]
    with open(paths["labels"], "w", encoding="utf-8") as labels, \
            open(paths["captions"], "w", encoding="utf-8") as captions:
        for index in range(sizes.pretrain):
            scene = random_scene(rng)
            image = _save(picture(scene, rng), root, f"images/pretrain_{index:06d}.png")
            labels.write(json.dumps({"image": image, "caption": scene.label()}) + "\n")
            captions.write(json.dumps({"image": image, "caption": scene.caption()}) + "\n")

    for name in SPLITS:
        rng = streams[name]
        records = []
        for index, (question_type, answer) in enumerate(balanced_questions(getattr(sizes, name), rng)):
            scene = scene_for_answer(rng, question_type, answer)
            image = _save(picture(scene, rng), root, f"images/{name}_{index:06d}.png")
            records.append({
                "id": f"{name}-{index:06d}",
                "image": image,
                "question_type": question_type,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + QUESTIONS[question_type]},
                    {"from": "gpt", "value": answer},
                ],
            })
        with open(paths[name], "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1)
            handle.write("\n")
    return paths


def chance_accuracy(records: list[dict]) -> float:
    """Expected accuracy of a uniform guess among each question type's answers."""
    return float(np.mean([1.0 / len(ANSWERS[r["question_type"]]) for r in records]))


def text_only_accuracy(train: list[dict], test: list[dict]) -> float:
    """Accuracy of the best text-only predictor learnable from `train`: for each question text,
    always answer its most frequent training answer (ties: the first in sorted order)."""
    from collections import Counter, defaultdict

    by_question: dict[str, Counter] = defaultdict(Counter)
    for record in train:
        question, answer = (turn["value"] for turn in record["conversations"][:2])
        by_question[question][answer] += 1
    hits = 0
    for record in test:
        question, answer = (turn["value"] for turn in record["conversations"][:2])
        counts = by_question.get(question)
        if counts:
            best = max(sorted(counts), key=lambda a: counts[a])
            hits += best == answer
    return hits / max(len(test), 1)


def vocabulary_texts(repeat: int = 20) -> list[str]:
    """The task's questions, answers and caption words, for the tiny base tokenizer's training text
    (so that each answer is one or two tokens rather than a run of bytes)."""
    words = [*QUESTIONS.values(), *(a for answers in ANSWERS.values() for a in answers)]
    words += [" " + a for answers in ANSWERS.values() for a in answers]
    words += [Scene(c, s, (0, 1)).caption() for c in COLOURS for s in SHAPES]
    words += [Scene(c, s, (q,)).caption() + " " + Scene(c, s, (q,)).label() for c in COLOURS for s in SHAPES
              for q in range(4)]
    return words * repeat
