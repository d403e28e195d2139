"""Task ids for parallel data: which integer id the MoE task adapters (`jaxmoe.moe.task_adapters`) get for a row.

A `TaskMap` names the tasks in id order: task i is `names[i]`, a language pair "src-tgt" (`by="lang_pair"`) or a
target language (`by="tgt_lang"`). The trainer builds it from `data.tasks` / `data.task_names`, writes it as
tasks.json in the run folder and beside the exported model, and inference reads it back:

    model = jaxmoe.load_model(run_dir / "model")
    tasks = TaskMap.load(run_dir / "model")
    jaxmoe.generate(model, ids, max_new_tokens=64, task_ids=[tasks.id_of("de", "en")] * len(ids))
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["TASKS_FILE", "TASK_KINDS", "TaskMap"]

TASKS_FILE = "tasks.json"
TASK_KINDS = ("lang_pair", "tgt_lang")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskMap:
    """The task of a translation direction -> its id. by: "lang_pair" (task "de-en" for de -> en) or "tgt_lang"
    (task "en" for every direction into English); names: the tasks in id order (id i is names[i])."""

    by: str
    names: tuple[str, ...]

    def __post_init__(self):
        if self.by not in TASK_KINDS:
            raise ValueError(f"TaskMap: by={self.by!r}; expected 'lang_pair' (one task per language pair) or "
                             "'tgt_lang' (one task per target language)")
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"TaskMap: names={self.names!r}; expected a non-empty list of task names such as "
                             "['de-en', 'en-de']")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"TaskMap: task {repeated[0]!r} is listed twice in {list(names)}; each task has one id")
        object.__setattr__(self, "names", names)

    def name_of(self, src_lang: str, tgt_lang: str) -> str:
        """The task name of the direction src_lang -> tgt_lang ("de-en", or "en" by target language)."""
        return f"{src_lang}-{tgt_lang}" if self.by == "lang_pair" else tgt_lang

    def id_of(self, src_lang: str, tgt_lang: str) -> int:
        """The id of the direction's task; ValueError naming it and the known tasks when it has none."""
        name = self.name_of(src_lang, tgt_lang)
        try:
            return self.names.index(name)
        except ValueError:
            what = "language pair" if self.by == "lang_pair" else "target language"
            raise ValueError(f"{what} {name!r} ({src_lang} -> {tgt_lang}) has no task id; the known tasks are "
                             f"{dict(enumerate(self.names))}. Train on it (add it to data.task_names, at an id the "
                             "model reserved in moe.task_adapters.num_tasks) or use a known direction") from None

    @classmethod
    def from_directions(cls, by: str, directions: Iterable[tuple[str, str]], *, base: TaskMap | None = None
                        ) -> TaskMap:
        """The tasks of `directions` ((src_lang, tgt_lang) pairs): `base`'s tasks keep their ids, the others follow
        in sorted order, so the ids depend on the set of directions only, not on the order of the data."""
        if base is not None and base.by != by:
            raise ValueError(f"tasks by {by!r}, but the model's tasks are by {base.by!r}; use data.tasks: {base.by}")
        probe = cls(by, ("_",))
        names = sorted({probe.name_of(s, t) for s, t in directions})
        known = () if base is None else base.names
        return cls(by, known + tuple(n for n in names if n not in known))

    def to_dict(self) -> dict:
        return {"by": self.by, "names": list(self.names)}

    @classmethod
    def from_dict(cls, values: dict, where: str = "tasks") -> TaskMap:
        if not isinstance(values, dict) or set(values) != {"by", "names"}:
            raise ValueError(f"{where}: {values!r:.200}; expected {{\"by\": \"lang_pair\" or \"tgt_lang\", "
                             "\"names\": [task names in id order]}")
        return cls(values["by"], values["names"])

    def save(self, folder) -> Path:
        """Writes folder/tasks.json (atomically); returns its path."""
        path = Path(folder) / TASKS_FILE
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        os.replace(temp, path)
        return path

    @classmethod
    def load(cls, folder) -> TaskMap:
        """Reads folder/tasks.json (written by `save`, e.g. beside a model the trainer exported)."""
        path = Path(folder) / TASKS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TASKS_FILE} in {str(folder)!r}; a model trained with data.tasks has one "
                                    "beside its config.json")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(values, str(path))

    @classmethod
    def find(cls, folder) -> TaskMap | None:
        """`load(folder)`, or None when the folder has no tasks.json."""
        return cls.load(folder) if (Path(folder) / TASKS_FILE).is_file() else None

    def ids_of(self, directions: Sequence[tuple[str, str]]) -> list[int]:
        """`id_of` for each (src_lang, tgt_lang)."""
        return [self.id_of(s, t) for s, t in directions]
