"""Long-document training data: tokenize, concatenate with EOS, cut into fixed-length blocks.

Every block is exactly ``seq_len`` tokens and nothing is padded, so Lighthouse always runs (a
padding mask would send a layer to its dense fallback). By default blocks are plain causal
sequences: attention crosses document boundaries inside a block, the model sees the EOS between
two documents and positions count from the block's start.

With ``document_positions=True`` each block also gets ``position_ids`` that restart at 0 where a
document starts (and at the block's start, where a document cut by the previous block goes on),
and the label of each document's first token is -100 (it is not predicted from the document
before). Transformers reads restarting positions as packed documents when there is no KV cache
(Trainer's default ``use_cache=False``), and every layer then keeps the documents apart:
Lighthouse runs on each document alone (``lighthouse_hf.ops.varlen``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, Union

from .validation import is_int

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset
    from transformers import PreTrainedTokenizerBase

Tokenizer = Union["PreTrainedTokenizerBase", Callable[[list[str]], Sequence[Sequence[int]]]]
"""A Transformers tokenizer, or any function from a list of texts to their lists of token ids."""


def _check_seq_len(seq_len: object) -> int:
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    return seq_len


def _check_eos(eos_token_id: object) -> int:
    if not is_int(eos_token_id) or eos_token_id < 0:
        raise ValueError(f"eos_token_id must be an integer >= 0, got {eos_token_id!r}")
    return eos_token_id


def _blocks(
    documents: Iterable[Sequence[int]], seq_len: int, eos_token_id: int, with_positions: bool
) -> Iterator[tuple[list[int], list[int] | None]]:
    """Each block, and its positions (0 at each document's first token and at the block's start)
    when ``with_positions``."""
    buffer: list[int] = []
    positions: list[int] = []
    for document in documents:
        buffer.extend(document)
        buffer.append(eos_token_id)
        if with_positions:
            positions.extend(range(len(document) + 1))  # the EOS belongs to its document
        start = 0
        while len(buffer) - start >= seq_len:
            block_positions = None
            if with_positions:
                block_positions = positions[start : start + seq_len]
                if block_positions[0]:  # a document cut by the previous block goes on from 0
                    cut = block_positions.index(0) if 0 in block_positions else seq_len
                    block_positions[:cut] = range(cut)
            yield buffer[start : start + seq_len], block_positions
            start += seq_len
        del buffer[:start]  # once per document, so a very long document costs linear time
        del positions[:start]


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, eos_token_id: int) -> Iterator[list[int]]:
    """Blocks of exactly ``seq_len`` tokens from documents of token ids, each document followed by
    ``eos_token_id``. Lazy (one document and one block in memory at a time); the last, incomplete
    block is dropped rather than padded."""
    _check_seq_len(seq_len)
    _check_eos(eos_token_id)
    for block, _ in _blocks(documents, seq_len, eos_token_id, with_positions=False):
        yield block


def pack_documents_with_positions(
    documents: Iterable[Sequence[int]], seq_len: int, eos_token_id: int
) -> Iterator[tuple[list[int], list[int]]]:
    """The blocks of :func:`pack_documents`, each with its ``position_ids``: 0 at every document's
    first token and at the block's first token, counting up inside each document (its EOS
    included), so that Transformers sees one packed sequence per document."""
    _check_seq_len(seq_len)
    _check_eos(eos_token_id)
    yield from _blocks(documents, seq_len, eos_token_id, with_positions=True)


def _tokenize_function(tokenizer: Tokenizer) -> Callable[[list[str]], Sequence[Sequence[int]]]:
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: documents longer than the model's context are the point here.
        return lambda texts: tokenizer(texts, verbose=False)["input_ids"]
    if callable(tokenizer):
        return tokenizer
    raise ValueError(
        f"tokenizer must be a Transformers tokenizer or a function from texts to token ids, got {type(tokenizer).__name__}"
    )


def _resolve_eos(tokenizer: Tokenizer, eos_token_id: int | None) -> int:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        raise ValueError("eos_token_id must be given: the tokenizer has no eos_token_id")
    return _check_eos(eos_token_id)


def _texts(dataset: Iterable[dict[str, Any]], text_column: str, batch_size: int, progress: Any) -> Iterator[list[str]]:
    batch: list[str] = []
    for row in dataset:
        batch.append(row[text_column])
        if len(batch) == batch_size:
            yield batch
            progress.update(len(batch))
            batch = []
    if batch:
        yield batch
        progress.update(len(batch))


def _generate_blocks(
    dataset: Iterable[dict[str, Any]],
    tokenizer: Tokenizer,
    seq_len: int,
    eos_token_id: int,
    text_column: str,
    batch_size: int,
    with_labels: bool,
    document_positions: bool,
    total: int | None,
) -> Iterator[dict[str, list[int]]]:
    from tqdm.auto import tqdm

    tokenize = _tokenize_function(tokenizer)
    # A streaming dataset is consumed while training runs: the Trainer's bar shows that progress.
    progress = tqdm(total=total, desc=f"Packing documents into {seq_len}-token blocks", unit="doc", disable=total is None)
    tokens = 0

    def counted(documents: Iterable[Sequence[int]]) -> Iterator[Sequence[int]]:
        nonlocal tokens
        for ids in documents:
            tokens += len(ids) + 1  # and its EOS
            yield ids

    with progress:
        documents = (ids for texts in _texts(dataset, text_column, batch_size, progress) for ids in tokenize(texts))
        blocks = 0
        for block, positions in _blocks(counted(documents), seq_len, eos_token_id, document_positions):
            blocks += 1
            row = {"input_ids": block}
            if with_labels:
                # A document's first token is not predicted from the document before it.
                row["labels"] = block if positions is None else [-100 if p == 0 else t for t, p in zip(block, positions)]
            if positions is not None:
                row["position_ids"] = positions
            yield row
    if blocks == 0:
        raise TooLittleTextError(
            f"the dataset holds {tokens} tokens (documents and their EOS), too few for one block of seq_len={seq_len}"
        )


class TooLittleTextError(ValueError):
    """``pack_dataset`` found fewer tokens than one block needs."""


def pack_dataset(
    dataset: "Dataset | IterableDataset",
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    text_column: str = "text",
    eos_token_id: int | None = None,
    batch_size: int = 1000,
    with_labels: bool = True,
    document_positions: bool = False,
) -> "Dataset | IterableDataset":
    """Turn a ``datasets`` text dataset into causal-LM training blocks of exactly ``seq_len`` tokens.

    Documents (rows of ``text_column``) are tokenized ``batch_size`` at a time, each is followed by
    ``eos_token_id`` (default: the tokenizer's), and the stream is cut into blocks; the final
    incomplete block is dropped, nothing is padded. Returns rows ``{"input_ids", "labels"}``
    (``labels`` equal to ``input_ids``; the model shifts them), ready for ``Trainer`` with its
    default collator. A ``Dataset`` gives a ``Dataset`` (built once, with a progress bar, cached by
    ``datasets``); an ``IterableDataset`` (``streaming=True``) gives an ``IterableDataset`` that
    packs lazily while it is read.

    By default attention crosses document boundaries inside a block. ``document_positions=True``
    adds ``position_ids`` that restart at every document (and at the block's start) and sets the
    label of each document's first token to -100: with Trainer (``use_cache=False``) every layer
    then attends within each document only, and Lighthouse runs on each document alone (see the
    module docstring).
    """
    from datasets import Dataset, Features, IterableDataset, Sequence as SequenceFeature, Value

    _check_seq_len(seq_len)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise ValueError(f"dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset (columns: {columns})")
    if not isinstance(document_positions, bool):
        raise ValueError(f"document_positions must be True or False, got {document_positions!r}")
    _tokenize_function(tokenizer)  # reject a bad tokenizer now, not when the data is first read
    eos_token_id = _resolve_eos(tokenizer, eos_token_id)
    block = SequenceFeature(Value("int32"), length=seq_len)
    names = ["input_ids", *(["labels"] if with_labels else []), *(["position_ids"] if document_positions else [])]
    features = Features({name: block for name in names})
    gen_kwargs = dict(
        dataset=dataset,
        tokenizer=tokenizer,
        seq_len=seq_len,
        eos_token_id=eos_token_id,
        text_column=text_column,
        batch_size=batch_size,
        with_labels=with_labels,
        document_positions=document_positions,
    )
    if isinstance(dataset, IterableDataset):
        return IterableDataset.from_generator(_generate_blocks, features=features, gen_kwargs={**gen_kwargs, "total": None})
    try:
        return Dataset.from_generator(_generate_blocks, features=features, gen_kwargs={**gen_kwargs, "total": len(dataset)})
    except Exception as error:  # datasets wraps what the generator raises in its own error types
        cause = error
        while cause is not None and not isinstance(cause, TooLittleTextError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None
