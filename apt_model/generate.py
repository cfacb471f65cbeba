"""Print a continuation of a prompt from a trained run or checkpoint: proof the model is real.

``python -m apt_model.generate outputs/run1 --prompt "The model"``
"""

from __future__ import annotations

import argparse
import sys

import torch

from aptbundle.errors import AptBundleError


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apt_model.generate", description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run folder or a checkpoint folder inside one")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--which", default="best", help="best, latest or a checkpoint name (for a run folder)")
    args = p.parse_args(argv)
    try:
        print(generate_text(args.path, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.which))
    except (AptBundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
