"""Size-checked reads: missing, oversized and non-UTF-8 files are one-line errors naming the file."""

import pytest

from moebase.files import checked_size, read_text_bounded


class RoleError(ValueError):
    pass


def test_a_small_text_file_is_read_and_its_size_returned(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text("x = 1\n")
    assert checked_size(path, 6, "fit file") == 6
    assert read_text_bounded(path, 6, "fit file") == "x = 1\n"


def test_missing_oversized_and_binary_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "a.toml"
    with pytest.raises(ValueError, match=r"a\.toml: fit file does not exist \(see the README\)"):
        read_text_bounded(path, 10, "fit file", hint="see the README")
    path.write_text("x" * 11)
    with pytest.raises(RoleError, match=r"a\.toml: 11 bytes is over the 10 byte limit for a fit file"):
        read_text_bounded(path, 10, "fit file", error=RoleError)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"a\.toml: fit file is not UTF-8 text"):
        read_text_bounded(path, 10, "fit file")
