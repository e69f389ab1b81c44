"""L{put_in_place}: the last step of a download, with and without overwriting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transcoder.client.fetch import put_in_place


def test_put_in_place_without_overwrite_keeps_what_is_there(tmp_path: Path) -> None:
    """Without overwrite a file (or a dangling symlink) at the name is kept, FileExistsError, the .part removed; with nothing there the .part becomes the file."""
    partial, path = tmp_path / "a.mp4.part", tmp_path / "a.mp4"
    partial.write_bytes(b"new")
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        put_in_place(partial, path, overwrite=False)
    assert path.read_bytes() == b"old" and not partial.exists()
    link = tmp_path / "b.mp4"
    link.symlink_to(tmp_path / "nowhere")
    partial.write_bytes(b"new")
    with pytest.raises(FileExistsError):
        put_in_place(partial, link, overwrite=False)
    assert os.readlink(link) == str(tmp_path / "nowhere") and not partial.exists()
    partial.write_bytes(b"new")
    path.unlink()
    put_in_place(partial, path, overwrite=False)
    assert path.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4"]


def test_put_in_place_with_overwrite_replaces(tmp_path: Path) -> None:
    """With overwrite (-o FILE) the .part replaces a file already there."""
    partial, path = tmp_path / "a.mp4.part", tmp_path / "a.mp4"
    partial.write_bytes(b"new")
    path.write_bytes(b"old")
    put_in_place(partial, path, overwrite=True)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.mp4"]
