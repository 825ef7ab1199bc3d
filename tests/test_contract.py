"""The model-folder contract rejects malformed folders with messages that name the problem."""

import json
from pathlib import Path

import pytest

from service.contract import ModelFolderError, load_manifest


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="not a directory"):
        load_manifest(tmp_path / "nope")


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_bad_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_wrong_schema_version_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ModelFolderError, match="schema_version 99"):
        load_manifest(tmp_path)


def test_invalid_fields_are_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "name": "m"}))
    with pytest.raises(ModelFolderError, match="model_kind"):
        load_manifest(tmp_path)
