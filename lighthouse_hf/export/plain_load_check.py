"""Load an exported checkpoint with plain Transformers, in a process where lighthouse_hf cannot be imported.

``lighthouse-hf export`` (verify.py) runs this file as a script (``python -I plain_load_check.py MODEL_DIR IO_DIR
THREADS``) so that the check proves what a user without lighthouse-hf sees. It must not import
anything from lighthouse_hf. It reads the probe token ids from ``IO_DIR/probe.pt`` and writes the
logits to ``IO_DIR/logits.pt`` and what it found to ``IO_DIR/result.json``.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

BLOCKED_PACKAGE = "lighthouse_hf"


class _BlockPackage(importlib.abc.MetaPathFinder):
    """Makes every import of lighthouse_hf fail, whatever sys.path or an editable install offers."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == BLOCKED_PACKAGE:
            raise ModuleNotFoundError(f"{fullname} is blocked in this check", name=fullname)
        return None


def _assert_blocked() -> None:
    try:
        __import__(BLOCKED_PACKAGE)
    except ImportError:
        return
    raise SystemExit(f"{BLOCKED_PACKAGE} is importable although it was blocked")


def main(model_dir: str, io_dir: str, threads: str) -> None:
    sys.meta_path.insert(0, _BlockPackage())
    _assert_blocked()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # The source logits were computed with this many threads; CPU reductions depend on it.
    torch.set_num_threads(int(threads))
    io = Path(io_dir)
    model, loading_info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    model.eval()
    probe = torch.load(io / "probe.pt", weights_only=True)
    with torch.inference_mode():
        logits = model(probe).logits
    torch.save(logits, io / "logits.pt")
    result = {
        "transformers_version": transformers.__version__,
        "model_class": type(model).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        # Transformers has no public reader of the implementation a loaded model resolved to.
        "attn_implementation": model.config._attn_implementation,
        "loading_problems": {
            key: sorted(str(item) for item in loading_info.get(key, ()))
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        },
        "config_has_lighthouse": hasattr(model.config, "lighthouse"),
        "lighthouse_registered": "lighthouse" in ALL_ATTENTION_FUNCTIONS.valid_keys(),
        "lighthouse_modules": sorted(name for name in sys.modules if name.split(".")[0] == BLOCKED_PACKAGE),
    }
    (io / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
