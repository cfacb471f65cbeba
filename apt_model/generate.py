"""Print a continuation of a prompt from a trained run or checkpoint: proof the model is real.

``python -m apt_model.generate outputs/run1 --prompt "The model"``
"""

from __future__ import annotations

import click
import torch

from aptbundle.commands.exits import CONTEXT, Command


def generate_text(path: str, prompt: str, max_new_tokens: int = 120, temperature: float = 0.8,
                  seed: int = 0, which: str = "best", device: str = "cpu") -> str:
    """The prompt followed by ``max_new_tokens`` sampled characters.

    >>> # generate_text("outputs/run1", "The ")
    """
    from apt_model.training.checkpoint import load_model

    model, tok, _ = load_model(path, which=which, device=device)
    ids = tok.encode(prompt) or [tok.vocab["<bos>"]]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(x, max_new_tokens, temperature=temperature, generator=g)
    return prompt + tok.decode(out[0, len(ids):].tolist())


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--prompt", default="The ", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=120, show_default=True, help="Characters to sample.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Sampling temperature.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--which", default="best", show_default=True, help="best, latest or a checkpoint name (for a run folder).")
def main(path: str, prompt: str, max_new_tokens: int, temperature: float, seed: int, which: str) -> None:
    """Continue PROMPT with the model of a run folder or a checkpoint folder inside one."""
    click.echo(generate_text(path, prompt, max_new_tokens, temperature, seed, which))


if __name__ == "__main__":
    main()
