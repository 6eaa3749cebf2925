"""One arm of the pre-training study: a from-scratch Llama on long books, dense or Lighthouse.

    python examples/study/study.py --data .study-data --arm dense --out results
    python examples/study/study.py --data .study-data --arm recovery --out results
    python examples/study/study.py --data .study-data --arm lighthouse --out results

Arms (same model initialization, data order and token budget):

- ``dense``: SDPA throughout;
- ``recovery``: Lighthouse for ``--recovery`` of the steps, then dense SDPA
  (``lighthouse_hf.RecoveryCallback``);
- ``lighthouse``: Lighthouse throughout, evaluated with dense attention and with Lighthouse.

Training runs through ``transformers.Trainer``, the workflow users run. GPU time is the sum of
the optimizer steps' wall times between synchronizations (``on_step_begin`` to ``on_step_end``);
evaluation runs inside the callback after the step's clock stops, and is timed separately.

Writes ``<out>/<arm>.json`` after every evaluation (so a run cut short still leaves its curve):
the settings, every step's time and loss, the held-out evaluations (loss against GPU time and
tokens), and at the end: loss by held-out document, by position bucket and by offset inside a
coarse block; the pass-key probe; a passage-copying probe; and the future-blind check (loss at
sampled positions with the tokens after them cut off). Reads only the token file of
``prepare_data.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

import lighthouse_hf
from lighthouse_hf.training import activation_checkpointing, uses_lighthouse

ARMS = ("dense", "recovery", "lighthouse")
HELD_OUT_KEY_RESIDUE = 3
"""Keys ``k`` with ``k % 8 == 3`` only ever appear in evaluation probes: the held-out keys."""
DEPTH_BLOCK = 1024
"""Training probes state the key inside even-numbered blocks of ``min(1024, seq_len // 32)`` tokens,
evaluation probes inside odd-numbered ones: the evaluated depths are never trained on."""
PROBE_DEPTH_BINS = 8


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Corpus:
    tokens: np.ndarray
    meta: dict

    @classmethod
    def load(cls, directory: Path) -> "Corpus":
        return cls(np.load(directory / "tokens.npy", mmap_mode="r"), json.loads((directory / "meta.json").read_text()))

    def documents(self, split: str) -> list[tuple[str, np.ndarray]]:
        return [
            (d["name"], self.tokens[d["start"] : d["start"] + d["length"]])
            for d in self.meta["documents"]
            if d["split"] == split
        ]

    def train_blocks(self, seq_len: int) -> np.ndarray:
        """Training documents packed (EOS between them) into ``[blocks, seq_len]`` with the package's
        own packer, the way its users prepare long-document data."""
        documents = (ids.tolist() for _, ids in self.documents("train"))
        blocks = list(lighthouse_hf.pack_documents(documents, seq_len, self.meta["eos_token_id"]))
        return np.asarray(blocks, dtype=np.int64)

    def heldout_windows(self, seq_len: int) -> tuple[np.ndarray, list[str]]:
        """Windows of ``seq_len`` tokens from each held-out document, every ``seq_len // 2`` tokens
        (the last one flush with the document's end), so each window is one document and early
        positions cover text of the whole document."""
        windows, names = [], []
        for name, ids in self.documents("heldout"):
            if len(ids) < seq_len:
                raise ValueError(f"held-out document {name} has {len(ids)} tokens, fewer than --seq-len {seq_len}")
            count = math.ceil((len(ids) - seq_len) / (seq_len // 2)) + 1
            for start in np.linspace(0, len(ids) - seq_len, count).round().astype(int):
                windows.append(np.asarray(ids[start : start + seq_len], dtype=np.int64))
                names.append(name)
        return np.stack(windows), names


class PassKey:
    """The retrieval probe: 'The pass key is NNNNN. Remember it.' stated once inside a text, and
    'What is the pass key? The pass key is NNNNN' as the sequence's last tokens."""

    def __init__(self, pieces: dict) -> None:
        self.statement, self.statement_end = pieces["statement"], pieces["statement_end"]
        self.question, self.space, self.digits = pieces["question"], pieces["space"], pieces["digits"]

    def answer(self, key: int) -> list[int]:
        return [self.space] + [self.digits[int(c)] for c in str(key)]

    def room(self, seq_len: int) -> int:
        """Positions where a statement may start: everything before the question."""
        return seq_len - len(self.statement) - len(self.statement_end) - len(self.question) - 2 * len(self.answer(10000))

    def insert(self, haystack: np.ndarray, key: int, position: int) -> np.ndarray:
        answer = self.answer(key)
        statement = self.statement + answer + self.statement_end
        question = self.question + answer
        keep = len(haystack) - len(statement) - len(question)
        if not 0 <= position <= keep:
            raise ValueError(f"position {position} outside 0..{keep}")
        return np.concatenate([haystack[:position], statement, haystack[position:keep], question]).astype(np.int64)

    def position(self, rng: np.random.Generator, seq_len: int, parity: int, depth_range: tuple[float, float] = (0.0, 1.0)) -> int:
        """A statement start inside a ``DEPTH_BLOCK`` block of the given parity, within a fraction of the room."""
        room = self.room(seq_len)
        low, high = int(depth_range[0] * room), max(int(depth_range[0] * room) + 1, int(depth_range[1] * room))
        block = min(DEPTH_BLOCK, seq_len // 32)
        for _ in range(1000):
            position = int(rng.integers(low, high))
            if (position // block) % 2 == parity:
                return position
        raise ValueError(f"no position of parity {parity} in [{low}, {high})")


def random_key(rng: np.random.Generator, held_out: bool) -> int:
    while True:
        key = int(rng.integers(10000, 100000))
        if (key % 8 == HELD_OUT_KEY_RESIDUE) == held_out:
            return key


class TrainStream(torch.utils.data.IterableDataset):
    """Training blocks in a seeded order, reshuffled each epoch; a ``passkey_rate`` share of them
    carries a pass key at a random (training) depth. A function of the seed alone, so every arm
    sees the same sequences in the same order."""

    def __init__(self, blocks: np.ndarray, passkey: PassKey, seed: int, passkey_rate: float) -> None:
        self.blocks, self.passkey, self.seed, self.passkey_rate = blocks, passkey, seed, passkey_rate

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        seq_len = self.blocks.shape[1]
        while True:
            for index in rng.permutation(len(self.blocks)):
                ids = self.blocks[index]
                if rng.random() < self.passkey_rate:
                    key = random_key(rng, held_out=False)
                    ids = self.passkey.insert(ids, key, self.passkey.position(rng, seq_len, parity=0))
                ids = torch.from_numpy(np.ascontiguousarray(ids))
                yield {"input_ids": ids, "labels": ids}


def retrieval_probes(windows: np.ndarray, passkey: PassKey, seed: int, per_bin: int) -> list[dict]:
    """Held-out keys at held-out depths inside held-out text, ``per_bin`` per depth bin."""
    rng = np.random.default_rng(seed + 1)
    seq_len = windows.shape[1]
    probes = []
    for depth_bin in range(PROBE_DEPTH_BINS):
        span = (depth_bin / PROBE_DEPTH_BINS, (depth_bin + 1) / PROBE_DEPTH_BINS)
        for j in range(per_bin):
            window = (depth_bin * per_bin + j) % len(windows)
            key = random_key(rng, held_out=True)
            position = passkey.position(rng, seq_len, parity=1, depth_range=span)
            # Depth 0: the text's first token; 1: just before the question.
            probes.append(dict(window=window, key=key, position=position, depth=position / passkey.room(seq_len)))
    return probes


COPY_SOURCE_DRAWS = 100


def _holds(text: np.ndarray, passage: np.ndarray) -> bool:
    return bool((np.lib.stride_tricks.sliding_window_view(text, len(passage)) == passage).all(axis=1).any())


def copy_probes(windows: np.ndarray, seed: int, per_bin: int, length: int) -> list[dict]:
    """A ``length``-token passage of another held-out window written at a depth of the text and
    again as its last tokens; reading the repeat back needs the first copy, however far. Windows of
    one book overlap, so a passage that the text already holds is drawn again (from another
    source window and offset): the only earlier copy is the one written in."""
    rng = np.random.default_rng(seed + 2)
    count, seq_len = windows.shape
    room = seq_len - 2 * length
    probes = []
    for depth_bin in range(PROBE_DEPTH_BINS):
        for j in range(per_bin):
            window = (depth_bin * per_bin + j) % count
            position = int(rng.integers(depth_bin * room // PROBE_DEPTH_BINS, (depth_bin + 1) * room // PROBE_DEPTH_BINS))
            for _ in range(COPY_SOURCE_DRAWS):
                source, offset = int(rng.integers(0, count)), int(rng.integers(0, seq_len - length))
                if source != window and not _holds(windows[window], windows[source, offset : offset + length]):
                    break
            else:
                raise ValueError(f"no passage of {length} tokens found that held-out window {window} does not already hold")
            probes.append(dict(window=window, source=source, offset=offset, position=position, depth=position / room))
    return probes


def future_blind_positions(windows: np.ndarray, seed: int, per_window: int, block: int) -> list[tuple[int, int, int]]:
    """(window, position, length): the position lies in the last coarse block of a prefix of one of
    four lengths (3/8 to 3/4 of the window, so every kernel shape compiles once) at a random
    offset inside that block."""
    rng = np.random.default_rng(seed + 3)
    count, seq_len = windows.shape
    lengths = [(seq_len * k // 8) // block * block for k in (3, 4, 5, 6)]
    out = []
    for window in range(count):
        for _ in range(per_window):
            length = lengths[int(rng.integers(len(lengths)))]
            out.append((window, length - block + int(rng.integers(block)), length))
    return out


# ---------------------------------------------------------------------------------------------
# Model


def build_model(
    vocab_size: int, seq_len: int, eos: int, seed: int, hidden: int, layers: int, heads: int, intermediate: int
):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        # A base of 500K (Llama 3's) keeps 32K positions apart in the slowest rotary frequencies.
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def non_embedding_parameters(model) -> int:
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


class attention:
    """Run a block with the model switched to ``implementation``, then switch it back."""

    def __init__(self, model, implementation: str) -> None:
        self.model, self.implementation = model, implementation

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(self.implementation)

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)


# ---------------------------------------------------------------------------------------------
# Evaluation


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Probes:
    passkey: list[dict]
    copies: list[dict]
    copy_length: int
    blind: list[tuple[int, int]]
    block: int
    """The coarsest pooled span: Lighthouse chooses and refines whole blocks of this many tokens."""
    filler: int


class Evaluator:
    def __init__(self, windows: np.ndarray, names: list[str], passkey: PassKey, probes: Probes, bf16: bool, device) -> None:
        self.windows = torch.from_numpy(windows).to(device)
        self.names, self.passkey, self.probes = names, passkey, probes
        self.device = torch.device(device)
        self.bf16 = bf16

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def token_losses(self, model) -> torch.Tensor:
        """``[windows, seq_len - 1]`` float32 losses; entry t is the loss of token t + 1."""
        out = []
        for ids in self.windows:
            with self._autocast():
                logits = model(input_ids=ids[None]).logits[0]
            out.append(F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none"))
        return torch.stack(out).cpu()

    @torch.no_grad()
    def retrieval(self, model) -> list[dict]:
        """Teacher-forced argmax over the five digits: all five right is exactly what greedy decoding
        of five tokens after 'The pass key is ' would produce."""
        windows = self.windows.cpu().numpy()
        results = []
        for probe in self.probes.passkey:
            ids = self.passkey.insert(windows[probe["window"]], probe["key"], probe["position"])
            ids = torch.from_numpy(ids).to(self.device)
            with self._autocast():
                logits = model(input_ids=ids[None], logits_to_keep=6).logits[0]
            predicted = logits[:-1].argmax(-1)
            correct = (predicted == ids[-5:]).sum().item()
            results.append({**probe, "digits_correct": int(correct), "exact": correct == 5})
        return results

    @torch.no_grad()
    def copying(self, model) -> list[dict]:
        """Teacher-forced accuracy on the repeated passage (its first token has no cue and is not
        scored), with the first copy in place and, as the control, without it."""
        length = self.probes.copy_length
        results = []
        for probe in self.probes.copies:
            passage = self.windows[probe["source"], probe["offset"] : probe["offset"] + length]
            ids = self.windows[probe["window"]].clone()
            ids[-length:] = passage
            control = ids.clone()
            ids[probe["position"] : probe["position"] + length] = passage
            entry = dict(probe)
            for name, sequence in (("with_source", ids), ("control", control)):
                with self._autocast():
                    logits = model(input_ids=sequence[None], logits_to_keep=length).logits[0, :-1].float()
                targets = sequence[-length + 1 :]
                entry[name] = dict(
                    accuracy=(logits.argmax(-1) == targets).float().mean().item(),
                    loss=F.cross_entropy(logits, targets).item(),
                )
            results.append(entry)
        return results

    @torch.no_grad()
    def future_blind(self, model, losses: torch.Tensor) -> dict:
        """Loss at chosen positions when nothing after them exists: the window is cut after the
        position and its coarse block filled up with one fixed token. Dense attention gives the
        full-sequence loss again; a gap under Lighthouse is what its selection, a top-k over blocks
        that reach past the position, lets later tokens tell earlier ones."""
        full, blind = [], []
        for window, position, length in self.probes.blind:
            pad = length - position - 1
            ids = self.windows[window, : position + 1]
            ids = torch.cat([ids, ids.new_full((pad,), self.probes.filler)])
            with self._autocast():
                logits = model(input_ids=ids[None], logits_to_keep=pad + 1).logits[0, 0].float()
            blind.append(F.cross_entropy(logits[None], self.windows[window, position + 1 : position + 2]).item())
            full.append(losses[window, position].item())
        return dict(positions=len(full), loss_full=float(np.mean(full)), loss_blind=float(np.mean(blind)))

    def loss(self, model) -> float:
        return self.token_losses(model).mean().item()

    def final(self, model) -> dict:
        losses = self.token_losses(model)
        seq_len = self.windows.shape[1]
        by_document = {}
        for name in dict.fromkeys(self.names):
            rows = [i for i, n in enumerate(self.names) if n == name]
            by_document[name] = losses[rows].mean().item()
        # Bucket edges by position of the predicted token: the first 1K, ..., the last quarter (8K at 32K).
        edges = sorted({1, seq_len // 32, seq_len // 8, seq_len // 4, seq_len // 2, 3 * seq_len // 4, seq_len})
        buckets = [
            dict(first=low, last=high - 1, loss=losses[:, low - 1 : high - 1].mean().item())
            for low, high in zip(edges, edges[1:])
        ]
        # Loss by the predicting position's offset inside its coarse block: Lighthouse refines
        # whole blocks, chosen by the largest norm anywhere in them, so an early offset can hear of
        # later tokens of its block (the one it predicts among them).
        offsets = torch.arange(seq_len - 1) % self.probes.block
        by_block_offset = [losses[:, offsets == o].mean().item() for o in range(self.probes.block)]
        copies = self.copying(model)
        copy_by_depth = []
        for depth_bin in range(PROBE_DEPTH_BINS):
            group = [c for c in copies if int(c["depth"] * PROBE_DEPTH_BINS) == depth_bin]
            copy_by_depth.append(dict(bin=depth_bin, accuracy=float(np.mean([c["with_source"]["accuracy"] for c in group]))))
        probes = self.retrieval(model)
        by_depth = []
        for depth_bin in range(PROBE_DEPTH_BINS):
            group = [p for p in probes if int(p["depth"] * PROBE_DEPTH_BINS) == depth_bin]
            if group:
                by_depth.append(dict(bin=depth_bin, probes=len(group), exact=sum(p["exact"] for p in group) / len(group)))
        return dict(
            loss=losses.mean().item(),
            by_document=by_document,
            by_position=buckets,
            retrieval=dict(
                exact_match=sum(p["exact"] for p in probes) / len(probes),
                digit_accuracy=sum(p["digits_correct"] for p in probes) / (5 * len(probes)),
                by_depth=by_depth,
                probes=probes,
            ),
            copy=dict(
                accuracy=float(np.mean([c["with_source"]["accuracy"] for c in copies])),
                control_accuracy=float(np.mean([c["control"]["accuracy"] for c in copies])),
                exact_match=float(np.mean([c["with_source"]["accuracy"] == 1.0 for c in copies])),
                loss=float(np.mean([c["with_source"]["loss"] for c in copies])),
                control_loss=float(np.mean([c["control"]["loss"] for c in copies])),
                by_depth=copy_by_depth,
                probes=copies,
            ),
            by_block_offset=by_block_offset,
            future_blind=self.future_blind(model, losses),
        )


# ---------------------------------------------------------------------------------------------
# Training


class StudyLog(TrainerCallback):
    """Times every optimizer step between synchronizations, evaluates on a schedule with the
    clock stopped, and rewrites the arm's JSON after each evaluation."""

    def __init__(self, record: dict, path: Path, evaluator: Evaluator, eval_steps: set[int], tokens_per_step: int, lighthouse_eval: bool) -> None:
        self.record, self.path, self.evaluator = record, path, evaluator
        self.eval_steps, self.tokens_per_step, self.lighthouse_eval = eval_steps, tokens_per_step, lighthouse_eval
        self.gpu_seconds = 0.0
        self.eval_seconds = 0.0

    def evaluate(self, model, step: int) -> None:
        synchronize()
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        entry = dict(step=step, tokens=step * self.tokens_per_step, gpu_seconds=self.gpu_seconds)
        entry["phase"] = "lighthouse" if uses_lighthouse(model) else "dense"
        entry.update(self.measure(model, entry))
        model.train(was_training)
        synchronize()
        self.eval_seconds += time.perf_counter() - started
        self.record["evals"].append(entry)
        self.record["eval_seconds"] = self.eval_seconds
        self.save()
        extra = f", with Lighthouse {entry['loss_lighthouse']:.4f}" if "loss_lighthouse" in entry else ""
        print(f"eval step {step}: held-out loss {entry['loss']:.4f} (dense){extra}, GPU {self.gpu_seconds:.1f} s", flush=True)

    def measure(self, model, entry: dict) -> dict:
        """One evaluation's results (the model in eval mode, the step clock stopped); ``entry`` holds
        its step and phase."""
        with attention(model, "sdpa"):
            out = dict(loss=self.evaluator.loss(model))
        if self.lighthouse_eval:
            with attention(model, lighthouse_hf.ATTN_IMPLEMENTATION):
                out["loss_lighthouse"] = self.evaluator.loss(model)
        return out

    def save(self) -> None:
        """Rewrites the arm's JSON whole: a run cut short (a call's time limit) keeps its last
        evaluation, never half a file."""
        self.record["gpu_seconds"] = self.gpu_seconds
        staging = self.path.with_name(self.path.name + ".partial")
        staging.write_text(json.dumps(self.record, indent=1))
        os.replace(staging, self.path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.evaluate(model, 0)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.phase = "lighthouse" if uses_lighthouse(model) else "dense"
        synchronize()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        synchronize()
        seconds = time.perf_counter() - self.started
        self.gpu_seconds += seconds
        self.record["steps"].append(dict(step=state.global_step, phase=self.phase, seconds=seconds))
        if state.global_step in self.eval_steps:
            self.evaluate(model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.record["steps"] and self.record["steps"][-1]["step"] == state.global_step:
            self.record["steps"][-1]["loss"] = logs["loss"]


def model_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def warm_up(model, ids: torch.Tensor, implementations: list[str], bf16: bool, loss: Callable = model_loss) -> None:
    """One untimed forward and backward (``loss(model, ids[None])``) per attention the arm will use,
    so kernel compilation and cuDNN plan building stay out of the step clock; no optimizer step,
    gradients dropped."""
    device = next(model.parameters()).device
    for implementation in implementations:
        with attention(model, implementation), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss(model, ids[None].to(device)).backward()
    model.zero_grad(set_to_none=True)
    synchronize()


def training_arguments(output_dir: str, args: argparse.Namespace, device: str, bf16: bool, **run: object) -> TrainingArguments:
    """What every study run trains with (AdamW with weight decay 0.1 and beta2 0.95, clipping at 1,
    ``args``' steps, learning rate, warm-up, seed and checkpointing, a log line per step, no saved
    checkpoints); ``run``: the batch and the schedule."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        bf16=bf16,
        use_cpu=device == "cpu",
        **activation_checkpointing(args.checkpointing),
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=device == "cuda",
        seed=args.seed,
        **run,
    )


def json_arguments(args: argparse.Namespace) -> dict:
    """The command's arguments as JSON values (paths, and lists of them, as strings)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        return [plain(v) for v in value] if isinstance(value, list) else value

    return {key: plain(value) for key, value in vars(args).items()}


def run_description(args: argparse.Namespace, model, blocks: np.ndarray, windows: np.ndarray, names: list[str], device: str) -> dict:
    """What every result file says about its run: the arguments, the machine, the model's size and the data."""
    return dict(
        settings=json_arguments(args),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__),
        parameters=dict(total=sum(p.numel() for p in model.parameters()), non_embedding=non_embedding_parameters(model)),
        data=dict(train_blocks=len(blocks), train_tokens=int(blocks.size), heldout_windows=len(windows), heldout_documents=sorted(set(names))),
    )


def phase_summary(steps: list[dict], tokens_per_step: int) -> dict:
    out = {}
    for phase in ("lighthouse", "dense"):
        timed = [s["seconds"] for s in steps if s["phase"] == phase]
        if timed:
            seconds = sum(timed)
            out[phase] = dict(
                steps=len(timed),
                gpu_seconds=seconds,
                tokens_per_s=len(timed) * tokens_per_step / seconds,
                median_step_seconds=float(np.median(timed)),
            )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by prepare_data.py")
    parser.add_argument("--arm", choices=ARMS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=8e-4)
    parser.add_argument("--warmup", type=int, default=45, help="warm-up steps")
    parser.add_argument("--recovery", type=float, default=0.75, help="share of the steps run with Lighthouse in arm 'recovery'")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--pooling", type=int, default=4)
    parser.add_argument("--topk", type=int, default=512)
    parser.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1, -2, -1])
    parser.add_argument("--passkey-rate", type=float, default=0.05, help="share of training sequences carrying a pass key")
    parser.add_argument("--probes-per-bin", type=int, default=16, help=f"retrieval probes per depth bin ({PROBE_DEPTH_BINS} bins)")
    parser.add_argument("--copy-length", type=int, default=32, help="tokens of the copied passage")
    parser.add_argument("--blind-per-window", type=int, default=6, help="future-blind positions per held-out window")
    parser.add_argument("--evals", type=int, default=18, help="held-out evaluations during training (plus one at step 0)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = Corpus.load(args.data)
    passkey = PassKey(corpus.meta["passkey"])
    blocks = corpus.train_blocks(args.seq_len)
    windows, names = corpus.heldout_windows(args.seq_len)
    block = args.pooling ** (args.levels - 1)
    probes = Probes(
        passkey=retrieval_probes(windows, passkey, args.seed, args.probes_per_bin),
        copies=copy_probes(windows, args.seed, max(1, args.probes_per_bin // 2), args.copy_length),
        copy_length=args.copy_length,
        blind=future_blind_positions(windows, args.seed, args.blind_per_window, block),
        block=block,
        filler=corpus.meta["eos_token_id"],
    )
    evaluator = Evaluator(windows, names, passkey, probes, args.bf16, device)

    eos = corpus.meta["eos_token_id"]
    model = build_model(corpus.meta["vocab_size"], args.seq_len, eos, args.seed, args.hidden, args.layers, args.heads, args.intermediate)
    settings = dict(levels=args.levels, pooling=args.pooling, topk=args.topk, dense_layers=args.dense_layers)
    compressed = lighthouse_hf.compressed_length(args.seq_len, levels=args.levels, pooling=args.pooling, topk=args.topk)
    model.to(device)
    implementations = ["sdpa"]
    if args.arm != "dense":
        lighthouse_hf.apply_lighthouse(model, **settings)
        implementations = [lighthouse_hf.ATTN_IMPLEMENTATION] + (["sdpa"] if args.arm == "recovery" else [])
    warm_up(model, torch.from_numpy(blocks[0]), implementations, args.bf16)

    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    eval_steps = {max(1, round(args.steps * (i + 1) / args.evals)) for i in range(args.evals)}
    callbacks = []
    recovery = None
    if args.arm == "recovery":
        recovery = lighthouse_hf.RecoveryCallback(at=args.recovery)
        eval_steps.add(recovery.resolve(args.steps))
        callbacks.append(recovery)
    args.out.mkdir(parents=True, exist_ok=True)
    record = dict(
        arm=args.arm,
        lighthouse=settings,
        compressed_length=compressed,
        **run_description(args, model, blocks, windows, names, device),
        tokens_per_step=tokens_per_step,
        steps=[],
        evals=[],
    )
    log = StudyLog(record, args.out / f"{args.arm}.json", evaluator, eval_steps, tokens_per_step, lighthouse_eval=args.arm == "lighthouse")
    callbacks.insert(0, log)  # first: its clock stops before any other callback's work

    with tempfile.TemporaryDirectory() as trainer_dir:
        training_args = training_arguments(
            trainer_dir,
            args,
            device,
            args.bf16,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
        )
        stream = TrainStream(blocks, passkey, args.seed, args.passkey_rate)
        trainer = Trainer(model=model, args=training_args, train_dataset=stream, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # a line per step; the evaluations print instead
        train_started = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - train_started

    synchronize()
    final_started = time.perf_counter()
    model.eval()
    with attention(model, "sdpa"):
        record["final"] = evaluator.final(model)
    if args.arm == "lighthouse":
        with attention(model, lighthouse_hf.ATTN_IMPLEMENTATION):
            record["final_lighthouse"] = evaluator.final(model)
    synchronize()
    record["final_eval_seconds"] = time.perf_counter() - final_started
    record["train_wall_seconds"] = train_wall
    record["recovery_step"] = recovery.recovery_step if recovery else None
    record["phases"] = phase_summary(record["steps"], tokens_per_step)
    record["wall_seconds"] = time.perf_counter() - started
    if torch.cuda.is_available():
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log.save()
    final = record["final"]
    print(
        f"{args.arm}: GPU {log.gpu_seconds:.1f} s, eval {log.eval_seconds + record['final_eval_seconds']:.1f} s, "
        f"held-out loss {final['loss']:.4f}, pass key {final['retrieval']['exact_match']:.3f}",
        flush=True,
    )
    for phase, summary in record["phases"].items():
        print(f"  {phase}: {summary['steps']} steps, {summary['tokens_per_s']:,.0f} tokens/s", flush=True)
    return record


if __name__ == "__main__":
    main()
