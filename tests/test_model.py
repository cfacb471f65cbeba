"""The APT model and tokenizer: causality, autopoietic vs plain attention, tokenizer files."""

import json

import pytest
import torch

from apt_model.config import APTConfig, ConfigError, preset
from apt_model.model import APTModel
from apt_model.tokenizer import SPECIALS, CharTokenizer


@pytest.mark.parametrize("autopoietic", [True, False])
def test_no_future_token_leaks(autopoietic):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=40, use_autopoietic=autopoietic, dropout=0.0)
    m = APTModel(cfg).eval()
    x = torch.randint(0, 40, (3, cfg.block_size))
    base = m(x)
    for t in (0, 10, cfg.block_size - 2):
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 7) % 40  # change every later token
        out = m(y)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} changed"
        assert not torch.equal(out[:, t + 1:], base[:, t + 1:])


def test_plain_attention_has_no_autopoietic_parameters():
    a = APTModel(preset("tiny", vocab_size=40))
    b = APTModel(preset("tiny", vocab_size=40, use_autopoietic=False))
    names_a = {n for n, _ in a.named_parameters()}
    names_b = {n for n, _ in b.named_parameters()}
    assert any("gate" in n for n in names_a) and not any("gate" in n for n in names_b)
    assert a.head.weight is a.tok_emb.weight


def test_autopoietic_gate_changes_the_output():
    torch.manual_seed(0)
    m = APTModel(preset("tiny", vocab_size=40, dropout=0.0)).eval()
    x = torch.randint(0, 40, (2, 16))
    before = m(x)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.gate.fill_(3.0)
    assert not torch.allclose(before, m(x))


def test_tokenizer_files_and_round_trip(tmp_path):
    text = "Hello, 世界! The model 学习.\n"
    tok = CharTokenizer.build(text)
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text("utf-8"))
    assert list(vocab)[: len(SPECIALS)] == SPECIALS and vocab["世"] > 3
    assert "世" in (tmp_path / "vocab.json").read_text("utf-8")  # real UTF-8, not escapes
    again = CharTokenizer.load(tmp_path)
    assert again.vocab == tok.vocab
    assert tok.encode("☃") == [tok.unk_id]


def test_config_round_trip_and_refusals(tmp_path):
    cfg = preset("small")
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert APTConfig.load(tmp_path / "c.json") == cfg
    for bad, field in (({"n_heads": 5}, "n_heads"), ({"lr": -1.0}, "lr"), ({"dropout": 1.5}, "dropout"),
                       ({"epochs": 0}, "epochs"), ({"batch_size": "8"}, "batch_size"), ({"bogus": 1}, "bogus")):
        with pytest.raises(ConfigError, match=field):
            APTConfig.from_dict({**cfg.to_dict(), **bad})
    assert {"tiny", "small", "base"} <= {"tiny", "small", "base"}
    assert preset("base").d_model > preset("small").d_model > preset("tiny").d_model
