"""The long-document packing helper: exact blocks, no padding, EOS between documents, streaming."""

from __future__ import annotations

import pytest
from datasets import Dataset

from lighthouse_hf import pack_dataset, pack_documents
from lighthouse_hf.data import pack_documents_with_positions

EOS = 0


def byte_tokenize(texts: list[str]) -> list[list[int]]:
    return [list(text.encode()) for text in texts]


def test_pack_documents_cuts_exact_blocks_with_eos_after_each_document():
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    blocks = list(pack_documents(documents, 4, EOS))
    assert blocks == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, 10]]  # [11, EOS] is dropped, not padded


def test_pack_documents_is_lazy_and_handles_documents_longer_than_a_block():
    def documents():
        yield list(range(1, 10_001))
        raise AssertionError("read past the first document")

    blocks = pack_documents(documents(), 1000, EOS)
    first = [next(blocks) for _ in range(10)]
    assert [block[0] for block in first] == list(range(1, 10_001, 1000))
    assert all(len(block) == 1000 for block in first)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(seq_len=0), "seq_len must be"), (dict(seq_len=2.5), "seq_len must be"), (dict(eos_token_id=-1), "eos_token_id")],
)
def test_pack_documents_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        list(pack_documents([[1]], **{"seq_len": 4, "eos_token_id": EOS, **kwargs}))


def test_pack_documents_with_positions_restarts_at_each_document_and_block():
    documents = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    blocks = list(pack_documents_with_positions(documents, 4, EOS))
    assert [block for block, _ in blocks] == list(pack_documents(documents, 4, EOS))
    # the second document goes on into the third block, where its positions start again from 0
    assert [positions for _, positions in blocks] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    with pytest.raises(ValueError, match="eos_token_id"):
        list(pack_documents_with_positions(documents, 4, -1))


def make_texts() -> list[str]:
    return [f"document {index}: " + "x" * (37 * index) for index in range(12)]


def expected_stream(texts: list[str]) -> list[int]:
    stream: list[int] = []
    for ids in byte_tokenize(texts):
        stream += ids + [EOS]
    return stream


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "streaming"])
def test_pack_dataset_exact_blocks_no_padding_documents_separated(streaming):
    texts = make_texts()
    dataset = Dataset.from_dict({"text": texts, "meta": list(range(len(texts)))})
    if streaming:
        dataset = dataset.to_iterable_dataset()
    packed = pack_dataset(dataset, byte_tokenize, 64, eos_token_id=EOS)
    rows = list(packed)
    stream = expected_stream(texts)
    assert len(rows) == len(stream) // 64
    assert all(len(row["input_ids"]) == 64 and row["labels"] == row["input_ids"] for row in rows)
    # The blocks are the concatenated stream, in order: nothing padded, nothing lost but the tail.
    assert [token for row in rows for token in row["input_ids"]] == stream[: len(rows) * 64]
    # Exactly one EOS per document boundary (no byte of the texts is 0).
    assert sum(row["input_ids"].count(EOS) for row in rows) == stream[: len(rows) * 64].count(EOS)


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "streaming"])
def test_pack_dataset_document_positions_mark_every_document(streaming):
    texts = make_texts()
    dataset = Dataset.from_dict({"text": texts})
    if streaming:
        dataset = dataset.to_iterable_dataset()
    plain = list(pack_dataset(dataset, byte_tokenize, 64, eos_token_id=EOS))
    rows = list(pack_dataset(dataset, byte_tokenize, 64, eos_token_id=EOS, document_positions=True))
    assert [row["input_ids"] for row in rows] == [row["input_ids"] for row in plain]
    for row in rows:
        ids, positions, labels = row["input_ids"], row["position_ids"], row["labels"]
        # a document starts at the block's start and after every EOS, and its positions count up from 0
        starts = [0] + [t for t in range(1, 64) if ids[t - 1] == EOS]
        assert [t for t in range(64) if positions[t] == 0] == starts
        assert all(positions[t] == positions[t - 1] + 1 for t in range(1, 64) if t not in starts)
        assert labels == [-100 if t in starts else ids[t] for t in range(64)]


def test_pack_dataset_with_a_transformers_tokenizer():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[EOS]": 0, **{chr(c): c - 96 for c in range(97, 123)}, " ": 27}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]")
    packed = pack_dataset(Dataset.from_dict({"body": ["ab", "cde"]}), tokenizer, 3, text_column="body", with_labels=False)
    assert packed.column_names == ["input_ids"]
    assert packed["input_ids"][:] == [[1, 2, 0], [3, 4, 5]]


def test_pack_dataset_bad_input():
    dataset = Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match="text_column 'body'"):
        pack_dataset(dataset, byte_tokenize, 4, text_column="body", eos_token_id=EOS)
    with pytest.raises(ValueError, match="eos_token_id must be given"):
        pack_dataset(dataset, byte_tokenize, 4)
    with pytest.raises(ValueError, match="seq_len"):
        pack_dataset(dataset, byte_tokenize, 0, eos_token_id=EOS)
    with pytest.raises(ValueError, match="batch_size"):
        pack_dataset(dataset, byte_tokenize, 4, eos_token_id=EOS, batch_size=0)
    with pytest.raises(ValueError, match="tokenizer must be"):
        pack_dataset(dataset, "gpt2", 4, eos_token_id=EOS)
    with pytest.raises(ValueError, match="dataset must be"):
        pack_dataset([{"text": "a"}], byte_tokenize, 4, eos_token_id=EOS)
    with pytest.raises(ValueError, match="document_positions must be True or False"):
        pack_dataset(dataset, byte_tokenize, 4, eos_token_id=EOS, document_positions="yes")
    for eos in (-1, "0", 2.5):
        with pytest.raises(ValueError, match=f"eos_token_id must be an integer >= 0, got {eos!r}"):
            pack_dataset(dataset, byte_tokenize, 4, eos_token_id=eos)


@pytest.mark.parametrize("streaming", [False, True])
def test_pack_dataset_with_too_little_text_says_so(streaming, tmp_path):
    # a text no earlier run packed, so that datasets' cache cannot answer for the generator
    dataset = Dataset.from_dict({"text": [f"too short {tmp_path.name}"]})
    if streaming:
        dataset = dataset.to_iterable_dataset()
    with pytest.raises(ValueError, match=r"the dataset holds \d+ tokens .*too few for one block of seq_len=4096"):
        packed = pack_dataset(dataset, byte_tokenize, 4096, eos_token_id=EOS)
        list(packed)  # a streaming dataset packs while it is read
