"""`refuse_nonempty`: the one "already exists and is not empty" check of every writer, and the writers' advice.

(save_hf: tests/io/test_hf.py; save_quantized: tests/quant/test_quant_io.py; `jaxmoe quantize --out`:
tests/quant/test_quant_cli.py.)"""

import pytest

from jaxmoe.demo import run_demo
from jaxmoe.io.atomic import OVERWRITE_ADVICE, refuse_nonempty
from jaxmoe.io.peft import save_peft_adapter


def test_missing_and_empty_folders_pass(tmp_path):
    refuse_nonempty(tmp_path / "new", OVERWRITE_ADVICE)
    (tmp_path / "empty").mkdir()
    refuse_nonempty(tmp_path / "empty", OVERWRITE_ADVICE)


def test_a_file_or_a_folder_with_anything_in_it_is_refused_naming_path_label_and_advice(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full" / "hidden").mkdir(parents=True)  # an empty subfolder is content too
    for target in (tmp_path / "file", tmp_path / "full"):
        with pytest.raises(FileExistsError) as error:
            refuse_nonempty(target, "choose another folder", label="--out")
        assert str(error.value) == f"--out {str(target)!r} already exists and is not empty; choose another folder"
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["hidden"]


@pytest.mark.parametrize("write, words", [
    (lambda out: save_peft_adapter(None, "vision", out), "already exists and is not empty; pass overwrite=True"),
    (lambda out: run_demo(out, steps=1), r"output folder .* already exists and is not empty; choose another --out"),
])
def test_writers_refuse_before_any_work_with_their_own_advice(tmp_path, write, words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=words):
        write(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
