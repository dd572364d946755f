"""The demo deletes only a run folder it created: never the checkout, never a folder holding other things."""

import pytest

from deploy.demo import MARKER, prepare_out


def test_demo_refuses_a_folder_holding_other_things(tmp_path, monkeypatch):
    (tmp_path / "precious.txt").write_text("keep me")
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in (tmp_path, tmp_path / "."):  # LUM_DEMO_OUT=. in a checkout
        with pytest.raises(SystemExit, match="LUM_DEMO_OUT"):
            prepare_out(out)
    assert (tmp_path / "precious.txt").read_text() == "keep me" and (tmp_path / "src").is_dir()
    assert not (tmp_path / MARKER).exists()


def test_demo_reuses_only_its_own_run_folder(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "demo"
    prepare_out(out)  # new: created, marked
    assert (out / MARKER).is_file() and (out / "logs").is_dir()
    (out / "logs" / "old.log").write_text("previous run")
    prepare_out(out)  # ours: emptied for the new run
    assert (out / MARKER).is_file() and not (out / "logs" / "old.log").exists()
    (tmp_path / "empty").mkdir()
    prepare_out(tmp_path / "empty")  # an empty folder is fine
    monkeypatch.chdir(out)
    with pytest.raises(SystemExit, match="current directory"):  # ours, but the user stands in it
        prepare_out(out)
    assert out.is_dir()
