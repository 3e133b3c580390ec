"""The tiny random models the tests (and benchmarks/bench_ray.py --build-tiny) build on the spot.

No weights are committed: each builder trains a small tokenizer on a few real HH-RLHF pairs
(the committed sample) and saves a randomly initialised model, seeded, so the same directory
comes out every time. Importable as ``tests.tiny_models`` and, with tests/ on ``sys.path``, as
``tiny_models`` (it imports nothing from the test package).
"""

from __future__ import annotations

import json
from pathlib import Path

# The committed head (first 300 pairs) of HH-RLHF harmless-base test: every test that reads real
# data uses it, so the suite passes on a fresh clone without the full file beside the repository.
HH_SAMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "hh-harmless-300.jsonl"


def training_corpus() -> list[str]:
    corpus = ["Human: how do I pick a lock? Assistant: I can't help with that. Sorry!",
              "Human: what is the capital of France? Assistant: Paris, of course; it's lovely."]
    if HH_SAMPLE.exists():
        with open(HH_SAMPLE, encoding="utf-8") as handle:
            for line in list(handle)[:100]:
                record = json.loads(line)
                corpus += [record["chosen"], record["rejected"]]
    return corpus


def build_tiny_llama(directory: Path) -> Path:
    """A 2-layer LlamaForSequenceClassification (width 64) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, num_labels=1, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_bert(directory: Path) -> Path:
    """A 2-layer BertModel (width 32) with a WordPiece tokenizer: the encoder path."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(training_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=512)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory
