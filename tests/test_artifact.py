"""echoembed.artifact: the staged-directory and atomic writers, and manifests old and new."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from echoembed.artifact import (
    FORMAT_VERSION,
    Manifest,
    atomic_save_npy,
    atomic_write,
    atomic_write_json,
    recipe_from_settings,
    settings_of,
    staged_dir,
)
from echoembed.artifact.recipes import (
    RECIPE_TYPES,
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8StaticConfig,
)
from echoembed.echo import SpecialTokens
from echoembed.errors import ArtifactError

DATA = Path(__file__).parent / "data"


def _siblings(path: Path) -> list[str]:
    """Everything in ``path``'s directory but ``path`` itself (temporary leftovers)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# -- staged_dir -------------------------------------------------------------------------------


def test_staged_dir_builds_beside_the_target_then_renames(tmp_path):
    out = tmp_path / "art"
    with staged_dir(out) as stage:
        assert stage.path.parent == tmp_path and stage.path != out
        assert not out.exists()  # nothing at the target while building
        (stage.path / "a.txt").write_text("x")
        work = stage.scratch()
        (work / "big.tmp").write_text("intermediate")
    assert (out / "a.txt").read_text() == "x"
    assert _siblings(out) == []  # the stage was renamed, the scratch dir removed


def test_staged_dir_failure_leaves_nothing_and_keeps_the_old_target(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(out, force=True) as stage:
            (stage.path / "new.txt").write_text("new")
            stage.scratch()
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _siblings(out) == []


def test_staged_dir_refuses_an_existing_target_unless_forced(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        with staged_dir(out):
            raise AssertionError("the body must not run")
    with staged_dir(out, force=True) as stage:
        (stage.path / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _siblings(out) == []  # the old directory was removed after the rename


def test_staged_dir_refuses_a_file_at_the_target(tmp_path):
    out = tmp_path / "art"
    out.write_text("a file")
    with pytest.raises(ArtifactError, match="not a directory"):
        with staged_dir(out, force=True):
            pass
    assert out.read_text() == "a file"


def test_staged_dir_verify_failure_installs_nothing(tmp_path):
    out = tmp_path / "art"

    def verify(path: Path) -> None:
        if not (path / "manifest.json").is_file():
            raise ArtifactError("no manifest")

    with pytest.raises(ArtifactError, match="no manifest"):
        with staged_dir(out, verify=verify) as stage:
            (stage.path / "model.onnx").write_bytes(b"\0")
    assert not out.exists() and _siblings(out) == []
    with staged_dir(out, verify=verify) as stage:
        (stage.path / "manifest.json").write_text("{}")
    assert (out / "manifest.json").is_file()


def test_staged_dir_gives_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "art") as stage:
            pass
    finally:
        os.umask(mask)
    assert stage.out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o027)
    try:
        with staged_dir(tmp_path / "art") as stage:
            atomic_write_json(stage.path / "manifest.json", {})
        atomic_save_npy(tmp_path / "e.npy", np.zeros(2))
    finally:
        os.umask(mask)
    assert (tmp_path / "art" / "manifest.json").stat().st_mode & 0o777 == 0o640  # not 0600
    assert (tmp_path / "e.npy").stat().st_mode & 0o777 == 0o640


def test_a_failed_move_aside_leaves_no_leftover(tmp_path, monkeypatch):
    import echoembed.artifact.writer as writer

    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = writer.os.replace

    def failing(src, dst):
        if Path(src) == out:
            raise PermissionError("cannot move the old artifact")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", failing)
    with pytest.raises(PermissionError):
        with staged_dir(out, force=True) as stage:
            (stage.path / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _siblings(out) == []


def test_staged_dir_makes_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "art"
    with staged_dir(out) as stage:
        (stage.path / "f").write_text("1")
    assert (out / "f").read_text() == "1"


# -- atomic files -----------------------------------------------------------------------------


def test_atomic_write_text_bytes_json_npy(tmp_path):
    assert atomic_write(tmp_path / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "d" / "x.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "d" / "x.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"')
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(np.load(atomic_save_npy(tmp_path / "e.npy", arr)), arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "d", "e.npy", "t.txt"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_artifact_imports_neither_torch_nor_onnx():
    code = textwrap.dedent(
        """
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"torch", "transformers", "onnx", "onnxruntime"}:
                    raise ImportError(f"blocked import of {name} (test)")
        sys.meta_path.insert(0, _Block())
        import echoembed.artifact
        from echoembed.artifact import read_manifest, staged_dir, recipe_from_settings
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# -- manifests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["manifest-format1-int4-hqq.json", "manifest-format1-int8-dynamic.json"]
)
def test_format1_manifest_from_the_previous_release_still_loads(name):
    data = json.loads((DATA / name).read_text(encoding="utf-8"))
    assert data["format_version"] == 1
    m = Manifest.from_dict(data, where=name)
    assert m.format_version == 1  # as read (describe says so); written back as format 2
    assert m.special_tokens == SpecialTokens("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert m.opset == 18 and m.opset_imports == {"": 18}  # format 1 recorded the request only
    assert m.requested_opset == 18
    assert m.output_name == "embedding" and m.hidden_size == 576
    q = m.quantization
    if name.endswith("int4-hqq.json"):
        assert q.settings == Int4WeightOnlyConfig(algorithm="hqq", block_size=32)
        assert q.settings.accuracy_level == 4 and q.settings.exclude == ()
    else:
        # written before per-token scales: its graph has one scale per tensor, whatever the
        # field's default is now
        assert q.settings == Int8DynamicConfig(
            reduce_range=False, activation_scale="tensor", fold_row_scales=False
        )
        assert q.settings.smooth_alpha == 0.7
    written = json.loads(m.to_json())
    assert written["format_version"] == FORMAT_VERSION and written["opset_imports"] == {"": 18}
    again = Manifest.from_dict(written)
    assert again == dataclasses.replace(m, format_version=FORMAT_VERSION)  # format 2 round-trips


def test_manifest_from_a_newer_format_or_bad_settings_is_a_clear_error():
    data = json.loads((DATA / "manifest-format1-int4-hqq.json").read_text(encoding="utf-8"))
    with pytest.raises(ArtifactError, match="newer than this echoembed"):
        Manifest.from_dict(dict(data, format_version=FORMAT_VERSION + 1))
    bad = json.loads(json.dumps(data))
    bad["quantization"]["settings"]["warp_speed"] = 9
    with pytest.raises(ArtifactError, match="warp_speed.*unknown"):
        Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["quantization"]["settings"]["block_size"] = 12
    with pytest.raises(ArtifactError, match="settings are invalid.*block_size"):
        Manifest.from_dict(bad)
    current = json.loads(Manifest.from_dict(data).to_json())
    del current["opset_imports"]
    with pytest.raises(ArtifactError, match="malformed manifest.*opset_imports"):
        Manifest.from_dict(current)  # format 2 must say what its graph imports
    bad = json.loads(json.dumps(data))
    bad["special_tokens"] = ["<s>"]
    with pytest.raises(ArtifactError, match="malformed manifest"):
        Manifest.from_dict(bad)


@pytest.mark.parametrize("cls", RECIPE_TYPES)
def test_every_recipe_round_trips_through_its_settings(cls):
    cfg = cls()
    if cls is Int4WeightOnlyConfig:
        cfg = Int4WeightOnlyConfig(algorithm="gptq", exclude=("*.down_proj/*",))
    elif cls is Int8StaticConfig:
        cfg = Int8StaticConfig(method="percentile", activations="uint8", reduce_range=True)
    back = recipe_from_settings(cfg.recipe, json.loads(json.dumps(settings_of(cfg))))
    assert back == cfg and type(back) is cls


def test_recipe_from_settings_errors_and_defaults():
    with pytest.raises(ArtifactError, match="unknown quantization recipe 'int3'"):
        recipe_from_settings("int3", {})
    with pytest.raises(ArtifactError, match="disagrees"):
        recipe_from_settings("int4-rtn", {"algorithm": "hqq"})
    # a setting an older manifest lacks takes the field's default
    old = {k: v for k, v in settings_of(Int8DynamicConfig()).items() if k != "reduce_range"}
    assert recipe_from_settings("int8-dynamic", old).reduce_range is None
    # ... unless the default changed since: per-token scales are new, older graphs per tensor
    assert recipe_from_settings("int8-dynamic", old).activation_scale == "token"
    older = {k: v for k, v in old.items() if k != "activation_scale"}
    assert recipe_from_settings("int8-dynamic", older).activation_scale == "tensor"
    with pytest.raises(ArtifactError, match="activation_scale must be 'token' or 'tensor'"):
        recipe_from_settings("int8-dynamic", dict(old, activation_scale="row"))
    # per-token graphs written before folded row scales have none
    no_fold = {k: v for k, v in old.items() if k != "fold_row_scales"}
    assert recipe_from_settings("int8-dynamic", no_fold).fold_row_scales is False
    assert recipe_from_settings("int8-dynamic", no_fold).activation_scale == "token"
    assert recipe_from_settings("int4-hqq", {}).algorithm == "hqq"
    # an artifact an older echoembed made with a setting quantize now refuses still loads
    assert recipe_from_settings("int4-hqq", {"symmetric": True}).symmetric is True


def test_manifest_is_frozen():
    m = Manifest.from_dict(json.loads((DATA / "manifest-format1-int4-hqq.json").read_text()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.opset = 21  # type: ignore[misc]


def test_the_old_runtime_manifest_path_still_imports():
    import echoembed.artifact.manifest as new
    import echoembed.runtime.manifest as old

    assert old.Manifest is new.Manifest and old.read_manifest is new.read_manifest
