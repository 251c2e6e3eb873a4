"""Load a shipped eval task's JSON records (a list of objects) as its one test split, offline.

lm-eval calls ``load`` through the task YAML's ``custom_dataset``; the file is
read from this folder, so no Hub access and no datasets cache are involved.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_file: str, split: str = "test", **_metadata):
    """``{split: Dataset}`` built from ``HERE/data_file``; other keyword arguments are lm-eval's metadata."""
    import datasets

    records = json.loads((HERE / data_file).read_text(encoding="utf-8"))
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
