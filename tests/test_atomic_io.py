import pytest

from custom.atomic_io import atomic_path


def test_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith("table.csv") and tmp.name.startswith(".tmp-")
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "new"  # the old content survives a failed write
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]
