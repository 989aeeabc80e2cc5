"""Package boundaries: echo stays torch-free."""

from __future__ import annotations

from tests.helpers import run_blocked


def test_blocker_really_blocks():
    r = run_blocked("import torch")
    assert r.returncode != 0 and "blocked import of torch" in r.stderr


def test_echo_imports_and_works_without_torch(smollm2_tokenizer, tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    smollm2_tokenizer[0].save(str(tok_path))
    r = run_blocked(
        f"""
        import numpy as np
        from tokenizers import Tokenizer
        import echoembed, echoembed.echo, echoembed.validation, echoembed.errors
        from echoembed.echo import EchoEncoder, EncoderConfig, SpecialTokens, get_template, pool
        tok = Tokenizer.from_file({str(tok_path)!r})
        enc = EchoEncoder(tok, SpecialTokens("<|im_start|>", "<|im_end|>"),
                          EncoderConfig(get_template("echo")))
        b = enc.encode(["Hello world", "A cat."])
        h = np.random.default_rng(0).normal(size=b.input_ids.shape + (4,)).astype("float32")
        print(pool(h, b.pool_mask, "mean").shape)
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(2, 4)"


def test_cli_module_imports_without_torch():
    r = run_blocked("import echoembed.cli.main; echoembed.cli.main.build_parser()")
    assert r.returncode == 0, r.stderr


def test_deploy_imports_without_torch():
    r = run_blocked(
        """
        import echoembed.deploy, echoembed.deploy.models, echoembed.deploy.serve
        import echoembed.deploy.triton
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        """
    )
    assert r.returncode == 0, r.stderr


def test_corpus_imports_without_torch_ray_or_pyarrow():
    r = run_blocked(
        """
        import echoembed.corpus, echoembed.corpus.ray_engine, echoembed.corpus.verify
        heavy = {"torch", "transformers", "ray", "pyarrow", "pandas"} & set(sys.modules)
        assert not heavy, heavy
        """
    )
    assert r.returncode == 0, r.stderr
