"""`fedtrain model`: open base models in the form every party loads and pins."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fedtrain.console import console

app = typer.Typer(help="Open base models: import them as the Hugging Face directory jobs pin.", no_args_is_help=True)


@app.command("import-gguf")
def import_gguf_command(
    file: Path = typer.Argument(..., metavar="FILE.gguf", help="A GGUF checkpoint (llama.cpp's format)."),
    out: Path = typer.Option(..., "--out", help="New directory for the Hugging Face model (safetensors, tokenizer)."),
    as_json: bool = typer.Option(False, "--json", help="Print {path, sha256} as one JSON object."),
) -> None:
    """Dequantise FILE to float32 and save it with its tokenizer; print the weights' sha256,
    which a job names as model.sha256 and every node checks."""
    from fedtrain.models.gguf import import_gguf
    from fedtrain.models.transformer import weights_digest

    if as_json:
        import_gguf(file, out)
    else:
        with console.status(f"converting {file.name} (tens of seconds for a small model)"):
            import_gguf(file, out)
    digest = weights_digest(out)
    if as_json:
        typer.echo(json.dumps({"path": str(out.resolve()), "sha256": digest}))
        return
    console.print(f"written: {out}\nIn a job spec:\n  model:\n    kind: transformer\n    base: {out.resolve()}\n"
                  f"    sha256: {digest}")


def generate_command(
    model_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="`job export` output (adapter, or its merged/"
                                     " directory) or any Hugging Face causal LM directory."),
    prompts: list[str] = typer.Option(..., "--prompt", help="A user message; repeat for several."),
    system: str = typer.Option(None, help="A system message before each prompt."),
    max_new_tokens: int = typer.Option(64, min=1, max=4096),
) -> None:
    """Answer each prompt with greedy generation, rendered with the model's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtrain.errors import FedtrainError
    from fedtrain.models.transformer import chat_prompt

    common = {"local_files_only": True, "trust_remote_code": False}
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise FedtrainError(f"{model_dir} holds neither a model (config.json) nor an adapter (adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **common)
    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM  # the adapter names its base on this disk

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **common)
    model.eval()
    for prompt in prompts:
        ids = tokenizer(chat_prompt(tokenizer, prompt, system), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        console.print(f"[bold]{prompt}[/bold]\n{answer}")
