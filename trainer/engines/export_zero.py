"""Export a plain fp32 `state_dict` from a DeepSpeed ZeRO checkpoint (any stage, any process count).

    python -m trainer.engines.export_zero runs/<run>/<stage>/checkpoints out.pt [--tag step-000000123]

It is DeepSpeed's own consolidation (`deepspeed.utils.zero_to_fp32`), written
as one torch file: the `zero_to_fp32.py` script DeepSpeed copies next to its
checkpoints does the same but always shards its output through
`huggingface_hub`, which this project does not install.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def export(checkpoints: Path, out: Path, tag: str | None = None) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    state = {k: v.contiguous() for k, v in state.items()}  # fresh tensors, not views into shared buffers
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, help="a stage's checkpoints/ directory (holds `latest`)")
    parser.add_argument("out", type=Path, help="the .pt file to write")
    parser.add_argument("--tag", help="a step-<N> directory instead of the one `latest` names")
    args = parser.parse_args(argv)
    if not (args.checkpoints / "latest").exists() and args.tag is None:
        parser.error(f"{args.checkpoints} has no `latest` file: is it a DeepSpeed checkpoints directory?")
    state = export(args.checkpoints, args.out, args.tag)
    print(f"wrote {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
