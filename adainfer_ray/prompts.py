"""Classification tasks as prompts: a shared few-shot prefix, a per-item template, a verbalizer.

A prompt is `prefix + head + text + tail`, e.g.

    prefix = "Classify the sentiment...\n\nReview: I loved it.\nSentiment: positive\n\n..."   (shared)
    head, tail = "Review: ", "\nSentiment:"                                            (per item)

and the model's answer is the label whose verbalizer token (" positive") scores highest at the last
position. The pieces are tokenized separately and concatenated, so the prefix tokens are identical
for every item: that is what lets the engine compute the prefix once and reuse it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # label names as they appear in the output
    verbalizers: tuple[str, ...]  # what the model writes for each label; its first token stands for it
    template: str  # per item, with one "{text}"; ends where the model must name the label
    instruction: str = ""
    demos: tuple[tuple[str, str], ...] = field(default=())  # (text, label) few-shot demonstrations

    def __post_init__(self):
        if self.template.count("{text}") != 1:
            raise ValueError(f"the template must contain {{text}} exactly once: {self.template!r}")
        if len(self.labels) < 2 or len(self.labels) != len(self.verbalizers):
            raise ValueError("a task needs at least two labels and one verbalizer per label")
        unknown = {label for _, label in self.demos} - set(self.labels)
        if unknown:
            raise ValueError(f"demos use labels {sorted(unknown)} that are not among {list(self.labels)}")

    @property
    def head(self) -> str:
        return self.template.split("{text}")[0]

    @property
    def tail(self) -> str:
        return self.template.split("{text}")[1]

    def prefix(self) -> str:
        """The shared part: instruction and demonstrations, each answered with its verbalizer."""
        parts = [self.instruction + "\n\n"] if self.instruction else []
        for text, label in self.demos:
            parts.append(self.template.format(text=text) + self.verbalizers[self.labels.index(label)] + "\n\n")
        return "".join(parts)

    def fingerprint(self) -> str:
        """Identifies the exact prompt format: a policy is only valid for the template it saw."""
        blob = json.dumps([self.labels, self.verbalizers, self.template, self.instruction, self.demos])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "verbalizers": list(self.verbalizers),
                "template": self.template, "instruction": self.instruction,
                "demos": [list(d) for d in self.demos], "fingerprint": self.fingerprint()}


# Eight demonstrations, alternating and ending on a negative one: SmolLM2-135M leans "positive"
# and copies the most recent demo; this order measured 84.5% on 200 SST-2 dev items vs 61% with
# four demos (every demo here is written for this project, none comes from SST-2).
SENTIMENT = Task(
    name="sentiment",
    labels=("negative", "positive"),
    verbalizers=(" negative", " positive"),
    instruction="Classify the sentiment of each review as positive or negative.",
    template="Review: {text}\nSentiment:",
    demos=(
        ("An absolute delight from start to finish, I would go again tomorrow.", "positive"),
        ("The staff were rude and the room smelled of smoke.", "negative"),
        ("Sharp writing, warm performances, and a great soundtrack.", "positive"),
        ("It broke after two days and support never answered.", "negative"),
        ("funny, moving and beautifully shot", "positive"),
        ("a dull, plodding mess that wastes a talented cast", "negative"),
        ("the best meal we have had all year", "positive"),
        ("I wanted my money back after twenty minutes.", "negative"),
    ),
)

TOPIC = Task(
    name="topic",
    labels=("World", "Sports", "Business", "Sci/Tech"),
    verbalizers=(" World", " Sports", " Business", " Technology"),
    instruction="Classify each news article by topic: World, Sports, Business or Technology.",
    template="Article: {text}\nTopic:",
    demos=(
        ("Rebels and government troops agreed to a ceasefire after talks hosted by the United Nations.", "World"),
        ("The striker scored twice as the home side won the cup final in extra time.", "Sports"),
        ("Shares of the retailer fell 8% after it cut its profit forecast for the year.", "Business"),
        ("The chipmaker unveiled a faster processor for laptops and a new open-source compiler.", "Sci/Tech"),
    ),
)

BUILTIN_TASKS = {t.name: t for t in (SENTIMENT, TOPIC)}


def make_task(name: str = "sentiment", labels: list[str] | None = None, template: str | None = None,
              demos: list[tuple[str, str]] | None = None, instruction: str | None = None) -> Task:
    """A built-in task, or a custom one from label names and a template (verbalizer = " " + label)."""
    if labels:
        return Task(name=name if name not in BUILTIN_TASKS else "custom", labels=tuple(labels),
                    verbalizers=tuple(" " + x for x in labels),
                    template=template or "Text: {text}\nLabel:",
                    instruction=instruction if instruction is not None else
                    "Classify each text as one of: " + ", ".join(labels) + ".",
                    demos=tuple(demos or ()))
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task {name!r}: built in are {sorted(BUILTIN_TASKS)}, or give --labels")
    base = BUILTIN_TASKS[name]
    changes = {}
    if template:
        changes["template"] = template
    if demos is not None:
        changes["demos"] = tuple(demos)
    if instruction is not None:
        changes["instruction"] = instruction
    return replace(base, **changes)


@dataclass
class EncodedBatch:
    prefix_ids: list[int]  # shared by every item
    item_ids: list[list[int]]  # each item's own tokens (head + text + tail)
    truncated: list[bool]


# What PromptEncoder.encode does to a text before tokenizing it, recorded in _run.json: a rerun that
# would handle texts otherwise (as outputs written before the strip did) is refused, as for another
# model or template, so one output never mixes two handlings. Change it with the handling.
TEXT_HANDLING = "strip"


class PromptEncoder:
    """Turns texts into token ids for one task and tokenizer, truncating long texts to fit."""

    def __init__(self, task: Task, tokenizer, max_tokens: int):
        self.task = task
        self.tokenizer = tokenizer
        self.prefix_ids = tokenizer(task.prefix() or "", add_special_tokens=True)["input_ids"]
        if not self.prefix_ids and tokenizer.bos_token_id is not None:
            self.prefix_ids = [tokenizer.bos_token_id]
        self.head_ids = self._ids(task.head)
        self.tail_ids = self._ids(task.tail)
        self.label_token_ids = [self._ids(v)[0] for v in task.verbalizers]
        if len(set(self.label_token_ids)) != len(self.label_token_ids):
            raise ValueError(f"verbalizers {task.verbalizers} share their first token; pick distinct words")
        # Room left for the text itself after the shared prefix and the template around it.
        self.text_budget = max_tokens - len(self.prefix_ids) - len(self.head_ids) - len(self.tail_ids)
        if self.text_budget < 8:
            raise ValueError(f"the prompt prefix leaves only {self.text_budget} tokens of a {max_tokens}-token context")

    def _ids(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    def encode(self, texts: list[str]) -> EncodedBatch:
        # (TEXT_HANDLING names what this does to a text before tokenizing it.) Outer whitespace is file format, not content: "journey . " (SST-2's TSV) would put a lone " "
        # token right before "\nSentiment:", where the answer is read. That one token moved the early
        # layers' confidence enough to break a policy calibrated on stripped text (SST-2 dev: 9.4% of
        # rows exited at layer 4 against 0.3% on the calibration's test part). The demos carry none.
        texts = [t.strip() for t in texts]
        # A token is rarely longer than 16 characters: cut huge texts before tokenizing them at all.
        max_chars = 16 * self.text_budget
        clipped = [t[:max_chars] for t in texts]
        items, truncated = [], []
        for text, ids in zip(texts, self.tokenizer(clipped, add_special_tokens=False)["input_ids"]):
            # Keep the start of the text; the template's tail (where the model answers) stays intact.
            truncated.append(len(ids) > self.text_budget or len(text) > max_chars)
            items.append(self.head_ids + ids[: self.text_budget] + self.tail_ids)
        return EncodedBatch(self.prefix_ids, items, truncated)
