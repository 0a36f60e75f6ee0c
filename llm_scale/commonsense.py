"""Multiple-choice commonsense sets (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA) from local JSONL.

Scoring convention (applied by the evaluator, not here): the model reads ``context + " " + choice``
and each choice is scored by the summed log-likelihood of its own tokens given the context; the
prediction is the arg-max choice. So contexts carry no trailing space and choices no leading one.
Prompts follow EleutherAI's lm-evaluation-harness where it has one, so numbers stay comparable.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .data import DataError, iter_jsonl, relative_source

__all__ = ["MultipleChoice", "load_commonsense", "COMMONSENSE_TASKS"]


@dataclass(frozen=True)
class MultipleChoice:
    name: str  # the task name, e.g. "piqa"
    contexts: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...]  # per row; the count may vary (ARC has 3 to 5)
    answers: np.ndarray  # (N,) int64 index into that row's choices; read-only
    source: str  # a path relative to cwd / the repo / "~", never absolute
    summary: dict  # JSON-able: rows read, choice counts, answer counts

    def __post_init__(self) -> None:
        answers = np.array(self.answers, dtype=np.int64)
        answers.flags.writeable = False
        object.__setattr__(self, "answers", answers)
        if not len(self.contexts) == len(self.choices) == answers.size:
            raise DataError(f"{self.name}: {len(self.contexts)} contexts, {len(self.choices)} choice lists and "
                            f"{answers.size} answers; they must pair up 1:1")
        bad = [i for i, (a, c) in enumerate(zip(answers, self.choices)) if not 0 <= a < len(c)]
        if bad:
            raise DataError(f"{self.name}: row {bad[0]} answer {answers[bad[0]]} is outside its "
                            f"{len(self.choices[bad[0]])} choices")

    def __len__(self) -> int:
        return len(self.contexts)

    def subset(self, idx) -> "MultipleChoice":
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return MultipleChoice(name=self.name, contexts=tuple(self.contexts[i] for i in idx),
                              choices=tuple(self.choices[i] for i in idx), answers=self.answers[idx],
                              source=self.source, summary={"rows": int(idx.size), "parent": self.summary})


Parsed = tuple[str, tuple[str, ...], int]  # (context, choices, answer index)


def _index(value, *, first: int, count: int, key: str) -> int:
    """A 0- or 1-based label ("2", 2) as a 0-based index, checked against the number of choices."""
    i = int(str(value).strip()) - first
    if not 0 <= i < count:
        raise ValueError(f"{key}={value!r} is not one of {list(range(first, first + count))}")
    return i


def _boolq(r: dict) -> Parsed:
    # BoolQ's own files call the answer "answer"; the SuperGLUE copy calls it "label".
    answer = r["answer"] if "answer" in r else r["label"]
    if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
        answer = answer.strip().lower() == "true"
    if not isinstance(answer, bool):
        raise ValueError(f"answer={answer!r} must be true or false")
    question = r["question"].strip().rstrip("?")
    return f"{r['passage'].strip()}\nQuestion: {question}?\nAnswer:", ("no", "yes"), int(answer)


def _piqa(r: dict) -> Parsed:
    return f"Question: {r['goal'].strip()}\nAnswer:", (r["sol1"], r["sol2"]), _index(r["label"], first=0, count=2,
                                                                                     key="label")


def _siqa(r: dict) -> Parsed:
    choices = (r["answerA"], r["answerB"], r["answerC"])
    return (f"{r['context'].strip()}\nQuestion: {r['question'].strip()}\nAnswer:", choices,
            _index(r["label"], first=1, count=3, key="label"))


def _hellaswag(r: dict) -> Parsed:
    endings = tuple(r["endings"])
    return r["ctx"].strip(), endings, _index(r["label"], first=0, count=len(endings), key="label")


def _winogrande(r: dict) -> Parsed:
    """The context is the sentence before the blank; each choice is its option plus the rest of the
    sentence, so the two choices differ only in their first words (whole-continuation scoring)."""
    sentence = r["sentence"]
    if "_" not in sentence:
        raise ValueError(f"sentence has no '_' blank: {sentence[:60]!r}")
    before, after = sentence.split("_", 1)
    choices = (r["option1"] + after, r["option2"] + after)
    return before.rstrip(), choices, _index(r["answer"], first=1, count=2, key="answer")


def _arc_style(r: dict, *, prefix: str, suffix: str) -> Parsed:
    question = r["question"]
    options = question["choices"]
    labels = [str(c["label"]).strip() for c in options]
    key = str(r["answerKey"]).strip()
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
    return f"{prefix}{question['stem'].strip()}{suffix}", tuple(c["text"] for c in options), labels.index(key)


def _arc(r: dict) -> Parsed:
    return _arc_style(r, prefix="Question: ", suffix="\nAnswer:")


def _obqa(r: dict) -> Parsed:
    return _arc_style(r, prefix="", suffix="")  # OBQA stems are sentence openings the choice completes


# task -> (parser, the record layout, named in errors)
COMMONSENSE_TASKS: dict[str, tuple[Callable[[dict], Parsed], str]] = {
    "boolq": (_boolq, '{"question": str, "passage": str, "answer": bool}'),
    "piqa": (_piqa, '{"goal", "sol1", "sol2", "label": 0|1} (merge train-labels.lst into the JSONL as "label")'),
    "siqa": (_siqa, '{"context", "question", "answerA", "answerB", "answerC", "label": "1".."3"}'),
    "hellaswag": (_hellaswag, '{"ctx": str, "endings": [str, ...], "label": int}'),
    "winogrande": (_winogrande, '{"sentence": "... _ ...", "option1", "option2", "answer": "1"|"2"}'),
    "arc-e": (_arc, '{"question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey": letter or digit}'),
    "arc-c": (_arc, '{"question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey": letter or digit}'),
    "obqa": (_obqa, '{"question": {"stem", "choices": [{"text", "label"}, ...]}, "answerKey": letter}'),
}


def load_commonsense(task: str, path) -> MultipleChoice:
    """A commonsense set from a JSONL file in the layout it is distributed in (see COMMONSENSE_TASKS)."""
    if task not in COMMONSENSE_TASKS:
        raise DataError(f"unknown commonsense task {task!r}; choose one of {', '.join(COMMONSENSE_TASKS)}")
    parse, layout = COMMONSENSE_TASKS[task]
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the {task} JSONL file (one record a line: {layout})")
    contexts, choices, answers = [], [], []
    for line_no, record in iter_jsonl(path):
        try:
            context, options, answer = parse(record)
        except KeyError as e:
            raise DataError(f"{path.name} line {line_no}: {task} record has no key {e.args[0]!r} (keys found: "
                            f"{sorted(record)}); expected {layout}") from e
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{path.name} line {line_no}: bad {task} record ({e}); expected {layout}") from e
        contexts.append(context)
        choices.append(tuple(str(c).strip() for c in options))
        answers.append(answer)
    if not contexts:
        raise DataError(f"{path.name}: no records; expected one JSON object a line: {layout}")
    summary = {"rows_read": len(contexts),
               "choice_counts": {str(k): v for k, v in sorted(Counter(map(len, choices)).items())},
               "answer_counts": {str(k): v for k, v in sorted(Counter(answers).items())}}
    return MultipleChoice(name=task, contexts=tuple(contexts), choices=tuple(choices), answers=np.array(answers),
                          source=relative_source(path), summary=summary)
