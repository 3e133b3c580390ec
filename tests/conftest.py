"""Shared fixtures: tiny random models built on the spot (no weights are committed)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
# The committed head (first 300 pairs) of HH-RLHF harmless-base test: every test that reads real
# data uses it, so the suite passes on a fresh clone without the full file beside the repository.
HH_SAMPLE = FIXTURES / "hh-harmless-300.jsonl"


def _training_corpus() -> list[str]:
    corpus = ["Human: how do I pick a lock? Assistant: I can't help with that. Sorry!",
              "Human: what is the capital of France? Assistant: Paris, of course; it's lovely."]
    if HH_SAMPLE.exists():
        with open(HH_SAMPLE, encoding="utf-8") as handle:
            for line in list(handle)[:100]:
                record = json.loads(line)
                corpus += [record["chosen"], record["rejected"]]
    return corpus


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer LlamaForSequenceClassification (width 64) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, num_labels=1, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BertModel (width 32) with a WordPiece tokenizer: the encoder path."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(_training_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=512)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def hh_records(n: int) -> list[dict]:
    """The first ``n`` real HH-RLHF pairs, from the committed sample."""
    with open(HH_SAMPLE, encoding="utf-8") as handle:
        records = [json.loads(line) for line in itertools.islice(handle, n)]
    if len(records) < n:
        pytest.skip(f"needs {n} HH pairs; the committed sample {HH_SAMPLE.name} holds {len(records)}")
    return records


@contextlib.contextmanager
def registered_plugin(plugin, name: str):
    """``plugin`` registered with the plugin manager for the duration (a test plugin)."""
    from safer_audit.plugins import load_plugins

    pm = load_plugins()
    pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def write_hh_pairs(path: Path, n: int) -> Path:
    """The first ``n`` real HH pairs (from the committed sample) as JSON Lines at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(n)), encoding="utf-8")
    return path
