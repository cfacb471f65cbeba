"""Print a continuation of a prompt from a trained run or checkpoint: proof the model is real.

``python -m apt_model.generate outputs/run1 --prompt "The model"``

The text goes to stdout; a line saying which run, checkpoint and settings produced it, and a
progress bar, go to stderr.
"""

from __future__ import annotations

import click
import torch

from aptbundle import CONTEXT, Command, progress


def generate_text(path: str, prompt: str, max_new_tokens: int = 120, temperature: float = 0.8,
                  seed: int = 0, which: str = "best", device: str = "cpu", progress_bar=None) -> str:
    """The prompt followed by ``max_new_tokens`` sampled characters.

    For example::

        generate_text("outputs/run1", "The ")
    """
    from apt_model.training.checkpoint import load_model

    model, tok, _ = load_model(path, which=which, device=device)
    ids = tok.encode(prompt) or [tok.vocab["<bos>"]]
    x = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(x, max_new_tokens, temperature=temperature, generator=g, progress=progress_bar)
    return prompt + tok.decode(out[0, len(ids):].tolist())


@click.command(cls=Command, context_settings=CONTEXT)
@click.argument("path", type=click.Path())
@click.option("--prompt", default="The ", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=120, show_default=True,
              help="Characters to sample.")
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.8, show_default=True,
              help="Sampling temperature (lower: more predictable).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed of the sampler.")
@click.option("--which", default="best", show_default=True, help="best, latest or a checkpoint name (for a run folder).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to run the model (auto: a GPU if there is one).")
@click.option("--quiet", "-q", is_flag=True, help="Only the text: no label, no progress bar.")
def main(path: str, prompt: str, max_new_tokens: int, temperature: float, seed: int, which: str, device: str,
         quiet: bool) -> None:
    """Continue PROMPT with the model of a run folder or a checkpoint folder inside one."""
    from apt_model.training.setup import pick_device

    dev = pick_device(device).type
    if not quiet:
        click.echo(f"{path} ({which} checkpoint), temperature {temperature}, seed {seed}, on {dev}:", err=True)
    with progress("sampling", quiet, max_new_tokens) as bar:
        text = generate_text(path, prompt, max_new_tokens, temperature, seed, which, dev, bar)
    click.echo(text)


if __name__ == "__main__":
    main()
