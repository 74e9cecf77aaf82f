"""`python -m train.consolidate CHECKPOINT_DIR OUT_DIR [--dtype bfloat16] [--include-vggt]`: a sharded ZeRO-2 or -3
checkpoint (`checkpoint-N/` with `latest` and `global_stepN/`) → a Hugging Face model folder: Qwen2.5-VL's
`config.json` and weights under Qwen's own names (so `Qwen2_5_VLForConditionalGeneration.from_pretrained`
loads them), plus `vggt_merger.*` / `action_head.*` and `janus_config.json`; `load_consolidated` rebuilds JanusVLN.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from schemas.errors import SchemaError

logger = logging.getLogger(__name__)

QWEN_PREFIX = "qwen."
VGGT_PREFIX = "vggt."
CONFIG_FILES = ("config.json", "janus_config.json")


def hf_state_dict(state: dict[str, Tensor], include_vggt: bool = False) -> dict[str, Tensor]:
    """JanusVLN names → folder names: `qwen.` dropped (Qwen's own names); the frozen VGGT aggregator (a copy
    of its input checkpoint) only with `include_vggt`."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(VGGT_PREFIX) and not include_vggt:
            continue
        out[name.removeprefix(QWEN_PREFIX)] = tensor
    return out


def consolidate(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                include_vggt: bool = False, max_shard_size: str = "5GB") -> dict[str, Tensor]:
    """Gather the fp32 master weights of every rank's ZeRO shard (deepspeed's zero_to_fp32, on CPU: needs ~2×
    the fp32 model in RAM), write the folder, and return the written state dict."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from huggingface_hub import save_torch_state_dict

    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    missing = [name for name in ("latest", *CONFIG_FILES) if not (checkpoint_dir / name).is_file()]
    if missing:
        raise SchemaError(str(checkpoint_dir), ", ".join(missing), "a ZeRO checkpoint written by JanusTrainer "
                          "(latest, config.json, janus_config.json)", "missing")
    tag = (checkpoint_dir / "latest").read_text().strip()
    if not (checkpoint_dir / tag).is_dir():
        raise SchemaError(str(checkpoint_dir), "latest", f"the folder it names ({tag}/, the ZeRO shards)", "missing")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    # ZeRO-2 checkpoints give frozen parameters as views into larger buffers, which safetensors refuses to write
    state = {name: tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
             for name, tensor in hf_state_dict(state, include_vggt).items()}
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copyfile(checkpoint_dir / name, out_dir / name)
    save_torch_state_dict(state, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
    logger.info("consolidated %s → %s: %d tensors, %.1f M parameters", checkpoint_dir, out_dir, len(state),
                sum(t.numel() for t in state.values()) / 1e6)
    return state


def load_consolidated(folder: str | Path, vggt_checkpoint: str | Path | None = None,
                      dtype: torch.dtype = torch.float32):
    """JanusVLN from a consolidated folder; VGGT from the folder's `vggt.*` weights, else from `vggt_checkpoint`."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from train.model import JanusConfig, JanusVLN
    from train.vggt import VGGTAggregator, VGGTConfig, load_aggregator

    folder = Path(folder)
    saved = json.loads((folder / "janus_config.json").read_text())
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
    extra: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        extra.update({k: v for k, v in load_file(str(path)).items() if not k.startswith(("model.", "lm_head."))})
    vggt = None
    if any(k.startswith(VGGT_PREFIX) for k in extra) and saved.get("vggt_config"):
        vggt = VGGTAggregator(VGGTConfig(**saved["vggt_config"])).to(dtype)
    elif vggt_checkpoint:
        vggt = load_aggregator(vggt_checkpoint, dtype=dtype)
    model = JanusVLN(qwen, JanusConfig(**saved["janus"]), vggt)
    result = model.load_state_dict(extra, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(QWEN_PREFIX)
               and not (k.startswith(VGGT_PREFIX) and vggt_checkpoint)]
    if result.unexpected_keys or missing:
        raise SchemaError(str(folder), "weights", "exactly the Qwen2.5-VL, vggt_merger, action_head (and vggt) "
                          "tensors of the model", f"unexpected {result.unexpected_keys[:5]}, missing {missing[:5]}")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="checkpoint-N folder (holds `latest` and global_stepN/)")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--include-vggt", action="store_true", help="also write the frozen VGGT aggregator")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        consolidate(args.checkpoint_dir, args.out_dir, getattr(torch, args.dtype), args.include_vggt,
                    args.max_shard_size)
    except SchemaError as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
