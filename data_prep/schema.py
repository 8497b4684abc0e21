"""The one sample schema every converter produces: a document is ordered segments with roles."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
# Source formats (converters in data_prep.sources) and text templates (data_prep.encode). Kept here,
# in a module that imports nothing heavy, so that `solo-data --help` builds its parser instantly.
FORMATS = ("imagenet", "caption", "interleaved", "text", "llava", "sharegpt", "chat")
TEMPLATES = ("plain", "mistral")


class RejectedInput(ValueError):
    """An input record that cannot become a document; `reason` says why (kept in report.json)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass
class Segment:
    """One piece of a document: text, or one image kept as its original encoded bytes."""

    role: str
    text: str | None = None
    image: bytes | None = None
    image_name: str | None = None  # where the image came from, for error messages

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass
class Document:
    """An ordered list of segments. Consecutive segments of one role form one message (turn)."""

    segments: list[Segment] = field(default_factory=list)
    dropped_images: list[str] = field(default_factory=list)  # why each left-out image is missing

    def add_text(self, role: str, text: str) -> None:
        check_role(role)
        if text:
            self.segments.append(Segment(role=role, text=text))

    def add_image(self, role: str, data: bytes, name: str) -> None:
        check_role(role)
        self.segments.append(Segment(role=role, image=data, image_name=name))


def check_role(role: str) -> None:
    if role not in ROLES:
        raise RejectedInput(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
