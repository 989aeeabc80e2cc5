"""CLI: thin commands, real files, typed errors turned into exit code 2."""

from __future__ import annotations

import numpy as np

from echoembed.cli.main import main
from echoembed.runtime import read_manifest


def test_embed_writes_npy(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("A man is playing the guitar.\nHello world\nKids play.\n", encoding="utf-8")
    out = tmp_path / "out" / "emb.npy"
    rc = main(
        [
            "embed",
            "--model",
            str(tiny_llama_dir),
            "--template",
            "echo",
            "-i",
            str(src),
            "-o",
            str(out),
            "--pooling",
            "last",
        ]
    )
    assert rc == 0
    emb = np.load(out)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert "wrote 3 x 32" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temp files left"


def test_embed_blank_line_is_a_clear_error(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("ok\n\nalso ok\n", encoding="utf-8")
    rc = main(
        ["embed", "--model", str(tiny_llama_dir), "-i", str(src), "-o", str(tmp_path / "o.npy")]
    )
    assert rc == 2
    assert "texts.txt:2 is blank" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


def test_embed_bad_template_and_model(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("ok\n", encoding="utf-8")
    rc = main(
        [
            "embed",
            "--model",
            str(tiny_llama_dir),
            "--template",
            "{%%txt%%}",
            "-i",
            str(src),
            "-o",
            str(tmp_path / "o.npy"),
        ]
    )
    assert rc == 2 and "unknown variable %%txt%%" in capsys.readouterr().err
    rc = main(["embed", "--model", str(tmp_path / "missing"), "-i", str(src), "-o", "x.npy"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_templates_lists_presets(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    for name in ("echo", "classical", "query", "document"):
        assert name in out


def test_export_inspect_embed_artifact(tiny_llama_dir, tmp_path, capsys):
    art = tmp_path / "art"
    rc = main(
        ["export", str(tiny_llama_dir), str(art), "--pooling", "last", "--exporter", "torchscript"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "pooling          last" in out and "parity" in out
    assert main(["inspect", str(art)]) == 0
    assert "all 2 files verified" in capsys.readouterr().out
    assert main(["export", str(tiny_llama_dir), str(art)]) == 2
    assert "already exists" in capsys.readouterr().err

    src = tmp_path / "texts.txt"
    src.write_text("A man is playing the guitar.\nKids play.\n", encoding="utf-8")
    rc = main(["embed", str(art), "-i", str(src), "-o", str(tmp_path / "rt.npy")])
    assert rc == 0
    rc = main(
        [
            "embed",
            "--model",
            str(tiny_llama_dir),
            "--pooling",
            "last",
            "-i",
            str(src),
            "-o",
            str(tmp_path / "ref.npy"),
        ]
    )
    assert rc == 0
    np.testing.assert_allclose(
        np.load(tmp_path / "rt.npy"), np.load(tmp_path / "ref.npy"), atol=1e-4
    )
    assert main(["embed", str(art), "--model", "smollm2", "-i", str(src), "-o", "x.npy"]) == 2
    assert "either an ARTIFACT" in capsys.readouterr().err


def test_inspect_reports_corruption(tiny_llama_dir, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["export", str(tiny_llama_dir), str(art), "--exporter", "torchscript"]) == 0
    with open(art / "tokenizer.json", "a", encoding="utf-8") as f:
        f.write(" ")
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 2
    assert "checksum mismatch for tokenizer.json" in capsys.readouterr().err


def test_quantize_cli(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(
        [
            "quantize",
            str(tiny_artifact.path),
            str(out),
            "--recipe",
            "int4-rtn",
            "--samples",
            "8",
            "--exclude",
            "*.layers.0.*",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "quantization     int4-rtn" in text and "7 layers kept in float" in text
    rc = main(
        [
            "quantize",
            str(tiny_artifact.path),
            str(tmp_path / "r"),
            "--recipe",
            "int4-rtn",
            "--samples",
            "8",
            "--max-drop",
            "0",
            "--exclude",
            "*.layers.0.*",
        ]
    )
    assert rc == 2 and "misses the budget" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    base = ["quantize", str(tiny_artifact.path), "--samples", "8"]
    rc = main(base[:2] + [str(tmp_path / "x"), *base[2:], "--recipe", "int4-rtn", "--reduce-range"])
    assert rc == 2 and "has no setting 'reduce_range'" in capsys.readouterr().err
    rc = main(base[:2] + [str(tmp_path / "w8"), *base[2:], "--recipe", "int8-dynamic",
                          "--no-reduce-range", "--activation-scale", "tensor"])  # fmt: skip
    settings = read_manifest(tmp_path / "w8").quantization.settings
    assert rc == 0 and settings.reduce_range is False and settings.activation_scale == "tensor"
    assert settings.fold_row_scales is False  # resolved: per-tensor scales have no row scales
    rc = main(base[:2] + [str(tmp_path / "f"), *base[2:], "--recipe", "int8-dynamic",
                          "--activation-scale", "tensor", "--fold-row-scales"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "fold_row_scales=True needs activation_scale='token'" in err
    assert not (tmp_path / "f").exists()
    rc = main(base[:2] + [str(tmp_path / "z"), *base[2:], "--recipe", "int4-rtn",
                          "--activation-scale", "token"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "has no setting 'activation_scale'" in err and "int8-dynamic" in err
    rc = main(base[:2] + [str(tmp_path / "y"), *base[2:], "--recipe", "int4-rtn", "--weights",
                          "uint8"])  # fmt: skip
    assert rc == 2 and "has no setting 'weights'" in capsys.readouterr().err


def test_validate_distractors_flag_reaches_the_config(monkeypatch, tmp_path, capsys):
    """--distractors unset is None (500, or scaled by --limit); set, it is kept as given."""
    import echoembed.validation.validate as v

    seen = []

    def fake_validate(artifact, config, progress=None):
        seen.append(config)
        raise v.InputError("stop here")  # typed user error -> exit code 2

    monkeypatch.setattr(v, "validate", fake_validate)
    base = ["validate", str(tmp_path), "--sts", str(tmp_path / "x.tsv"), "--runs-dir"]
    base.append(str(tmp_path / "runs"))
    assert main(base + ["--limit", "20"]) == 2
    assert main(base + ["--limit", "20", "--distractors", "500"]) == 2
    assert main(base + ["--distractors", "all"]) == 2
    assert main(base + ["--distractors", "-3"]) == 2
    assert [c.distractors for c in seen] == [None, 500, "all"]
    assert v.retrieval_options(seen[0]).distractors == 20  # min(500, limit)
    assert v.retrieval_options(seen[1]).distractors == 500  # explicit: not scaled
    assert "expected a number >= 0" in capsys.readouterr().err
