"""Cross-check of minicpmv.model.formats' GPTQ unpacking against GPTQModel's own packer and dequantizer.

GPTQModel pulls a CUDA build of torch and a newer transformers, so it is not a test dependency; run this in a
throwaway venv:  python -m venv --system-site-packages /tmp/g && /tmp/g/bin/pip install gptqmodel &&
/tmp/g/bin/python scripts/crosscheck_gptqmodel.py   (prints the largest difference per case: fp16 rounding, ~3e-5)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel import QuantizeConfig
from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
from minicpmv.model.formats.packed import unpack, dequantize
torch.manual_seed(0)
for sym, act in ((True, False), (False, True)):
    n, k, g = 96, 256, 64
    lin = torch.nn.Linear(k, n, bias=False)
    ng = k // g
    scales = torch.rand(n, ng) * 0.01 + 0.001
    zeros = torch.full((n, ng), 8.0) if sym else torch.randint(1, 15, (n, ng)).float()
    g_idx = torch.randperm(k) // g if act else torch.arange(k) // g
    ql = TorchLinear(bits=4, group_size=g, sym=sym, desc_act=act, in_features=k, out_features=n, bias=False)
    ql.pack_original(lin, scales, zeros, g_idx.int())
    ref = ql.dequantize_weight().float()  # [K, N] as GPTQModel computes it (v2 in memory)
    ours_v2 = dequantize(unpack(ql.qweight, 4, 0), unpack(ql.qzeros, 4, 1), ql.scales, ql.g_idx.long())
    convert_gptq_v2_to_v1_format_module(ql, QuantizeConfig(bits=4, group_size=g, sym=sym, desc_act=act))  # what save() writes for format gptq
    ours_v1 = dequantize(unpack(ql.qweight, 4, 0), unpack(ql.qzeros, 4, 1) + 1, ql.scales, ql.g_idx.long())
    print(f"sym={sym} act_order={act}: v2 max diff {(ours_v2 - ref.T).abs().max().item():.3g}, "
          f"v1 max diff {(ours_v1 - ref.T).abs().max().item():.3g}")

# AWQ GEMM: the test suite's reference packer (tests/tiny.py) -> GPTQModel's AWQ dequantizer vs ours.
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

from minicpmv.model.formats import awq
from tests.tiny import awq_tensors

w = torch.randn(96, 256) * 0.05
tensors, expected = awq_tensors(w, 64)
ref = dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, 64).float().T
ours = dequantize(unpack(tensors["qweight"], 4, 1, awq.ORDER), unpack(tensors["qzeros"], 4, 1, awq.ORDER),
                  tensors["scales"], torch.arange(256) // 64)
print(f"awq gemm: GPTQModel vs ours max diff {(ours - ref).abs().max().item():.3g}, "
      f"vs the packer's own {(ours - expected).abs().max().item():.3g}")
