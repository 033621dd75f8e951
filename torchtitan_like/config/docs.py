"""Render the config reference (docs/config.md) from the dataclasses' field metadata.

`python -m torchtitan_like.config.docs > docs/config.md`; a test keeps the file in sync.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields

from torchtitan_like.config.job_config import SECTIONS
from torchtitan_like.config.manager import format_bound

HEADER = """# Configuration reference

A run is described by a TOML file (`--config FILE`) plus command-line overrides
(`--section.key value` or `--section.key=value`; a bare `--section.flag` means true). Precedence:
command line > TOML > defaults. `--print-config` prints the resolved config and exits; every run saves
it as `config.toml` in `job.dump_folder`. Mistakes (unknown section or key, wrong type, value out of
range, inconsistent values; any integer beyond 64 bits) stop the run before any distributed setup
with exit code 2 and one message naming the file, the key and what is allowed. `run_train.sh` and
`multinode_trainer.slurm` run these checks once, in one process, before torchrun (`--check-config`,
see docs/operations.md), so they too print the message once and exit 2. Under torchrun without them
(`SKIP_CONFIG_CHECK=1`, or a mistake only the ranks' own devices reveal) every rank prints it and
exits 2, and torchrun then exits 1 after its own failure report.

## Differences from TorchTitan's TOML
- `[quantize.linear.float8]` (TorchTitan 0.2) is read as `[float8]`; `model.converters = ["float8"]`
  and `float8.enable = true` both turn Float8 on. `float8.backend` and `float8.save_fp8_weight` are ours.
- `[experimental]`, `[fault_tolerance]`, `[memory_estimation]`, `[mx]` and TorchTitan's other `[quantize.*]` tables
  (`linear.mx`, `grouped_mm.float8`, `grouped_mm.mx`) are accepted and ignored with a warning.
- `training.dataset` names a kind of source (`builtin`, `local`, `tokenized`, `huggingface`) rather than a
  registered dataset such as `c4`; point `training.dataset_path` at the files (a TorchTitan
  `c4_test` folder loads as `dataset = "local"`, `dataset_path = ".../c4_test"`).
- `model.tokenizer` chooses the tokenizer kind (`auto` detects it from `hf_assets_path`);
  `model.vocab_size` may pad the vocabulary; `model.norm_type` selects the Triton RMSNorm.
- `lr_scheduler.decay_type` adds `constant` and defaults to `cosine` (TorchTitan: `linear`); `decay_ratio = -1`
  decays over all steps after warmup.
- `metrics.peak_flops` overrides the device peak used for MFU; `training.device` forces cpu or cuda.
- `validation.dataset` uses the same source kinds; `builtin` is the built-in corpus's held-out split.
- `activation_checkpoint.mode` defaults to `none` (TorchTitan: `selective`).

"""


def _default(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        value = ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _constraints(f) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices"):
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    for key, text in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{text} {format_bound(meta[key])}")
    return "; ".join(parts)


def render() -> str:
    lines = [HEADER]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        lines.append(f"## [{section}]\n")
        lines.append("| key | type | default | allowed | meaning |")
        lines.append("|---|---|---|---|---|")
        for f in fields(cls):
            kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"| `{f.name}` | {kind} | `{_default(f)}` | {_constraints(f)} | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
