"""Reading py-spy's collapsed stacks into hot spots (``python -m bench --profile py-spy``)."""

from __future__ import annotations

from pathlib import Path

from bench.profiles import hot_spots

RAW = """\
process 7:"python -m pacsflow watcher";<module> (pacsflow/__main__.py:7);main (pacsflow/cli/main.py:65);handle_unit (pacsflow_watcher/watcher.py:250);_check_files (pacsflow_watcher/watcher.py:300);validate_file (pacsflow_watcher/validate.py:40);read_part10 (pacsflow/dicom/files.py:90) 6
process 7:"python -m pacsflow watcher";<module> (pacsflow/__main__.py:7);handle_unit (pacsflow_watcher/watcher.py:250);_check_files (pacsflow_watcher/watcher.py:302);_sha256 (pacsflow_watcher/watcher.py:110);update (hashlib.py:1) 3
process 7:"python -m pacsflow watcher";<module> (pacsflow/__main__.py:7);archive_confirmed (pacsflow_watcher/watcher.py:460);move (shutil.py:800) 1
process 7:"python -m pacsflow watcher";run_forever (asyncio/base_events.py:607);EpollSelector.select (selectors.py:468) 40
"""


def test_shares_are_of_working_samples_by_function(tmp_path: Path) -> None:
    profile = tmp_path / "watcher.txt"
    profile.write_text(RAW)
    spots = hot_spots(profile)
    assert spots["samples"] == 10
    assert spots["waiting_samples"] == 40  # the idle event loop is no hot spot
    own = {s["function"]: s["share"] for s in spots["self"]}
    assert own == {"pacsflow/dicom/files.py:read_part10": 0.6, "hashlib.py:update": 0.3,
                   "shutil.py:move": 0.1}  # fmt: skip
    total = {s["function"]: s["share"] for s in spots["pacsflow_total"]}
    assert total["pacsflow_watcher/watcher.py:_check_files"] == 0.9
    assert total["pacsflow_watcher/watcher.py:handle_unit"] == 0.9
    # Entry points hold every sample and are left out.
    assert not any(name.startswith("pacsflow/__main__.py") for name in total)
