"""What a UML kernel needs of the host: vm.max_map_count (on a file standing in for the sysctl). No addresses used.

That a guest process of ~420 MB survives with it is proven by the UML
points at 10,000 Services of ``kubelab bench`` (BENCHMARKS.md).
"""

from pathlib import Path

from kubelab.netlab.uml import ensure_max_map_count


def test_max_map_count_raised_when_lower(tmp_path):
    f = tmp_path / "max_map_count"
    f.write_text("65530\n")
    raised, said = ensure_max_map_count(1_048_576, str(f))
    assert raised and f.read_text() == "1048576\n"
    assert "from 65,530 to 1,048,576" in said


def test_max_map_count_never_lowered(tmp_path):
    f = tmp_path / "max_map_count"
    f.write_text("2147483642\n")  # systemd's own, higher value stays
    assert ensure_max_map_count(1_048_576, str(f)) == (False, "")
    assert f.read_text() == "2147483642\n"


def test_max_map_count_unwritable_says_how_to_fix(tmp_path, monkeypatch):
    f = tmp_path / "max_map_count"
    f.write_text("65530\n")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", denied)
    raised, said = ensure_max_map_count(1_048_576, str(f))
    assert not raised
    assert "sysctl -w vm.max_map_count=1048576" in said and "Permission denied" in said
