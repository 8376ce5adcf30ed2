"""Shared fixtures: a tiny random LLaMA with a locally built tokenizer, and the shared data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before torch loads. Tests share the 2 cores with other work (a benchmark, a second test
# process), and then libgomp's spinning workers starve the main thread during thousands of
# tiny ops (tests/test_gptq.py: 36 s spinning, 4 s passive). The library keeps torch's default:
# on an idle machine spinning is faster (GPTQ of one default-model block: 1.1 s vs 3.7 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Kernel timings measured under the test load stay out of the user's cache (quikft.nn.autotune).
os.environ.setdefault("QUIKFT_KERNEL_TIMINGS", os.path.join(tempfile.mkdtemp(prefix="quikft-timings-"), "t.json"))
# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton loads.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests find the shared datasets through QUIKFT_DATA, as the product does.
if "QUIKFT_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["QUIKFT_DATA"] = str(SHARED_DATA)

TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights to a small set of levels.",
    "Salient columns stay in half precision while the rest use three bits.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "Robert Boulter is an English film, television and theatre actor.",
    "Instruction: name a colour. Response: blue.",
] * 20


def build_tokenizer():
    """A byte-level BPE tokenizer trained in memory (no hub access), with chat-free specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 160):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def read_weights(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, from one file or all of its shards."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("model*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA + tokenizer directory, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_dir):
    """``(model, tokenizer)`` of the tiny LLaMA, fresh for each test."""
    from quikft.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """Training data for recovery: a plain-text file and an alpaca-style instruction file."""
    import json

    root = tmp_path_factory.mktemp("recover-data")
    text = root / "corpus.txt"
    text.write_text("\n".join(TOKENIZER_CORPUS * 4) + "\n")
    records = [{"instruction": f"Name colour number {i}.", "input": "", "output": "Blue is a colour."}
               for i in range(40)]
    instructions = root / "instructions.jsonl"
    instructions.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return {"text": str(text), "instructions": str(instructions)}


@pytest.fixture(scope="session")
def packed(tmp_path_factory, tiny_dir, corpus) -> Path:
    """A packed 3-bit checkpoint of the tiny model (8 salient columns per linear); do not modify it."""
    from quikft.checkpoint import save_packed
    from quikft.config import QuantConfig
    from quikft.data import calibration_windows
    from quikft.models import load_model
    from quikft.quant.model import quantize_model

    model, tokenizer = load_model(str(tiny_dir))
    config = QuantConfig(bits=3, salient=8, group_size=32, nsamples=4, seqlen=32, clip_search=False)
    calib = calibration_windows(tokenizer, corpus["text"], 4, 32, 0)
    quantized = quantize_model(model, calib, config, progress=False)
    return save_packed(model, tokenizer, quantized, tmp_path_factory.mktemp("packed") / "w3", config,
                       source_model=str(tiny_dir))


def random_quik(out_features=24, in_features=40, k=6, bits=3, seed=0, bias=False):
    """A small RTN-quantized QuikLinear of a random weight (k random salient columns, groups of 16)."""
    import dataclasses

    from quikft.nn import QuikLinear
    from quikft.quant.gptq import rtn_quantize
    from quikft.quant.grid import round_to_fp16
    from quikft.quant.scheme import QuantScheme

    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    salient = torch.sort(torch.randperm(in_features)[:k]).values
    r = rtn_quantize(weight, salient, QuantScheme(bits, group_size=16, sym=False, clip_search=False))
    r = dataclasses.replace(r, salient_weight=round_to_fp16(r.salient_weight))
    return QuikLinear.from_quantized(r, torch.randn(out_features) if bias else None, kernel="torch")


def recover_config(model, corpus: dict[str, str], out: Path, **changes):
    """A few-second recovery of the tiny model (fp32, no evaluation)."""
    from quikft.recovery import RecoverConfig

    settings = dict(model=str(model), data=(corpus["instructions"], corpus["text"]), steps=4, batch_size=2,
                    seqlen=32, lr=1e-3, eval_windows=0, bf16=False, out=str(out))
    settings.update(changes)
    return RecoverConfig(**settings)


@pytest.fixture(scope="module")
def tokenizer():
    """The in-memory BPE tokenizer alone (model-family tests build their own models)."""
    return build_tokenizer()


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    """A text file for calibration, training and evaluation of the family tests."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(TOKENIZER_CORPUS * 4) + "\n")
    return path


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A small plain-text corpus of a few thousand tokens for the tiny model."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TOKENIZER_CORPUS * 3) + "\n")
    return path


@pytest.fixture()
def single_thread():
    """Run a test on one intra-op thread, then restore the setting: tests that issue thousands
    of tiny ops are several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = os.environ.get("QUIKFT_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("QUIKFT_DATA is not set and ../shared/data does not exist")
    return Path(root)


def accelerate_launch(processes: int, *target: str) -> list[str]:
    """`accelerate launch` of ``target`` on ``processes`` CPU processes (a gloo group), on a free port.

    `--multi_gpu` is accelerate's multi-process launcher; with --device cpu the processes form a gloo
    group (`accelerate launch --cpu` would start one process). The rendezvous port is a free one, not
    the default 29500, which a launch still shutting down (or another job) may hold.
    """
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no", *target]


def launch_errors(stderr: str, chars: int = 3000) -> str:
    """The ranks' own output before the launcher's summary (which only names the signal), for assert messages."""
    launcher = stderr.find("Traceback (most recent call last):\n  File")
    if launcher <= 0:
        return stderr[-chars:]
    return f"{stderr[:launcher][-chars:]}\n--- launcher ---\n{stderr[launcher:][-1000:]}"


@pytest.fixture
def exact_kernels(monkeypatch):
    """Loads run the exact reference kernel on every layer: tests of the format and of the families compare a
    loaded model with the fake-quant one at 1e-4, which the measured choice (bf16 or int8 activations in the
    quantized part, see quikft.nn.autotune) does not promise. Subprocesses inherit it."""
    monkeypatch.setenv("QUIKFT_KERNEL", "torch")
