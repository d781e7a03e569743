"""The ComfyUI step of benchmarks/comfyui_reader.py: run in ComfyUI's own venv, it imports nothing of
sdlite (see comfyui_reader.py for the three other steps and what each compares).

    /tmp/comfy-venv/bin/python benchmarks/comfyui_side.py --comfyui /tmp/comfy --out runs/comfyui_sdxl

``comfy.sd.load_checkpoint_guess_config`` (no VAE; the U-Net stored float16, run in float32 by
ComfyUI's manual-cast ops) and ``comfy.sd.load_lora_for_models`` for each file, its "lora key not
loaded" and "NOT LOADED" warnings counted. The text encoders go through ComfyUI's own path,
``CLIP.encode_from_tokens`` on the same token ids as ours, which patches them by its ModelPatcher. The
U-Net is not patched by the ModelPatcher (that keeps a second copy of every patched weight): each
patched weight is computed by ComfyUI's own ``comfy.lora.calculate_weight`` from the patches
``load_lora_for_models`` registered, on the float32 weight as ``ModelPatcher.patch_weight_to_device``
does, and set in place one key at a time (kept float32: the patcher would round it back to the
storage's float16); then ComfyUI's U-Net (``diffusion_model``) runs on the same latent, timestep and
context and, for SDXL, the ``y`` vector that ComfyUI's own ``encode_adm`` builds from the same pooled
embedding and sizes. The checkpoint's float16 weights are put back before the next file.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path

import torch
from comfyui_reader import SIZE, log, made_kinds, memory
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.not_loaded: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "lora key not loaded" in msg or msg.startswith("NOT LOADED"):
            self.not_loaded.append(msg)


class _Absent(types.ModuleType):
    """A stand-in module: every attribute is another stand-in, and calling one fails loudly."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__}: a stand-in for the CUDA-built wheel, called")


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision and torchaudio: the wheels beside the CPU torch are CUDA builds that fail to load;
    ComfyUI imports them in modules off the SD/SDXL path, which never call them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchvision", "torchaudio"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Absent(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def _import_comfy(path: str, fp32_text: bool):
    sys.meta_path.insert(0, _StandIns())
    sys.path.insert(0, str(Path(path).resolve()))
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], "--cpu", *(["--fp32-text-enc"] if fp32_text else [])]
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return comfy


def comfy_side(args) -> None:
    out = Path(args.out)
    comfy = _import_comfy(args.comfyui, args.fp32_text_enc)
    counter = _Count()
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.INFO)
    ckpt = str(out / "model.safetensors")
    inputs = load_file(out / "inputs.safetensors")
    with safe_open(out / "inputs.safetensors", "pt") as f:
        family = f.metadata()["family"]
    sdxl = family == "sdxl"
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        ckpt, output_vae=False, output_clip=True, model_options={"dtype": torch.float16}
    )
    base = model.model
    detected = type(base.model_config).__name__  # ComfyUI's model detection: SD15, SDXL...
    log(f"ComfyUI loaded {detected}, U-Net {base.get_dtype()} run as {base.manual_cast_dtype}")
    tokens = {"l": [[(int(i), 1.0) for i in inputs["ids_0"][0]]]}
    if sdxl:
        tokens["g"] = [[(int(i), 1.0) for i in inputs["ids_1"][0]]]
    unet = base.diffusion_model
    text_dtype = str(max(clip.cond_stage_model.parameters(), key=lambda p: p.numel()).dtype)
    results, report = {}, {"detected": detected, "text_dtype": text_dtype, "not_loaded": {}, "patched": {}}
    with safe_open(ckpt, "pt") as source:
        for kind in ("base", *made_kinds(out)):
            counter.not_loaded.clear()
            m, c = model, clip
            if kind != "base":
                lora = comfy.utils.load_torch_file(str(out / f"{kind}.safetensors"), safe_load=True)
                m, c = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
            report["not_loaded"][kind] = list(counter.not_loaded)
            cond, pooled = c.encode_from_tokens(tokens, return_pooled=True)  # ComfyUI's ModelPatcher patches
            results[f"{kind}.text"] = cond.float()
            if sdxl:
                results[f"{kind}.pooled"] = pooled.float()
            comfy.model_management.unload_all_models()  # its ModelPatcher puts the encoders' weights back
            # the U-Net: each patched weight by comfy.lora.calculate_weight, in float32, set in place
            keys = sorted(m.patches) if kind != "base" else []
            with torch.no_grad():
                for key in keys:
                    weight = comfy.utils.get_attr(m.model, key)
                    temp = weight.to(torch.float32, copy=True)
                    new = comfy.lora.calculate_weight(
                        m.patches[key], temp, key, intermediate_dtype=torch.float32
                    )
                    comfy.utils.set_attr_param(m.model, key, new)
            report["patched"][kind] = len(keys)
            y = None
            if sdxl:
                y = base.encode_adm(pooled_output=inputs["pooled"], **SIZE, target_height=SIZE["height"],
                                    target_width=SIZE["width"])  # fmt: skip
                results[f"{kind}.y"] = y.float()
            with torch.no_grad():
                eps = unet(inputs["x"], timesteps=inputs["t"], context=inputs["context"], y=y)
            results[f"{kind}.eps"] = eps.float()
            with torch.no_grad():  # the checkpoint's own float16 weights back
                for key in keys:
                    comfy.utils.set_attr_param(m.model, key, source.get_tensor("model." + key))
            log(f"ComfyUI {kind}: {len(report['not_loaded'][kind])} keys not loaded, {len(keys)} U-Net "
                f"weights patched, |eps| {eps.norm():.4g}")  # fmt: skip
            del m, c
    name = "comfy_fp32te" if args.fp32_text_enc else "comfy"
    report.update(memory())
    save_file(results, out / f"{name}.safetensors")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--comfyui", required=True, help="a checkout of Comfy-Org/ComfyUI")
    p.add_argument("--out", required=True, help="the folder comfyui_reader.py make wrote")
    p.add_argument("--fp32-text-enc", action="store_true", help="ComfyUI's flag: text encoders in float32")
    log("start")
    comfy_side(p.parse_args(argv))


if __name__ == "__main__":
    main()
