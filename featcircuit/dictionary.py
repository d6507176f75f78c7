"""The sparse dictionary (SAE / transcoder-style autoencoder) and its on-disk format.

A dictionary maps an activation ``x [..., d_in]`` to codes ``[..., d_sae]`` and back:

    pre   = (x - b_dec) @ W_enc + b_enc       (SAELens / sparsify convention)
    codes = topk | relu | batchtopk of pre
    recon = codes @ W_dec + b_dec

On disk a dictionary is a folder with ``cfg.json`` and ``sae_weights.safetensors`` holding
exactly ``W_enc, W_dec, b_enc, b_dec`` (+ ``threshold`` for batchtopk), with SAELens's tensor
names and shapes and its top-level cfg keys, so SAELens-style code can use the weights.
A *pair* is a folder with ``resid/`` and ``mlp/`` dictionaries for one layer.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from featcircuit.errors import UserError
from featcircuit.io import atomic_save_safetensors, atomic_write_text, strict_json

ARCHITECTURES = ("topk", "relu", "batchtopk")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}
_FIELD_KIND = {"d_in": int, "d_sae": int, "architecture": str, "k": int, "hook_name": str,
               "model_name": str, "layer": int, "site": str, "dtype": str, "training_tokens": int,
               "metrics": dict, "l1_coefficient": float}


def _one_line(msg: str) -> UserError:
    # The CLI prints UserErrors as one line; a newline inside a path or a parser message
    # would break that contract.
    return UserError(" ".join(msg.splitlines()))


@dataclass
class DictConfig:
    """Shape, architecture and provenance of one dictionary; stored as ``cfg.json``."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    hook_name: str = ""
    model_name: str = ""
    layer: int = -1
    site: str = ""
    dtype: str = "float32"
    training_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    l1_coefficient: float = 0.0

    def __post_init__(self) -> None:
        for name, kind in _FIELD_KIND.items():
            v = getattr(self, name)
            # bool is an int subclass; `"k": true` in a cfg is a mistake, not k=1.
            ok = isinstance(v, (int, float) if kind is float else kind) and not isinstance(v, bool)
            if not ok:
                raise _one_line(f"cfg field {name!r} is {v!r} ({type(v).__name__}), "
                                f"expected {kind.__name__}")
            if kind is float and not abs(v) < float("inf"):  # also catches NaN
                raise _one_line(f"cfg field {name!r} is {v!r}, expected a finite number")
        if self.architecture not in ARCHITECTURES:
            raise _one_line(f"unknown architecture {self.architecture!r}: expected one of "
                            f"{', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae", "k"):
            if getattr(self, name) < 1:
                raise _one_line(f"cfg field {name!r} is {getattr(self, name)}, expected >= 1")
        if self.architecture != "relu" and self.k > self.d_sae:
            raise _one_line(f"k={self.k} exceeds d_sae={self.d_sae}: expected k <= d_sae")
        if self.dtype not in _DTYPES:
            raise _one_line(f"unknown dtype {self.dtype!r}: expected one of {', '.join(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready flat dict (SAELens-compatible top-level keys)."""
        d = dataclasses.asdict(self)
        # Tell SAELens-style readers the encoder convention and that no input scaling remains
        # (fold_input_scale bakes it into the weights).
        d.update(apply_b_dec_to_input=True, normalize_activations="none",
                 format_version=FORMAT_VERSION)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DictConfig:
        """Build from a JSON dict; unknown keys are ignored, bad values raise UserError."""
        if not isinstance(d, dict):
            raise _one_line(f"cfg is a {type(d).__name__}, expected a JSON object")
        for name in ("d_in", "d_sae"):
            if name not in d:
                raise _one_line(f"cfg is missing required field {name!r}")
        # Extra keys are tolerated: SAELens cfgs carry many, and newer files may add fields.
        return cls(**{k: v for k, v in d.items() if k in _FIELD_KIND})


class EncoderOutput(NamedTuple):
    """Sparse codes: the k active values per row and their dictionary indices."""

    top_acts: Tensor  # [..., k]
    top_indices: Tensor  # [..., k], int64


class ForwardOutput(NamedTuple):
    """Reconstruction, dense codes and the two usual quality numbers."""

    recon: Tensor  # [..., d_in]
    codes: Tensor  # [..., d_sae]
    l0: Tensor  # scalar: mean number of active codes per row
    fvu: Tensor  # scalar: fraction of variance unexplained over all rows


class Pair(NamedTuple):
    """The residual-stream and MLP-output dictionaries of one layer."""

    resid: Dictionary
    mlp: Dictionary


class Dictionary(torch.nn.Module):
    """A sparse autoencoder with TopK, ReLU or BatchTopK codes."""

    threshold: Tensor  # a buffer (register_buffer below), declared for the type checker

    def __init__(self, cfg: DictConfig, *, device: str | torch.device | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        dt = cfg.torch_dtype
        self.W_dec = torch.nn.Parameter(w_dec.to(device=device, dtype=dt))
        # Tied init (W_enc = W_dec.T) starts every feature as its own detector; it is a
        # well-known trick that cuts dead latents early in training.
        self.W_enc = torch.nn.Parameter(w_dec.T.contiguous().to(device=device, dtype=dt))
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dt))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dt))
        # Inference threshold for batchtopk; kept for every architecture so state_dicts match.
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=dt))

    # ---- encoding -------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc``, shape [..., d_sae]."""
        # Written as x·W_enc − b_dec·W_enc rather than (x − b_dec)·W_enc: the same number, but
        # autograd then gets b_dec's gradient from a vector product instead of a third
        # [batch, d_sae] × [d_sae, d_in] matmul (a third of a training step's matmul time).
        return x @ self.W_enc - self.b_dec @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [..., d_sae] for any architecture (zeros where inactive)."""
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "relu":
            return F.relu(pre)
        if arch == "topk":
            acts, idx = self._topk(pre)
            return torch.zeros_like(pre).scatter(-1, idx, acts)
        if self.training:
            # BatchTopK: k * n_rows winners over the whole batch, so rows may use more or
            # fewer than k codes while the batch average stays k.
            flat = F.relu(pre).flatten()
            n_rows = flat.numel() // self.cfg.d_sae
            acts, idx = flat.topk(min(self.cfg.k * n_rows, flat.numel()), sorted=False)
            return torch.zeros_like(flat).scatter(0, idx, acts).view_as(pre)
        # At inference a per-row rule is needed (batch-independent); the threshold is the
        # training-time estimate of the smallest activation BatchTopK keeps.
        return F.relu(pre) * (pre > self.threshold)

    def _topk(self, pre: Tensor) -> EncoderOutput:
        # relu before topk: a row with fewer than k positive pre-acts gets zeros, not negatives.
        acts, idx = F.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(acts, idx)

    def encode_sparse(self, x: Tensor) -> EncoderOutput:
        """TopK codes as (top_acts, top_indices) [..., k]; other architectures use encode()."""
        # relu and batchtopk have a varying number of active codes per row, so they have no
        # fixed-k sparse form; callers use the dense encode() for them.
        if self.cfg.architecture != "topk":
            raise _one_line(f"encode_sparse needs architecture 'topk', this dictionary is "
                            f"{self.cfg.architecture!r}: use encode() for dense codes")
        return self._topk(self.pre_acts(x))

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction from dense codes: ``codes @ W_dec + b_dec``."""
        return codes @ self.W_dec + self.b_dec

    def decode_sparse(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Reconstruction from sparse codes at cost k*d_in per row, shape [..., d_in]."""
        if top_acts.shape != top_indices.shape:
            raise ValueError(f"top_acts shape {tuple(top_acts.shape)} != top_indices shape "
                             f"{tuple(top_indices.shape)}")
        lead, k = top_acts.shape[:-1], top_acts.shape[-1]
        # embedding_bag gathers and weights the k decoder rows in one fused kernel, without
        # materialising the [..., k, d_in] tensor that W_dec[top_indices] would.
        out = F.embedding_bag(top_indices.reshape(-1, k), self.W_dec,
                              per_sample_weights=top_acts.reshape(-1, k).to(self.W_dec.dtype),
                              mode="sum")
        return out.view(*lead, self.cfg.d_in) + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        """Encode, decode and measure: recon, dense codes, mean L0 and FVU."""
        if self.cfg.architecture == "topk":
            acts, idx = self.encode_sparse(x)
            recon = self.decode_sparse(acts, idx)
            codes = torch.zeros(*acts.shape[:-1], self.cfg.d_sae, dtype=acts.dtype,
                                device=acts.device).scatter(-1, idx, acts)
        else:
            codes = self.encode(x)
            recon = self.decode(codes)
        l0 = (codes != 0).sum(-1).to(torch.float32).mean()
        xf, rf = x.reshape(-1, self.cfg.d_in), recon.reshape(-1, self.cfg.d_in)
        # Normalised by total variance around the batch mean, so a dictionary that only learns
        # the mean scores 1.0 (the sparsify convention).
        fvu = (xf - rf).pow(2).sum() / (xf - xf.mean(0)).pow(2).sum()
        return ForwardOutput(recon, codes, l0, fvu)

    # ---- training helpers -----------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every row of W_dec to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec.grad each row's component along that decoder row."""
        # With unit-norm rows enforced after each step, the parallel component only changes
        # the norm that renormalisation undoes; removing it keeps Adam's moments honest.
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad -= (self.W_dec.grad * unit).sum(-1, keepdim=True) * unit

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make a dictionary trained on ``x * scale`` take raw ``x``; W_dec stays unit-norm."""
        if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise _one_line(f"input scale {scale!r} is invalid: expected a finite number > 0")
        # encode_trained(x*s)/s = f((x - b_dec/s) @ W_enc + b_enc/s) for f in relu/topk/
        # threshold (all commute with positive scaling), and decode_raw(c/s) = decode_trained(c)/s.
        # So only the biases and threshold shrink; the codes come out 1/s as large.
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)
        self.threshold.div_(scale)

    # ---- files ----------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        t = {n: getattr(self, n).detach().cpu() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if self.cfg.architecture == "batchtopk":
            t["threshold"] = self.threshold.detach().cpu()
        return t

    def _write_into(self, folder: Path) -> None:
        # cfg.dtype follows the weights actually written, in case the module was cast.
        cfg = dataclasses.replace(self.cfg, dtype=_dtype_name(self.W_enc.dtype))
        text = strict_json(cfg.to_dict(), indent=2) + "\n"  # a NaN metric becomes null + reason
        atomic_save_safetensors(self._tensors(), folder / WEIGHTS_FILE)
        atomic_write_text(folder / CFG_FILE, text)

    def save(self, path: str | Path) -> Path:
        """Write ``path/cfg.json`` and ``path/sae_weights.safetensors``, all or nothing."""
        return _save_folder(Path(path), {CFG_FILE, WEIGHTS_FILE}, self._write_into)

    @classmethod
    def load(cls, path: str | Path, *, expect: dict[str, Any] | None = None,
             device: str | torch.device = "cpu") -> Dictionary:
        """Read a dictionary folder; UserError if missing, corrupt or not what ``expect`` says."""
        path = Path(path)
        if not path.is_dir():
            raise _one_line(f"no dictionary at {path}: expected a folder with {CFG_FILE} and "
                            f"{WEIGHTS_FILE}")
        cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise _one_line(f"dictionary at {path} has no {p.name}: expected a folder with "
                                f"{CFG_FILE} and {WEIGHTS_FILE}")
        from featcircuit.readers import read_json_file

        try:  # bounded: size, nesting depth and integer digits are capped before parsing
            raw = read_json_file(cfg_path, "dictionary config", max_bytes=1 << 20, max_depth=16,
                                 max_digits=18)
        except UserError as e:
            raise _one_line(f"corrupt {cfg_path}: {e}") from None
        try:
            cfg = DictConfig.from_dict(raw)
        except UserError as e:
            raise _one_line(f"invalid {cfg_path}: {e}") from e
        try:
            from safetensors.torch import load_file
            tensors = load_file(str(w_path))
        except Exception as e:  # the safetensors reader raises several types for bad bytes
            raise _one_line(f"corrupt {w_path}: cannot read safetensors ({e})") from e
        want = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_in),
                "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_in,)}
        if cfg.architecture == "batchtopk":
            want["threshold"] = ()
        if set(tensors) != set(want):
            raise _one_line(f"{w_path} holds tensors {sorted(tensors)}, expected {sorted(want)} "
                            f"for architecture {cfg.architecture!r}")
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise _one_line(f"{name} in {w_path} has shape {list(tensors[name].shape)}, but "
                                f"{cfg_path} (d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies "
                                f"{list(shape)}")
        for name, t in tensors.items():
            if not t.is_floating_point():
                raise _one_line(f"{name} in {w_path} has dtype {t.dtype}: expected floating point")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise _one_line(f"{name} in {w_path} holds {bad:,} NaN or infinite values: the "
                                "dictionary is corrupt (retrain it)")
        _check_expect(path, cfg, expect)
        d = cls(cfg, device=device)
        tensors.setdefault("threshold", torch.zeros(()))
        d.load_state_dict(tensors)  # copies in place, casting to cfg.dtype on `device`
        return d


def _dtype_name(dt: torch.dtype) -> str:
    for name, t in _DTYPES.items():
        if t == dt:
            return name
    raise _one_line(f"cannot save dtype {dt}: expected one of {', '.join(_DTYPES)}")


def _check_expect(path: Path, cfg: DictConfig, expect: dict[str, Any] | None) -> None:
    for key, want in (expect or {}).items():
        if key not in _FIELD_KIND:
            raise _one_line(f"unknown expect key {key!r}: expected one of {', '.join(_FIELD_KIND)}")
        # None means "don't care", so callers can pass optional expectations straight through.
        if want is not None and getattr(cfg, key) != want:
            raise _one_line(f"dictionary at {path} is for {key} {getattr(cfg, key)!r}, "
                            f"expected {key} {want!r}")


def _save_folder(target: Path, allowed: set[str], write: Callable[[Path], None]) -> Path:
    # Only a folder we could have written may be replaced: saving onto the wrong path (a run
    # directory, '.') must not delete someone's files.
    if target.exists():
        if not target.is_dir():
            raise _one_line(f"cannot save to {target}: it is a file, expected a folder path")
        extra = sorted(set(os.listdir(target)) - allowed)
        if extra:
            raise _one_line(f"cannot save to {target}: it holds {extra[:3]}, expected a new path "
                            f"or a folder with only {sorted(allowed)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir rather than mkdtemp: mkdtemp's 0700 mode would follow the folder into place.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.mkdir(tmp)
    try:
        write(tmp)
        if not target.exists():
            os.rename(tmp, target)
            return target
        # No portable atomic swap of two folders: move the old one aside, move the new one in,
        # and put the old one back if that fails. A crash in between leaves the old copy in a
        # hidden sibling, never a half-written target.
        old_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                        dir=target.parent))
        old = old_dir / target.name
        try:
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
        finally:
            # Keep the old copy only in the one case where it is the sole survivor.
            if target.exists() or not old.exists():
                shutil.rmtree(old_dir, ignore_errors=True)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed into place


def save_pair(resid: Dictionary, mlp: Dictionary, path: str | Path,
              extra_files: dict[str, str] | None = None) -> Path:
    """Write ``path/resid/``, ``path/mlp/`` (and ``extra_files``: name -> text) together, all or nothing."""
    extra_files = extra_files or {}
    for slot, d in (("resid", resid), ("mlp", mlp)):
        if d.cfg.site not in ("", slot):
            raise _one_line(f"the {slot} dictionary has site {d.cfg.site!r}, expected "
                            f"{slot!r} (or unset)")

    def write(folder: Path) -> None:
        resid._write_into(folder / "resid")
        mlp._write_into(folder / "mlp")
        for name, text in extra_files.items():
            atomic_write_text(folder / name, text)

    # train_config.json is always allowed: `featcircuit train` writes it beside the pair
    return _save_folder(Path(path), {"resid", "mlp", "train_config.json", *extra_files}, write)


def load_pair(path: str | Path, expect_model: str | None = None, expect_layer: int | None = None,
              d_resid: int | None = None, d_mlp: int | None = None,
              device: str | torch.device = "cpu") -> Pair:
    """Read a pair folder, checking model, layer, site and widths; UserError on any mismatch."""
    path = Path(path)
    if not path.is_dir():
        raise _one_line(f"no dictionary pair at {path}: expected a folder with resid/ and mlp/")
    out = {}
    for slot, d_in in (("resid", d_resid), ("mlp", d_mlp)):
        sub = path / slot
        if not sub.is_dir():
            raise _one_line(f"dictionary pair at {path} has no {slot}/: expected {sub} with "
                            f"{CFG_FILE} and {WEIGHTS_FILE}")
        d = Dictionary.load(sub, device=device, expect={"model_name": expect_model,
                                                        "layer": expect_layer, "d_in": d_in})
        # An unset site is accepted (older or hand-made files); a wrong one means the two
        # folders were swapped or mislabelled.
        if d.cfg.site not in ("", slot):
            raise _one_line(f"dictionary at {sub} is for site {d.cfg.site!r}, expected site "
                            f"{slot!r}")
        out[slot] = d
    r, m = out["resid"].cfg, out["mlp"].cfg
    for key in ("model_name", "layer"):
        if getattr(r, key) != getattr(m, key):
            raise _one_line(f"dictionary pair at {path} mixes {key} {getattr(r, key)!r} (resid) "
                            f"and {getattr(m, key)!r} (mlp): expected one {key} for both")
    return Pair(out["resid"], out["mlp"])
